/* settings: the table and its parser. Adding a setting means one enum entry in
 * settings.h and one row here; --help, the environment and docs follow. */
#include "workers/settings.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvstore/base.h"

/* T_REAL: a finite number within [min, max]; T_LIST: text, ';'-joined when the flag
 * is repeated on the command line. */
typedef enum { T_STR, T_INT, T_SIZE, T_BOOL, T_DTYPE, T_LEVEL, T_REAL, T_LIST } kind;

typedef struct row {
  kvdex_setting_id id;
  const char *flag; /* without the leading "--" */
  const char *env;
  kind type;
  const char *def;
  int64_t min, max;
  const char *unit;
  unsigned cmds;
  const char *help;
} row;

#define ALL                                                                              \
  (KVDEX_CMD_SERVE | KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | KVDEX_CMD_INSPECT | KVDEX_CMD_GEN | \
   KVDEX_CMD_BENCH_RECALL | KVDEX_CMD_BENCH_FIDELITY | KVDEX_CMD_CLUSTER | KVDEX_CMD_GPU_WORKER)
/* Commands that are clients of a store. */
#define CLIENT (KVDEX_CMD_DEMO | KVDEX_CMD_INSPECT | KVDEX_CMD_CLUSTER)
#define GEN KVDEX_CMD_GEN
#define GW KVDEX_CMD_GPU_WORKER
#define FID KVDEX_CMD_BENCH_FIDELITY
#define RECALL KVDEX_CMD_BENCH_RECALL
#define GB (1LL << 30)

