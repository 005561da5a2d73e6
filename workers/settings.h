/* settings: the one table of every kvdex setting — flag, environment variable,
 * default, bounds, unit and help — read by the same code for every subcommand
 * (defaults, then KVDEX_* environment variables, then flags) and printed by --help.
 * Holds values only; it does not act on them.
 */
#ifndef KVDEX_SETTINGS_H
#define KVDEX_SETTINGS_H

#include <stdint.h>
#include <stdio.h>

/* Subcommands a setting applies to (bit mask). */
enum {
  KVDEX_CMD_SERVE = 1 << 0,
  KVDEX_CMD_DEMO = 1 << 1,
  KVDEX_CMD_BENCH_SCAN = 1 << 2,
  KVDEX_CMD_INSPECT = 1 << 3,
  KVDEX_CMD_GEN = 1 << 4,
  KVDEX_CMD_BENCH_RECALL = 1 << 5,
  KVDEX_CMD_BENCH_FIDELITY = 1 << 6,
  KVDEX_CMD_CLUSTER = 1 << 7,
  KVDEX_CMD_GPU_WORKER = 1 << 8,
};

/* Every setting, in table order. */
typedef enum kvdex_setting_id {
  KVDEX_SET_LISTEN,
  KVDEX_SET_URI,
  KVDEX_SET_MEMORY,
  KVDEX_SET_THREADS,
  KVDEX_SET_MAX_MESSAGE,
  KVDEX_SET_DRAIN_MS,
  KVDEX_SET_METRICS_LISTEN,
  KVDEX_SET_TLS_CERT,
  KVDEX_SET_TLS_KEY,
  KVDEX_SET_TLS_CLIENT_CA,
  KVDEX_SET_AUTH_FILE,
  KVDEX_SET_TIMEOUT_MS,
  KVDEX_SET_NAMESPACE,
  KVDEX_SET_TLS_CA,
  KVDEX_SET_TLS_CLIENT_CERT,
  KVDEX_SET_TLS_CLIENT_KEY,
  KVDEX_SET_TOKEN,
  KVDEX_SET_VERIFY,
  KVDEX_SET_TOKENS,
  KVDEX_SET_LAYERS,
  KVDEX_SET_KV_HEADS,
  KVDEX_SET_Q_HEADS,
  KVDEX_SET_HEAD_DIM,
  KVDEX_SET_DTYPE,
  KVDEX_SET_BLOCK_TOKENS,
  KVDEX_SET_STEPS,
  KVDEX_SET_K,
  KVDEX_SET_SINKS,
  KVDEX_SET_WINDOW,
  KVDEX_SET_CHECK,
  KVDEX_SET_ATTEND,
  KVDEX_SET_SEED,
  KVDEX_SET_REPEAT,
  KVDEX_SET_JSON,
  /* kvdex gen */
  KVDEX_SET_GEN_OUT,
  KVDEX_SET_GEN_KEYS,
  KVDEX_SET_GEN_DIM,
  KVDEX_SET_GEN_TRAIN,
  KVDEX_SET_GEN_TEST,
  KVDEX_SET_GEN_NEEDLES,
  KVDEX_SET_GEN_TOPICS,
  KVDEX_SET_GEN_SPAN,
  KVDEX_SET_GEN_KEY_OFFSET,
  KVDEX_SET_GEN_QUERY_OFFSET,
  KVDEX_SET_GEN_QUERY_SCALE,
  KVDEX_SET_GEN_QUERY_NOISE,
  KVDEX_SET_GEN_NOISE,
  KVDEX_SET_GEN_DRIFT,
  KVDEX_SET_GEN_HEAVY,
  /* kvdex bench recall */
  KVDEX_SET_RECALL_KEYS,
  KVDEX_SET_RECALL_QUERIES,
  KVDEX_SET_RECALL_TRAIN,
  KVDEX_SET_RECALL_NEEDLES,
  KVDEX_SET_RECALL_INDEX,
  KVDEX_SET_RECALL_SWEEP,
  KVDEX_SET_RECALL_CSV,
  /* kvdex bench fidelity */
  KVDEX_SET_FID_INDEX,
  KVDEX_SET_FID_BUDGETS,
  KVDEX_SET_FID_SINKS,
  KVDEX_SET_FID_WINDOW,
  KVDEX_SET_FID_NEEDLES,
  KVDEX_SET_FID_DATA,
  KVDEX_SET_FID_LOGIT_SCALE,
  KVDEX_SET_LOG_LEVEL,
  /* kvdex gpu-worker */
  KVDEX_SET_GW_URI,
  KVDEX_SET_GW_CPU,
  KVDEX_SET_GW_CONTEXT,
  KVDEX_SET_GW_SINKS,
  KVDEX_SET_GW_WINDOW,
  KVDEX_SET_GW_INDEX,
  KVDEX_SET_GW_CHECK,
  KVDEX_SET_GW_TOLERANCE,
  KVDEX_SET_GW_S2_VERT_STRIDE,
  KVDEX_SET_GW_S2_LOCAL_BLOCKS,
  KVDEX_SET_GW_SEQ,
  KVDEX_SET_GW_KEEP,
  KVDEX_SET_GW_PROGRESS,
  KVDEX_SET_COUNT_
} kvdex_setting_id;

typedef struct kvdex_settings {
  unsigned cmd;                     /* the subcommand these were parsed for */
  char *str[KVDEX_SET_COUNT_];      /* raw text of each value */
  int64_t num[KVDEX_SET_COUNT_];    /* parsed value for int/size/bool/ms settings */
  double real[KVDEX_SET_COUNT_];    /* parsed value for real-valued settings */
} kvdex_settings;

/* Parses defaults, environment and argv (argv[0] is the subcommand name) for `cmd`.
 * Returns 0, 1 if --help was printed to `out`, or KVDEX_EINVAL with kvdex_errmsg()
 * naming the flag and the accepted range. `usage` is the first help line.
 * A flag name is unique per subcommand, not across them: `--keys` is a count for
 * `gen` and a file for `bench recall` (two rows, two environment variables).
 * List-valued settings (`--index`) may be repeated: the values given on the command
 * line are joined with ';' and replace the default or environment value. */
int kvdex_settings_parse(kvdex_settings *s, unsigned cmd, const char *usage, int argc,
                         char **argv, FILE *out);
void kvdex_settings_free(kvdex_settings *s);

static inline int64_t kvdex_setting_num(const kvdex_settings *s, kvdex_setting_id id) {
  return s->num[id];
}
static inline double kvdex_setting_real(const kvdex_settings *s, kvdex_setting_id id) {
  return s->real[id];
}
static inline const char *kvdex_setting_str(const kvdex_settings *s, kvdex_setting_id id) {
  return s->str[id];
}

/* Parses "64M", "2GiB", "1024", "75%" (of physical memory) into bytes; -1 if bad. */
int64_t kvdex_parse_size(const char *text);

/* Prints every setting of every subcommand as a Markdown table (docs). */
void kvdex_settings_print_table(FILE *out);

#endif /* KVDEX_SETTINGS_H */
