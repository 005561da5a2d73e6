/* bench_cmd: `kvdex bench <name>` — dispatches to the benchmarks in bench/
 * (scan: bench/bench.h; recall: bench/recall.h; fidelity: bench/fidelity.h). */
#include <stdio.h>
#include <string.h>

#include "bench/bench.h"
#include "bench/fidelity.h"
#include "bench/recall.h"
#include "workers/cmd.h"
#include "workers/commands.h"
#include "workers/settings.h"

static int bench_scan(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(
      &s, KVDEX_CMD_BENCH_SCAN, "kvdex bench scan",
      "usage: kvdex bench scan [options]\n\n"
      "Exact-scan throughput (GB/s of keys read) on 1 thread and on all threads, beside\n"
      "a memory read-bandwidth probe over a buffer of the same size in the same run.",
      argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  kvdex_scan_bench_opts o = {
      .tokens = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_TOKENS),
      .n_kv_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_KV_HEADS),
      .n_q_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_Q_HEADS),
      .head_dim = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_HEAD_DIM),
      .block_tokens = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_BLOCK_TOKENS),
      .dtype = (int)kvdex_setting_num(&s, KVDEX_SET_DTYPE),
      .k = 100,
      .threads = (unsigned)kvdex_setting_num(&s, KVDEX_SET_THREADS),
      .repeat = (int)kvdex_setting_num(&s, KVDEX_SET_REPEAT),
      .json = (int)kvdex_setting_num(&s, KVDEX_SET_JSON),
  };
  rc = kvdex_bench_scan(&o, stdout);
  if (rc) fprintf(stderr, "kvdex bench scan: %s\n", kvdex_errmsg());
  kvdex_settings_free(&s);
  return rc ? 1 : 0;
}

static int bench_recall(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(
      &s, KVDEX_CMD_BENCH_RECALL, "kvdex bench recall",
      "usage: kvdex bench recall --keys K.npy --queries Q.npy [--train-queries P.npy]\n"
      "                          [--needles N.npy] [--k 100] [--index SPEC ...] [--sweep]\n"
      "                          [--csv FILE] [--json] [--threads N]\n\n"
      "Recall@k of index specs against the exact top-k on the same keys (.npy, float32 or\n"
      "float16, as `kvdex gen` writes them). The exact top-k is computed once on all\n"
      "threads; then per spec: build seconds (and per million keys), recall@k (mean over\n"
      "queries), fraction of keys touched, queries/s on one thread, index bytes per key,\n"
      "and with --needles how many needles come back as top-1 of their query.\n"
      "--index takes one spec (index/ann.h: exact, ivf:nlist=1024,nprobe=32,\n"
      "hnsw:M=32,ef=128, graph:K=32,ef=128, landmark:mode=minmax,blocks=16); repeat it\n"
      "or join specs with ';' (--index 'exact;ivf:nlist=64'); `all` = every kind at its\n"
      "defaults. --sweep re-searches each built index over its knob (graph, hnsw: ef\n"
      "16..1024; ivf: nprobe 1..nlist; landmark: blocks 1..all), and --csv writes\n"
      "kind,spec,knob,value,recall,touched_frac,qps rows (bench/plot_recall.py plots them).\n"
      "Exit status: 0 ok, 2 bad option or input (file, shape, dims, spec), 1 failure.",
      argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  kvdex_recall_opts o = {
      .keys_path = kvdex_setting_str(&s, KVDEX_SET_RECALL_KEYS),
      .queries_path = kvdex_setting_str(&s, KVDEX_SET_RECALL_QUERIES),
      .train_path = kvdex_setting_str(&s, KVDEX_SET_RECALL_TRAIN),
      .needles_path = kvdex_setting_str(&s, KVDEX_SET_RECALL_NEEDLES),
      .index_specs = kvdex_setting_str(&s, KVDEX_SET_RECALL_INDEX),
      .k = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_K),
      .block_tokens = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_BLOCK_TOKENS),
      .threads = (unsigned)kvdex_setting_num(&s, KVDEX_SET_THREADS),
      .sweep = (int)kvdex_setting_num(&s, KVDEX_SET_RECALL_SWEEP),
      .json = (int)kvdex_setting_num(&s, KVDEX_SET_JSON),
      .csv_path = kvdex_setting_str(&s, KVDEX_SET_RECALL_CSV),
      .progress = stderr,
  };
  rc = kvdex_bench_recall(&o, stdout);
  if (rc) fprintf(stderr, "kvdex bench recall: %s\n", kvdex_errmsg());
  kvdex_settings_free(&s);
  /* Bad input (a file, a shape, a spec) is the caller's to fix: 2, like a bad flag. */
  return rc == 0 ? 0 : (rc == KVDEX_EINVAL || rc == KVDEX_EIO) ? 2 : 1;
}