static const row TABLE[KVDEX_SET_COUNT_] = {
    {KVDEX_SET_LISTEN, "listen", "KVDEX_LISTEN", T_STR, "0.0.0.0:50051", 0, 0, "host:port",
     KVDEX_CMD_SERVE, "address to serve gRPC on (port 0 picks a free one)"},
    {KVDEX_SET_URI, "uri", "KVDEX_URI", T_STR, "local:", 0, 0, "uri", CLIENT,
     "store to use: local: (embedded), grpc://host:port, grpcs://host:port (TLS), or a "
     "cluster: grpc://h1:port,h2:port?replicas=2 or dns:///name:port?replicas=2"},
    {KVDEX_SET_MEMORY, "memory", "KVDEX_MEMORY", T_SIZE, "75%", 1 << 20, 1LL << 50, "bytes",
     KVDEX_CMD_SERVE | KVDEX_CMD_DEMO,
     "memory cap for stored K/V (K/M/G/T suffixes or % of RAM)"},
    {KVDEX_SET_THREADS, "threads", "KVDEX_THREADS", T_INT, "0", 0, 1024, "threads",
     KVDEX_CMD_SERVE | KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | RECALL | FID,
     "worker threads (0 = one per CPU)"},
    {KVDEX_SET_MAX_MESSAGE, "max-message", "KVDEX_MAX_MESSAGE", T_SIZE, "64M", 4096, 1LL << 31,
     "bytes", KVDEX_CMD_SERVE, "largest gRPC message accepted or sent"},
    {KVDEX_SET_DRAIN_MS, "drain", "KVDEX_DRAIN_MS", T_INT, "10000", 0, 3600000, "ms",
     KVDEX_CMD_SERVE, "on SIGTERM/SIGINT, time given to in-flight calls before cancelling"},
    {KVDEX_SET_METRICS_LISTEN, "metrics-listen", "KVDEX_METRICS_LISTEN", T_STR, "", 0, 0,
     "host:port", KVDEX_CMD_SERVE,
     "address to serve Prometheus metrics on, GET /metrics over HTTP (empty = off; port 0 "
     "picks a free one)"},
    {KVDEX_SET_TLS_CERT, "tls-cert", "KVDEX_TLS_CERT", T_STR, "", 0, 0, "file", KVDEX_CMD_SERVE,
     "PEM certificate chain to serve gRPC over TLS (with --tls-key; empty = plaintext)"},
    {KVDEX_SET_TLS_KEY, "tls-key", "KVDEX_TLS_KEY", T_STR, "", 0, 0, "file", KVDEX_CMD_SERVE,
     "PEM private key of --tls-cert"},
    {KVDEX_SET_TLS_CLIENT_CA, "tls-client-ca", "KVDEX_TLS_CLIENT_CA", T_STR, "", 0, 0, "file",
     KVDEX_CMD_SERVE,
     "PEM CA bundle: require and verify client certificates signed by it (mTLS; needs TLS)"},
    {KVDEX_SET_AUTH_FILE, "auth-file", "KVDEX_AUTH_FILE", T_STR, "", 0, 0, "file",
     KVDEX_CMD_SERVE,
     "bearer tokens, lines `TOKEN ns1,ns2` (`*` = all namespaces, `#` comments); every call "
     "but Health/Check then needs `authorization: Bearer TOKEN` (empty = no auth)"},
    {KVDEX_SET_TIMEOUT_MS, "timeout", "KVDEX_TIMEOUT_MS", T_INT, "30000", 1, 86400000, "ms",
     CLIENT | GW, "deadline of each remote call (a cluster's failover included)"},
    {KVDEX_SET_NAMESPACE, "namespace", "KVDEX_NAMESPACE", T_STR, "default", 0, 0, "name",
     KVDEX_CMD_DEMO | KVDEX_CMD_INSPECT | GW, "tenant namespace"},
    {KVDEX_SET_TLS_CA, "tls-ca", "KVDEX_TLS_CA", T_STR, "", 0, 0, "file", CLIENT | GW,
     "grpcs: PEM CA that signed the server certificates (empty = the system roots)"},
    {KVDEX_SET_TLS_CLIENT_CERT, "tls-client-cert", "KVDEX_TLS_CLIENT_CERT", T_STR, "", 0, 0,
     "file", CLIENT | GW, "grpcs: PEM client certificate for mTLS (with --tls-client-key)"},
    {KVDEX_SET_TLS_CLIENT_KEY, "tls-client-key", "KVDEX_TLS_CLIENT_KEY", T_STR, "", 0, 0, "file",
     CLIENT | GW, "grpcs: PEM private key of --tls-client-cert"},
    {KVDEX_SET_TOKEN, "token", "KVDEX_TOKEN", T_STR, "", 0, 0, "token", CLIENT | GW,
     "bearer token sent to servers started with --auth-file (prefer the environment "
     "variable: a flag shows in ps)"},
    {KVDEX_SET_VERIFY, "verify", "KVDEX_VERIFY", T_BOOL, "0", 0, 1, "", KVDEX_CMD_CLUSTER,
     "cluster status: also read every replica and compare checksums (reads all K/V)"},
    {KVDEX_SET_TOKENS, "tokens", "KVDEX_TOKENS", T_INT, "131072", 1, 1LL << 32, "tokens",
     KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | FID, "context length of the synthetic sequence"},
    {KVDEX_SET_LAYERS, "layers", "KVDEX_LAYERS", T_INT, "1", 1, 1024, "layers",
     KVDEX_CMD_DEMO | GW, "layers of the synthetic sequence"},
    {KVDEX_SET_KV_HEADS, "kv-heads", "KVDEX_KV_HEADS", T_INT, "8", 1, 1024, "heads",
     KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | FID | GW, "KV heads"},
    {KVDEX_SET_Q_HEADS, "q-heads", "KVDEX_Q_HEADS", T_INT, "32", 1, 1024, "heads",
     KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | FID | GW, "query heads (a multiple of --kv-heads)"},
    {KVDEX_SET_HEAD_DIM, "head-dim", "KVDEX_HEAD_DIM", T_INT, "128", 1, 1024, "elements",
     KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | FID | GW, "head dimension"},
    {KVDEX_SET_DTYPE, "dtype", "KVDEX_DTYPE", T_DTYPE, "f16", 0, 0, "f32|f16|bf16",
     KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | GEN | FID | GW,
     "storage type of K and V (gen: of the .npy arrays, f32 or f16)"},
    {KVDEX_SET_BLOCK_TOKENS, "block-tokens", "KVDEX_BLOCK_TOKENS", T_INT, "64", 1, 65536,
     "tokens", KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | RECALL | FID | GW, "tokens per storage block"},
    {KVDEX_SET_STEPS, "steps", "KVDEX_STEPS", T_INT, "200", 1, 1000000, "steps", KVDEX_CMD_DEMO | FID | GW,
     "decode-step searches to run"},
    {KVDEX_SET_K, "k", "KVDEX_K", T_INT, "100", 1, 65536, "tokens", KVDEX_CMD_DEMO | RECALL | GW,
     "top-k per query head"},
    {KVDEX_SET_SINKS, "sinks", "KVDEX_SINKS", T_INT, "0", 0, 1LL << 31, "tokens", KVDEX_CMD_DEMO,
     "exclude the first N tokens (the caller attends them)"},
    {KVDEX_SET_WINDOW, "window", "KVDEX_WINDOW", T_INT, "0", 0, 1LL << 31, "tokens",
     KVDEX_CMD_DEMO, "exclude the last N tokens (the caller attends them)"},
    {KVDEX_SET_CHECK, "check", "KVDEX_CHECK", T_INT, "-1", -1, 1000000, "steps", KVDEX_CMD_DEMO,
     "steps checked against the scalar reference (-1 = all if quick, else a sample)"},
    {KVDEX_SET_ATTEND, "attend", "KVDEX_ATTEND", T_BOOL, "0", 0, 1, "", KVDEX_CMD_DEMO,
     "also run Attend (index auto) and dense Attend on a sample of steps: o error, latency"},
    {KVDEX_SET_SEED, "seed", "KVDEX_SEED", T_INT, "1", 0, INT64_MAX, "", KVDEX_CMD_DEMO | GEN | FID | GW,
     "random seed of the synthetic data"},
    {KVDEX_SET_REPEAT, "repeat", "KVDEX_REPEAT", T_INT, "5", 1, 1000, "runs", KVDEX_CMD_BENCH_SCAN,
     "timed repetitions (the best and median are reported)"},
    {KVDEX_SET_JSON, "json", "KVDEX_JSON", T_BOOL, "0", 0, 1, "",
     KVDEX_CMD_DEMO | KVDEX_CMD_BENCH_SCAN | RECALL | FID | GW,
     "print one JSON object instead of text"},
    /* kvdex gen: the OOD generator of bench/gen.h, written as .npy files */
    {KVDEX_SET_GEN_OUT, "out", "KVDEX_GEN_OUT", T_STR, "", 0, 0, "dir", GEN,
     "directory to write keys/values/train_queries/queries/needles.npy into (required)"},
    {KVDEX_SET_GEN_KEYS, "keys", "KVDEX_GEN_KEYS", T_INT, "65536", 1, 1LL << 32, "keys", GEN,
     "keys (tokens) to generate"},
    {KVDEX_SET_GEN_DIM, "dim", "KVDEX_GEN_DIM", T_INT, "128", 2, 4096, "elements", GEN,
     "dimension of keys, values and queries (head_dim)"},
    {KVDEX_SET_GEN_TRAIN, "train-queries", "KVDEX_GEN_TRAIN_QUERIES", T_INT, "2048", 0, 1 << 24,
     "queries", GEN, "prefill queries (train_queries.npy), same distribution as the decode ones"},
    {KVDEX_SET_GEN_TEST, "test-queries", "KVDEX_GEN_TEST_QUERIES", T_INT, "1000", 1, 1 << 24,
     "queries", GEN, "decode queries (queries.npy)"},
    {KVDEX_SET_GEN_NEEDLES, "needles", "KVDEX_GEN_NEEDLES", T_INT, "16", 0, 1 << 24, "needles", GEN,
     "planted needles: key i at depth i/(K-1) made the clear top-1 of one decode query"},
    {KVDEX_SET_GEN_TOPICS, "topics", "KVDEX_GEN_TOPICS", T_INT, "0", 0, 1 << 24, "topics", GEN,
     "topic centres keys and queries are drawn around (0 = keys/256, at least 16)"},
    {KVDEX_SET_GEN_SPAN, "span", "KVDEX_GEN_SPAN", T_INT, "64", 1, 1 << 24, "tokens", GEN,
     "mean length of a run of keys on one topic"},
    {KVDEX_SET_GEN_KEY_OFFSET, "key-offset", "KVDEX_GEN_KEY_OFFSET", T_REAL, "4", 0, 1000, "norm",
     GEN, "norm of the offset all keys share"},
    {KVDEX_SET_GEN_QUERY_OFFSET, "query-offset", "KVDEX_GEN_QUERY_OFFSET", T_REAL, "4", 0, 1000,
     "norm", GEN, "norm of the queries' offset, in another direction (what makes them OOD)"},
    {KVDEX_SET_GEN_QUERY_SCALE, "query-scale", "KVDEX_GEN_QUERY_SCALE", T_REAL, "2.5", 0, 1000,
     "factor", GEN, "scale of the queries' topic component"},
    {KVDEX_SET_GEN_QUERY_NOISE, "query-noise", "KVDEX_GEN_QUERY_NOISE", T_REAL, "0.15", 0, 100,
     "sigma", GEN, "per-element noise of queries (isotropic: the part of q.k no index can predict)"},
    {KVDEX_SET_GEN_NOISE, "noise", "KVDEX_GEN_NOISE", T_REAL, "1", 0, 100, "factor", GEN,
     "per-element noise of keys (sigma = 0.35 x this)"},
    {KVDEX_SET_GEN_DRIFT, "drift", "KVDEX_GEN_DRIFT", T_REAL, "1", 0, 100, "norm", GEN,
     "amplitude of the keys' slow rotation with position"},
    {KVDEX_SET_GEN_HEAVY, "heavy-frac", "KVDEX_GEN_HEAVY_FRAC", T_REAL, "0.0005", 0, 1, "fraction",
     GEN, "fraction of heavy-hitter keys that most queries attend to"},
    /* kvdex bench recall: recall@k of index specs against exact top-k on .npy data */
    {KVDEX_SET_RECALL_KEYS, "keys", "KVDEX_RECALL_KEYS", T_STR, "", 0, 0, "file.npy", RECALL,
     "keys [N,D], float32 or float16 (required)"},
    {KVDEX_SET_RECALL_QUERIES, "queries", "KVDEX_RECALL_QUERIES", T_STR, "", 0, 0, "file.npy",
     RECALL, "decode queries [T,D] (required)"},
    {KVDEX_SET_RECALL_TRAIN, "train-queries", "KVDEX_RECALL_TRAIN_QUERIES", T_STR, "", 0, 0,
     "file.npy", RECALL, "prefill queries [P,D] the attention-aware graph is built from"},
    {KVDEX_SET_RECALL_NEEDLES, "needles", "KVDEX_RECALL_NEEDLES", T_STR, "", 0, 0, "file.npy",
     RECALL, "needles [K,2] (position, query row) as `kvdex gen` writes them"},
    {KVDEX_SET_RECALL_INDEX, "index", "KVDEX_RECALL_INDEX", T_LIST, "all", 0, 0, "spec", RECALL,
     "index spec (index/ann.h); repeat the flag or join specs with ';'; all = every kind at "
     "its defaults"},
    {KVDEX_SET_RECALL_SWEEP, "sweep", "KVDEX_RECALL_SWEEP", T_BOOL, "0", 0, 1, "", RECALL,
     "also vary each index's search knob (ef, nprobe, blocks) without rebuilding"},
    {KVDEX_SET_RECALL_CSV, "csv", "KVDEX_RECALL_CSV", T_STR, "", 0, 0, "file", RECALL,
     "write kind,spec,knob,value,recall,touched_frac,qps rows (the sweep, else one per spec)"},
    /* kvdex bench fidelity */
    {KVDEX_SET_FID_INDEX, "index", "KVDEX_FIDELITY_INDEX", T_LIST, "graph;landmark:mode=minmax", 0,
     0, "spec", FID, "index specs to retrieve with (index/ann.h); repeat or join with ';'"},
    {KVDEX_SET_FID_BUDGETS, "budgets", "KVDEX_FIDELITY_BUDGETS", T_STR, "256,1024,2048", 0, 0,
     "k,k,...", FID, "top-k budgets per query head to measure"},
    {KVDEX_SET_FID_SINKS, "sinks", "KVDEX_FIDELITY_SINKS", T_INT, "16", 0, 1LL << 31, "tokens",
     FID, "first tokens in the static part (attended by the engine, not retrieved)"},
    {KVDEX_SET_FID_WINDOW, "window", "KVDEX_FIDELITY_WINDOW", T_INT, "256", 0, 1LL << 31,
     "tokens", FID, "last tokens in the static part (attended by the engine, not retrieved)"},
    {KVDEX_SET_FID_NEEDLES, "needles", "KVDEX_FIDELITY_NEEDLES", T_INT, "16", 0, 1 << 20,
     "needles", FID, "planted needles per kv head, at depths 0..100% (generated data)"},
    {KVDEX_SET_FID_DATA, "data", "KVDEX_FIDELITY_DATA", T_STR, "", 0, 0, "dir", FID,
     "use keys/values/queries[/train_queries/needles].npy of `kvdex gen` (one kv head) "
     "instead of generating"},
    {KVDEX_SET_FID_LOGIT_SCALE, "logit-scale", "KVDEX_FIDELITY_LOGIT_SCALE", T_REAL, "2", 0, 1000,
     "factor", FID, "attention logits = this x q.k (0 = 1/sqrt(head_dim)); 2 puts ~99% of the "
     "generator's attention mass in the top 1% of 128K tokens, as in retrieval heads"},
    {KVDEX_SET_LOG_LEVEL, "log-level", "KVDEX_LOG_LEVEL", T_LEVEL, "info", 0, 0,
     "error|warn|info|debug", ALL, "log verbosity (logs go to stderr)"},
    /* kvdex gpu-worker: the decode loop of workers/gpu_worker.h */
    {KVDEX_SET_GW_URI, "uri", "KVDEX_GPU_WORKER_URI", T_STR, "grpc://127.0.0.1:50051", 0, 0, "uri",
     GW, "store the worker attends and appends to (as --uri of demo; local: runs embedded)"},
    {KVDEX_SET_GW_CPU, "cpu", "KVDEX_GPU_WORKER_CPU", T_BOOL, "0", 0, 1, "", GW,
     "run local attention on the kernels' CPU twins (no GPU, no CUDA build needed)"},
    {KVDEX_SET_GW_CONTEXT, "context", "KVDEX_GPU_WORKER_CONTEXT", T_INT, "32768", 2, 1LL << 31,
     "tokens", GW, "prompt tokens per layer, appended to the store before decoding"},
    {KVDEX_SET_GW_SINKS, "sinks", "KVDEX_GPU_WORKER_SINKS", T_INT, "4", 0, 1LL << 30, "tokens", GW,
     "first tokens the worker holds and attends itself (the store excludes them)"},
    {KVDEX_SET_GW_WINDOW, "window", "KVDEX_GPU_WORKER_WINDOW", T_INT, "256", 0, 1LL << 30,
     "tokens", GW,
     "last stored tokens the worker holds and attends itself, besides the new token"},
    {KVDEX_SET_GW_INDEX, "index", "KVDEX_GPU_WORKER_INDEX", T_STR, "exact", 0, 0, "index", GW,
     "what the store's Attend retrieves with: exact, auto, graph, ivf, hnsw, landmark (top --k), "
     "or dense (every token outside sinks + window)"},
    {KVDEX_SET_GW_CHECK, "check", "KVDEX_GPU_WORKER_CHECK", T_BOOL, "0", 0, 1, "", GW,
     "compare every output with dense attention (f64, all K/V kept); with --index dense it must "
     "be within --tolerance (else exit 1), otherwise the error is reported"},
    {KVDEX_SET_GW_TOLERANCE, "tolerance", "KVDEX_GPU_WORKER_TOLERANCE", T_REAL, "0.001", 0, 1,
     "relative", GW, "--check limit on max |o - dense| / max |dense| per head (index dense)"},
    {KVDEX_SET_GW_S2_VERT_STRIDE, "s2-vert-stride", "KVDEX_GPU_WORKER_S2_VERT_STRIDE", T_INT, "0", 0,
     65536, "blocks", GW,
     "> 0: odd layers are S2-Attention layers attended wholly from the worker's S2 shard "
     "(local blocks + every vert_stride-th block per head; no store Attend)"},
    {KVDEX_SET_GW_S2_LOCAL_BLOCKS, "s2-local-blocks", "KVDEX_GPU_WORKER_S2_LOCAL_BLOCKS", T_INT,
     "4", 1, 65536, "blocks", GW, "S2 local blocks (of --block-tokens tokens)"},
    {KVDEX_SET_GW_SEQ, "seq", "KVDEX_GPU_WORKER_SEQ", T_STR, "", 0, 0, "id", GW,
     "sequence id to create (empty = gpu-worker-PID-SEED); it must not exist"},
    {KVDEX_SET_GW_KEEP, "keep", "KVDEX_GPU_WORKER_KEEP", T_BOOL, "0", 0, 1, "", GW,
     "keep the sequence in the store after the run (default: delete it)"},
    {KVDEX_SET_GW_PROGRESS, "progress", "KVDEX_GPU_WORKER_PROGRESS", T_INT, "5000", 0, 86400000,
     "ms", GW, "print a progress line to stderr at most this often (0 = never)"},
};

