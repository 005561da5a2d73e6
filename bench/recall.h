/* recall: the engine of `kvdex bench recall` — recall@k of index specs (index/ann.h)
 * against the exact top-k, on keys and queries loaded from .npy files (bench/npy.h).
 * For each spec on the same data: build time, recall@k, fraction of keys touched,
 * single-thread queries/s, index bytes per key, planted-needle hits, and with a
 * sweep the recall-vs-keys-touched curve of its search knob (no rebuild).
 * Prints only to the streams it is given. It does not generate data (bench/gen.h).
 */
#ifndef KVDEX_RECALL_H
#define KVDEX_RECALL_H

#include <stdint.h>
#include <stdio.h>

typedef struct kvdex_recall_opts {
  const char *keys_path;    /* [N,D] f32/f16 (required) */
  const char *queries_path; /* [T,D] f32/f16 (required) */
  const char *train_path;   /* [P,D] prefill queries, or NULL/"" */
  const char *needles_path; /* [K,2] (position, query row), or NULL/"" */
  /* Index specs separated by ';' (blanks around them ignored). "all" expands to
   * every kind at its defaults (exact, ivf, hnsw, graph, landmark), leaving out,
   * with a note on `progress`, a kind this build does not have. */
  const char *index_specs;
  uint32_t k;            /* top-k (clamped to N) */
  uint32_t block_tokens; /* rows per block of the key view (the keys are not copied) */
  unsigned threads;      /* ground truth and builds; 0 = one per CPU. Searches: 1 */
  int sweep;             /* also sweep each kind's search knob */
  int json;              /* one JSON object on `out` instead of text tables */
  const char *csv_path;  /* NULL/"": no CSV */
  FILE *progress;        /* stage and progress lines; NULL = quiet */
} kvdex_recall_opts;

/* Runs the benchmark and prints the results to `out`. Every spec is parsed and
 * every file read and checked (2-D, same D, needles in range) before any work.
 * Errors: KVDEX_EINVAL (bad spec, shape, dims, needle, or a spec that cannot be
 * built on this data), KVDEX_EIO (a file that cannot be read or written),
 * KVDEX_ENOMEM, or an index's own failure code; kvdex_errmsg() says which input. */
int kvdex_bench_recall(const kvdex_recall_opts *opts, FILE *out);

#endif /* KVDEX_RECALL_H */