static int bench_fidelity(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(
      &s, KVDEX_CMD_BENCH_FIDELITY, "kvdex bench fidelity",
      "usage: kvdex bench fidelity [--tokens N] [--kv-heads 8] [--q-heads 32] [--index SPEC ...]\n"
      "                            [--budgets 256,1024,2048] [--sinks 16] [--window 256]\n"
      "                            [--steps N] [--data DIR] [--json]\n\n"
      "Sparse attention vs dense attention on one layer. The layer is generated (kvdex gen's\n"
      "model, one run per kv head, prefill queries sent with the K/V) or read from --data\n"
      "(kvdex gen's .npy files, one kv head). Per index spec and top-k budget: the layer's\n"
      "Attend (the indexer's search + attention over the retrieved tokens, timed: p50/p99\n"
      "ms per layer), merged with the static part (sinks + window, what the engine attends\n"
      "itself) and compared with dense attention over all tokens: relative L2 error of the\n"
      "output (mean and max over heads and steps), attention mass kept, keys touched, and\n"
      "planted needles found. Dense attention's own latency is printed as the baseline.\n"
      "Exit status: 0 ok, 2 bad option or input, 1 failure.",
      argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  kvdex_fidelity_opts o = {
      .tokens = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_TOKENS),
      .n_kv_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_KV_HEADS),
      .n_q_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_Q_HEADS),
      .head_dim = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_HEAD_DIM),
      .block_tokens = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_BLOCK_TOKENS),
      .dtype = (int)kvdex_setting_num(&s, KVDEX_SET_DTYPE),
      .steps = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_STEPS),
      .index_specs = kvdex_setting_str(&s, KVDEX_SET_FID_INDEX),
      .budgets = kvdex_setting_str(&s, KVDEX_SET_FID_BUDGETS),
      .sinks = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_FID_SINKS),
      .window = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_FID_WINDOW),
      .logit_scale = (float)kvdex_setting_real(&s, KVDEX_SET_FID_LOGIT_SCALE),
      .n_needles = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_FID_NEEDLES),
      .seed = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_SEED),
      .data_dir = kvdex_setting_str(&s, KVDEX_SET_FID_DATA),
      .threads = (unsigned)kvdex_setting_num(&s, KVDEX_SET_THREADS),
      .json = (int)kvdex_setting_num(&s, KVDEX_SET_JSON),
      .progress = stderr,
  };
  rc = kvdex_bench_fidelity(&o, stdout);
  if (rc) fprintf(stderr, "kvdex bench fidelity: %s\n", kvdex_errmsg());
  kvdex_settings_free(&s);
  return rc == 0 ? 0 : (rc == KVDEX_EINVAL || rc == KVDEX_EIO) ? 2 : 1;
}

int kvdex_cmd_bench(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
    FILE *out = argc < 2 ? stderr : stdout;
    fprintf(out, "usage: kvdex bench <benchmark> [options]\n\nbenchmarks:\n"
                 "  scan     exact-scan GB/s vs the machine's memory read bandwidth\n"
                 "  recall   recall@k, keys touched and queries/s of index specs on .npy data\n"
                 "  fidelity sparse attention over retrieved tokens vs dense: error, latency\n\n"
                 "`kvdex bench <benchmark> --help` lists its options.\n");
    return argc < 2 ? 2 : 0;
  }
  if (!strcmp(argv[1], "scan")) return bench_scan(argc - 1, argv + 1);
  if (!strcmp(argv[1], "recall")) return bench_recall(argc - 1, argv + 1);
  if (!strcmp(argv[1], "fidelity")) return bench_fidelity(argc - 1, argv + 1);
  fprintf(stderr, "kvdex bench: unknown benchmark '%s' (known: scan, recall, fidelity)\n",
          argv[1]);
  return 2;
}
