/* fidelity: the engine of `kvdex bench fidelity` — how close sparse attention over
 * retrieved tokens comes to dense attention, and what it costs.
 *
 * One layer of one sequence (n_kv_heads x n_q_heads GQA, head_dim) is filled with the
 * out-of-distribution generator (bench/gen.h, one generator run per kv head, its
 * prefill queries sent the way an engine sends them: kvdex_txn_append_q), or with
 * .npy data in `kvdex gen`'s layout (one kv head). For each index spec it builds the
 * layer's index with the node engine (engine/node.h: the code the server runs), then
 * per decode step and per budget k:
 *   - the Attend part: the indexer's search for the top-k of [sinks, n - window) of
 *     every query head, then sparse attention over them (index/attend.h), timed
 *     together: the latency of one layer's Attend;
 *   - the static part an engine keeps on its GPU (sinks + the recent window),
 *     simulated on the CPU with the same attention code;
 *   - the two merged by log-sum-exp (kvdex_merge_partials) and compared with dense
 *     attention over all tokens: relative L2 error of the output per query head, the
 *     attention mass the kept tokens carry (exp(lse_kept - lse_dense)), keys touched;
 *   - planted needles (the generator's): the needle counts as hit when it is among
 *     the tokens its query head kept.
 * Dense attention (the exact reference, kvdex_attend_dense) is timed too: the
 * baseline an Attend is compared with in the same run.
 * Prints only to the streams it is given.
 */
#ifndef KVDEX_FIDELITY_H
#define KVDEX_FIDELITY_H

#include <stdint.h>
#include <stdio.h>

typedef struct kvdex_fidelity_opts {
  uint64_t tokens;        /* context length (generated data) */
  uint32_t n_kv_heads, n_q_heads, head_dim, block_tokens;
  int dtype;              /* storage dtype of K and V */
  uint32_t steps;         /* decode steps (queries per head) */
  const char *index_specs;/* ';'-separated index specs (index/ann.h), e.g. "graph;landmark" */
  const char *budgets;    /* ','-separated top-k budgets, e.g. "256,1024,2048" */
  uint64_t sinks, window; /* the static part (attended by the engine itself) */
  float logit_scale;      /* attention logits = logit_scale * q.k (0 = 1/sqrt(head_dim)) */
  uint32_t n_needles;     /* planted needles per kv head (generated data) */
  uint64_t seed;
  const char *data_dir;   /* NULL/"": generate; else keys/values/queries[/train_queries,
                             needles].npy as `kvdex gen` writes them (one kv head) */
  unsigned threads;       /* 0 = one per CPU */
  int json;
  FILE *progress;         /* NULL = quiet */
} kvdex_fidelity_opts;

/* Runs the benchmark and prints its table (or one JSON object) to `out`.
 * Errors: KVDEX_EINVAL (bad spec, budget list, shape, or data), KVDEX_EIO (a file),
 * KVDEX_ENOMEM, or an index's own failure; kvdex_errmsg() says which. */
int kvdex_bench_fidelity(const kvdex_fidelity_opts *opts, FILE *out);

#endif /* KVDEX_FIDELITY_H */