int64_t kvdex_parse_size(const char *text) {
  if (!text || !*text) return -1;
  errno = 0;
  char *end;
  double v = strtod(text, &end);
  if (errno || end == text || v < 0) return -1;
  while (*end == ' ') end++;
  double mult = 1;
  if (*end == '%') {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages <= 0 || page <= 0 || v > 100) return -1;
    mult = (double)pages * (double)page / 100.0;
    end++;
  } else if (*end) {
    switch (toupper((unsigned char)*end)) {
      case 'K': mult = 1024.0; break;
      case 'M': mult = 1024.0 * 1024; break;
      case 'G': mult = 1024.0 * 1024 * 1024; break;
      case 'T': mult = 1024.0 * 1024 * 1024 * 1024; break;
      case 'B': mult = 1; break;
      default: return -1;
    }
    end++;
    if (*end == 'i' || *end == 'I') end++;
    if (*end == 'B' || *end == 'b') end++;
  }
  if (*end) return -1;
  double bytes = v * mult;
  if (bytes > 9.0e18) return -1;
  return (int64_t)bytes;
}

/* The row of flag `name` that applies to `cmd` (flag names repeat across commands). */
static const row *find_flag(const char *name, size_t len, unsigned cmd) {
  for (int i = 0; i < KVDEX_SET_COUNT_; i++)
    if ((TABLE[i].cmds & cmd) && strlen(TABLE[i].flag) == len && !strncmp(TABLE[i].flag, name, len))
      return &TABLE[i];
  return NULL;
}

