/* bench_cmd: `kvdex bench <name>` — dispatches to the benchmarks in bench/. */
#include <stdio.h>
#include <string.h>

#include "bench/bench.h"
#include "workers/commands.h"
#include "workers/settings.h"

static int bench_scan(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_settings_parse(
      &s, KVDEX_CMD_BENCH_SCAN,
      "usage: kvdex bench scan [options]\n\n"
      "Exact-scan throughput (GB/s of keys read) on 1 thread and on all threads, beside\n"
      "a memory read-bandwidth probe over a buffer of the same size in the same run.",
      argc, argv, stdout);
  if (rc == 1) return 0;
  if (rc) {
    fprintf(stderr, "kvdex bench scan: %s\n", kvdex_errmsg());
    return 2;
  }
  kvdex_log_configure((int)kvdex_setting_num(&s, KVDEX_SET_LOG_LEVEL), NULL, NULL);
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

int kvdex_cmd_bench(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
    FILE *out = argc < 2 ? stderr : stdout;
    fprintf(out, "usage: kvdex bench <benchmark> [options]\n\nbenchmarks:\n"
                 "  scan   exact-scan GB/s vs the machine's memory read bandwidth\n\n"
                 "`kvdex bench <benchmark> --help` lists its options.\n");
    return argc < 2 ? 2 : 0;
  }
  if (!strcmp(argv[1], "scan")) return bench_scan(argc - 1, argv + 1);
  fprintf(stderr, "kvdex bench: unknown benchmark '%s' (known: scan)\n", argv[1]);
  return 2;
}
