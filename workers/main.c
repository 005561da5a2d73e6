/* kvdex: one binary, subcommands serve, demo, bench, inspect, cluster, gen, settings. */
#include <stdio.h>
#include <string.h>

#include "workers/commands.h"
#include "workers/settings.h"

static void usage(FILE *out) {
  fprintf(out,
          "usage: kvdex <command> [options]\n\n"
          "commands:\n"
          "  serve     run a kvdex node (gRPC server)\n"
          "  demo      ingest a synthetic long-context sequence and run decode-step searches\n"
          "  bench     benchmarks: `kvdex bench scan`, `kvdex bench recall`\n"
          "  inspect   list the sequences of a store with their shape, tokens and bytes\n"
          "  cluster   status, repair and rebalance of a multi-node cluster\n"
          "  gpu-worker  decode loop: local attention + the store's Attend, merged (--cpu here)\n"
          "  gen       write synthetic out-of-distribution keys/queries/needles as .npy\n"
          "  settings  print every option of every command as a Markdown table\n\n"
          "`kvdex <command> --help` lists the options of a command; every option can also\n"
          "be set through the KVDEX_* environment variable shown there.\n");
}

int main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
      !strcmp(argv[1], "help")) {
    usage(argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "serve")) return kvdex_cmd_serve(argc - 1, argv + 1);
  if (!strcmp(cmd, "demo")) return kvdex_cmd_demo(argc - 1, argv + 1);
  if (!strcmp(cmd, "bench")) return kvdex_cmd_bench(argc - 1, argv + 1);
  if (!strcmp(cmd, "inspect")) return kvdex_cmd_inspect(argc - 1, argv + 1);
  if (!strcmp(cmd, "cluster")) return kvdex_cmd_cluster(argc - 1, argv + 1);
  if (!strcmp(cmd, "gpu-worker")) return kvdex_cmd_gpu_worker(argc - 1, argv + 1);
  if (!strcmp(cmd, "gen")) return kvdex_cmd_gen(argc - 1, argv + 1);
  if (!strcmp(cmd, "settings")) {
    kvdex_settings_print_table(stdout);
    return 0;
  }
  fprintf(stderr, "kvdex: unknown command '%s'\n\n", cmd);
  usage(stderr);
  return 2;
}