static int set_value(kvdex_settings *s, const row *r, const char *text, const char *origin) {
  int64_t v = 0;
  double real = 0;
  switch (r->type) {
    case T_STR:
    case T_LIST:
      break;
    case T_REAL: {
      errno = 0;
      char *end;
      real = strtod(text, &end);
      if (errno || end == text || *end || !isfinite(real))
        return kvdex__seterr(KVDEX_EINVAL, "%s %s: '%s' is not a number", origin, r->flag, text);
      if (real < (double)r->min || real > (double)r->max)
        return kvdex__seterr(KVDEX_EINVAL, "%s %s: %s is out of range [%lld, %lld] %s", origin,
                             r->flag, text, (long long)r->min, (long long)r->max, r->unit);
      break;
    }
    case T_INT: {
      errno = 0;
      char *end;
      long long x = strtoll(text, &end, 10);
      if (errno || end == text || *end)
        return kvdex__seterr(KVDEX_EINVAL, "%s %s: '%s' is not an integer", origin, r->flag, text);
      v = x;
      break;
    }
    case T_SIZE:
      v = kvdex_parse_size(text);
      if (v < 0)
        return kvdex__seterr(KVDEX_EINVAL,
                             "%s %s: '%s' is not a size (e.g. 512M, 4G, 75%%)", origin, r->flag,
                             text);
      break;
    case T_BOOL:
      if (!strcmp(text, "1") || !strcasecmp(text, "true") || !strcasecmp(text, "yes")) v = 1;
      else if (!strcmp(text, "0") || !strcasecmp(text, "false") || !strcasecmp(text, "no")) v = 0;
      else return kvdex__seterr(KVDEX_EINVAL, "%s %s: '%s' is not a boolean", origin, r->flag, text);
      break;
    case T_DTYPE:
      v = kvdex_dtype_parse(text);
      if (v < 0)
        return kvdex__seterr(KVDEX_EINVAL, "%s %s: '%s' is not one of f32, f16, bf16", origin,
                             r->flag, text);
      break;
    case T_LEVEL:
      v = kvdex_log_level_parse(text);
      if (v < 0)
        return kvdex__seterr(KVDEX_EINVAL, "%s %s: '%s' is not one of error, warn, info, debug",
                             origin, r->flag, text);
      break;
  }
  if ((r->type == T_INT || r->type == T_SIZE) && (v < r->min || v > r->max))
    return kvdex__seterr(KVDEX_EINVAL, "%s %s: %s is out of range [%lld, %lld] %s", origin,
                         r->flag, text, (long long)r->min, (long long)r->max, r->unit);
  char *copy = strdup(text);
  if (!copy) return kvdex__seterr(KVDEX_ENOMEM, "out of memory");
  free(s->str[r->id]);
  s->str[r->id] = copy;
  s->num[r->id] = v;
  s->real[r->id] = r->type == T_REAL ? real : (double)v;
  return 0;
}

static void print_help(FILE *out, unsigned cmd, const char *usage) {
  fprintf(out, "%s\n\nOptions (flag, environment variable, default):\n", usage);
  for (int i = 0; i < KVDEX_SET_COUNT_; i++) {
    const row *r = &TABLE[i];
    if (!(r->cmds & cmd)) continue;
    char flag[64];
    if (r->type == T_BOOL) snprintf(flag, sizeof flag, "--%s", r->flag);
    else snprintf(flag, sizeof flag, "--%s %s", r->flag, r->unit[0] ? r->unit : "N");
    fprintf(out, "  %-34s %s\n  %-34s   [env %s, default %s", flag, r->help, "", r->env, r->def);
    if (r->type == T_INT || r->type == T_SIZE || r->type == T_REAL)
      fprintf(out, ", range %lld..%lld", (long long)r->min, (long long)r->max);
    if (r->type == T_LIST) fprintf(out, ", repeatable");
    fprintf(out, "]\n");
  }
  fprintf(out, "  %-34s show this help\n", "--help");
}

int kvdex_settings_parse(kvdex_settings *s, unsigned cmd, const char *usage, int argc,
                         char **argv, FILE *out) {
  memset(s, 0, sizeof *s);
  s->cmd = cmd;
  int rc;
  char from_argv[KVDEX_SET_COUNT_] = {0}; /* list settings already given as flags */
  for (int i = 0; i < KVDEX_SET_COUNT_; i++) {
    if ((rc = set_value(s, &TABLE[i], TABLE[i].def, "default"))) goto fail;
  }
  for (int i = 0; i < KVDEX_SET_COUNT_; i++) {
    const char *e = getenv(TABLE[i].env);
    if (e && (TABLE[i].cmds & cmd) && (rc = set_value(s, &TABLE[i], e, TABLE[i].env))) goto fail;
  }
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      print_help(out, cmd, usage);
      kvdex_settings_free(s);
      return 1;
    }
    if (strncmp(a, "--", 2)) {
      rc = kvdex__seterr(KVDEX_EINVAL, "unexpected argument '%s' (see --help)", a);
      goto fail;
    }
    const char *name = a + 2, *eq = strchr(name, '=');
    size_t len = eq ? (size_t)(eq - name) : strlen(name);
    const row *r = find_flag(name, len, cmd);
    if (!r) {
      rc = kvdex__seterr(KVDEX_EINVAL, "unknown option '%.*s' (see --help)", (int)len + 2, a);
      goto fail;
    }
    const char *val;
    if (eq) val = eq + 1;
    else if (r->type == T_BOOL) val = "1";
    else if (i + 1 < argc) val = argv[++i];
    else {
      rc = kvdex__seterr(KVDEX_EINVAL, "option --%s needs a value (%s)", r->flag, r->unit);
      goto fail;
    }
    if (r->type == T_LIST && from_argv[r->id]) {
      /* A repeated list flag appends to what earlier flags gave. */
      size_t n = strlen(s->str[r->id]) + strlen(val) + 2;
      char *joined = malloc(n);
      if (!joined) {
        rc = kvdex__seterr(KVDEX_ENOMEM, "out of memory");
        goto fail;
      }
      snprintf(joined, n, "%s;%s", s->str[r->id], val);
      rc = set_value(s, r, joined, "option");
      free(joined);
      if (rc) goto fail;
    } else if ((rc = set_value(s, r, val, "option"))) {
      goto fail;
    }
    from_argv[r->id] = 1;
  }
  return 0;
fail:
  kvdex_settings_free(s);
  return rc;
}

void kvdex_settings_free(kvdex_settings *s) {
  if (!s) return;
  for (int i = 0; i < KVDEX_SET_COUNT_; i++) {
    free(s->str[i]);
    s->str[i] = NULL;
  }
}

void kvdex_settings_print_table(FILE *out) {
  static const char *cmd_names[] = {"serve",        "demo",           "bench scan", "inspect",
                                    "gen",          "bench recall",   "bench fidelity",
                                    "cluster",      "gpu-worker"};
  enum { N_CMDS = sizeof cmd_names / sizeof cmd_names[0] };
  fprintf(out, "| flag | env | default | bounds | unit | used by | meaning |\n");
  fprintf(out, "|---|---|---|---|---|---|---|\n");
  for (int i = 0; i < KVDEX_SET_COUNT_; i++) {
    const row *r = &TABLE[i];
    char bounds[64] = "";
    if (r->type == T_INT || r->type == T_SIZE || r->type == T_REAL)
      snprintf(bounds, sizeof bounds, "%lld..%lld", (long long)r->min, (long long)r->max);
    char used[128] = "";
    for (int c = 0; c < N_CMDS; c++)
      if (r->cmds & (1u << c)) {
        if (used[0]) strcat(used, ", ");
        strcat(used, cmd_names[c]);
      }
    fprintf(out, "| `--%s` | `%s` | `%s` | %s | %s | %s | %s |\n", r->flag, r->env, r->def, bounds,
            r->unit, used, r->help);
  }
}
