/* kvdex.h — the public C API of kvdex: a KV-cache and retrieval store for
 * long-context LLM inference. One API, three transports:
 *   kvdex_open("local:", ...)                 an embedded node in this process
 *   kvdex_open("grpc://host:port", ...)       one kvdex server over gRPC (grpcs:// TLS)
 *   kvdex_open("grpc://h1:p,h2:p?replicas=2") a cluster of servers (also dns:///name:p)
 * Link //client:kvdex for all three, or //client:kvdex_remote for the remote ones
 * only (no FAISS, BLAS, OpenMP or jemalloc; "local:" then fails with KVDEX_EUNIMPL).
 * Architecture: docs/DESIGN.md.
 *
 * Conventions: every function returns 0 or a negative KVDEX_E* code and then
 * kvdex_errmsg() (thread-local) says why. Objects come back through OUT parameters
 * and are freed by their matching free/close function, which accepts NULL.
 * A kvdex_db handle may be used from many threads at once; a kvdex_appender only
 * from one thread at a time.
 *
 * A failed call changes no stored state.
 *
 * Tensor layouts (little-endian, row-major), matching proto/kvdex/v1/kvdex.proto:
 *   K, V of an append:      sequence dtype, [n_kv_heads][n_tokens][head_dim]
 *   prefill queries (kvq):  sequence dtype, [n_q_heads][n_tokens][head_dim]
 *   landmarks (kvl):        sequence dtype, [n_kv_heads][n_blocks][head_dim]
 *   K, V of a read:         sequence dtype, [n_kv_heads][n][head_dim]
 *   queries of a search:    f32, [n_q_heads][head_dim]
 *   attend q / o, lse:      f32, [n_q_heads][head_dim] / [n_q_heads]
 *   retain observations:    f32, [n_obs][n_q_heads][head_dim]
 * Buffers carry no sizes: they must match the sequence's shape. Over gRPC the
 * client learns shapes from create/stat (or asks StatSequence on first use) and
 * keeps them per handle; it forgets one on delete and when the server refuses a
 * call for that sequence. (If another client re-creates an id with another shape,
 * one call of this handle may still be sized by the old shape: the server then
 * refuses it, and the next call asks again.)
 */
#ifndef KVDEX_KVDEX_H
#define KVDEX_KVDEX_H

#include <stddef.h>
#include <stdint.h>

#include "kvdex/kvdex_base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex_db kvdex_db;
typedef struct kvdex_appender kvdex_appender;

typedef struct kvdex_open_opts {
  uint64_t memory_cap;      /* local: node memory cap in bytes (0 = unlimited) */
  unsigned threads;         /* local: search threads (0 = all CPUs) */
  uint32_t timeout_ms;      /* grpc: per-call deadline in ms (0 = 30000); an append
                               stream is one call, from begin to commit */
  const char *name_space;   /* namespace for every call (NULL = "default") */
  /* grpcs: PEM files read at open: the CA that signed the server's certificate
   * (NULL = the system roots), and a client certificate + key for mTLS (both or
   * neither). Ignored for grpc:// and local:. */
  const char *tls_ca_file, *tls_cert_file, *tls_key_file;
  /* grpc, grpcs: bearer token sent as `authorization: Bearer TOKEN` on every call
   * (NULL or "" = none). Copied at open. Over grpc:// it travels in plaintext. */
  const char *auth_token;
} kvdex_open_opts;

/* Opens a store. uri: "local:", "grpc://host:port" (IPv6: "grpc://[addr]:port") or
 * "grpcs://host:port" (TLS, see the tls_* options), or a cluster (below); anything
 * else is KVDEX_EINVAL.
 *
 * Clusters: "grpc://h1:p1,h2:p2,h3:p3?replicas=2" (grpcs too) or
 * "dns:///name:port?replicas=2&resolve_ms=30000" (every address the name resolves to
 * is a node; re-resolved every resolve_ms, default 30000; &tls=1 for TLS). A
 * sequence's owners are the top `replicas` nodes (default 2, at most the node count)
 * by rendezvous hashing of (namespace, sequence id), so adding or removing a node
 * moves only the sequences it gains or loses. Writes (create, append, build_index,
 * delete, retain with materialize) go to every owner and succeed when every owner
 * that answers accepts; an owner that is unreachable (or lacks the sequence, or lags
 * behind it) is skipped, logged at WARN with its address, and counted as
 * under-replicated until it is copied there again: by the handle itself, which
 * remembers the replicas that missed its writes and, every auto_repair_ms (URI
 * parameter, default 2000; 0 = off), re-sends those sequences from another owner to
 * the ones that answer again, or by `kvdex cluster repair` (kvdex_cluster_repair),
 * which finds every under-replicated sequence from any process. Reads (stat, read, search, attend, retain) go to the first
 * healthy owner and fail over to the next on UNAVAILABLE / DEADLINE_EXCEEDED, then to
 * the other nodes on NOT_FOUND (a sequence being moved by a rebalance is still on
 * its previous owners), all within the handle's timeout_ms. Batched search and attend
 * fan out to the owning nodes in parallel and are reassembled in request order. One
 * channel per node is reused; a node that fails 3 calls in a row is skipped for a
 * back-off (0.2 s doubling to 10 s) before one call tries it again (circuit breaker).
 * Errors from a server with auth: KVDEX_EUNAUTH (no or unknown token), KVDEX_EPERM
 * (the token may not use the handle's namespace). opts may be NULL. A grpc handle connects lazily;
 * the first call reports KVDEX_EUNAVAIL if the server cannot be reached.
 * kvdex_close(NULL) is a no-op; no call on the handle may be in flight. */
int kvdex_open(const char *uri, const kvdex_open_opts *opts, kvdex_db **out /* OUT */);
void kvdex_close(kvdex_db *db);

/* ---- clusters --------------------------------------------------------------------- */

/* One node of a cluster handle as the last kvdex_cluster_status saw it. */
typedef struct kvdex_cluster_node {
  char addr[300];        /* "host:port": the node's identity for hashing */
  int up;                /* 1: it answered ListSequences */
  int breaker_open;      /* 1: the client skips it for now (recent failures) */
  char error[256];       /* why it is down ("" when up) */
  uint64_t sequences;    /* visible sequences it holds (every namespace) */
  uint64_t importing;    /* hidden copies being imported (a repair/rebalance in progress) */
  uint64_t bytes_used, bytes_cap;
} kvdex_cluster_node;

/* One sequence of the cluster (any namespace). */
typedef struct kvdex_cluster_seq {
  char ns[65];           /* namespace: at most 64 bytes */
  char id[257];          /* sequence id: at most 256 bytes */
  uint64_t tokens;       /* the most tokens (summed over layers) any copy holds */
  uint32_t n_owners;     /* owners wanted: min(replicas, nodes) */
  uint32_t owners_ok;    /* owners that are up and hold a complete visible copy */
  uint32_t misplaced;    /* copies on nodes that are not owners (a rebalance moves them) */
  int diverged;          /* verify: two complete copies have different checksums */
  char owners[256];      /* owner addresses, comma-separated, in rank order */
  char holders[256];     /* nodes holding a visible copy, with tokens: "a:1 (4096),..." */
} kvdex_cluster_seq;

typedef struct kvdex_cluster_report {
  size_t n_nodes;
  kvdex_cluster_node *nodes;
  size_t n_seqs;
  kvdex_cluster_seq *seqs;         /* sorted by (ns, id) */
  uint64_t under_replicated;       /* sequences with owners_ok < n_owners */
  uint64_t misplaced;              /* sequences with a copy on a non-owner */
  uint64_t lost;                   /* sequences no node that is up holds (they were seen
                                      only in the client's hints) */
  /* repair / rebalance: what they did */
  uint64_t copied, deleted, failed;
  uint64_t bytes_copied;
} kvdex_cluster_report;
void kvdex_cluster_report_free(kvdex_cluster_report *r); /* arrays, not the struct */

/* What a repair or rebalance is doing; passed to the progress callback. */
typedef struct kvdex_cluster_progress {
  const char *action;    /* "copy", "delete", "skip" */
  const char *ns, *id;   /* the sequence */
  const char *from, *to; /* node addresses (from: NULL for delete) */
  size_t seq_index, n_seqs;
  uint64_t done_tokens, total_tokens; /* of this copy */
} kvdex_cluster_progress;
typedef void (*kvdex_cluster_progress_fn)(void *ctx, const kvdex_cluster_progress *p);

/* Status of a cluster handle: every node's state and every sequence's placement over
 * every namespace (ListSequences on each node). verify = 1 also reads every complete
 * copy and compares checksums (reads all K/V: slow). KVDEX_EINVAL for a handle that
 * is not a cluster. A down node is reported, not an error. */
int kvdex_cluster_status(kvdex_db *db, int verify, kvdex_cluster_report *out /* OUT */);

/* Repair: every owner that is up and lacks a sequence, or holds fewer tokens than the
 * most complete copy, gets it copied from that copy (hidden until complete, so
 * readers never see a partial copy; resumable: a rerun continues a hidden copy).
 * Copies on non-owners are left alone. Then the client's under-replication hints are
 * cleared. out (may be NULL) gets the status after the repair plus what was done.
 * Returns KVDEX_OK when every sequence has all its owners complete, else the first
 * error (and the others are still attempted). */
int kvdex_cluster_repair(kvdex_db *db, kvdex_cluster_progress_fn progress, void *ctx,
                         kvdex_cluster_report *out /* OUT, or NULL */);

/* Rebalance after nodes were added or removed: a repair (which copies every sequence
 * to its new owners), then every copy on a node that is no longer an owner is deleted
 * once all of the sequence's owners hold complete copies (never before: a node that
 * is down keeps the old copy in place). Resumable; progress as repair. */
int kvdex_cluster_rebalance(kvdex_db *db, kvdex_cluster_progress_fn progress, void *ctx,
                            kvdex_cluster_report *out /* OUT, or NULL */);

/* The owners of seq_id (in the handle's namespace) in rank order, as a
 * comma-separated list of addresses, into buf (size bytes). KVDEX_EINVAL for a
 * handle that is not a cluster. */
int kvdex_cluster_owners(kvdex_db *db, const char *seq_id, char *buf, size_t size);

/* A checksum of the copy of seq_id (handle's namespace) held by the node `addr`: its
 * shape, per-layer token counts and every K and V byte. Equal copies have equal sums.
 * KVDEX_ENOTFOUND when that node holds no visible copy; KVDEX_EINVAL for an address
 * that is not one of the handle's nodes. Works on plain grpc handles too (addr NULL). */
int kvdex_cluster_checksum(kvdex_db *db, const char *addr, const char *seq_id,
                           uint64_t *sum /* OUT */);

/* kvdex_shape (n_layers, n_kv_heads, n_q_heads, head_dim, block_tokens, dtype)
 * is defined in <kvdex/kvdex_base.h>. block_tokens 0 = default (64). */

/* kvdex_index_state and kvdex_layer_index (a layer's index, as kvdex_stat reports it)
 * are defined in <kvdex/kvdex_base.h>. */

typedef struct kvdex_seq_info {
  kvdex_shape shape;
  uint64_t bytes;               /* K, V, metadata, prefill queries, indexes */
  uint32_t n_layers;
  uint64_t *layer_tokens;       /* n_layers entries, owned by the info; kvdex_seq_info_free */
  uint64_t *layer_query_tokens; /* n_layers entries: tokens whose prefill queries are kept */
  uint64_t *layer_landmark_blocks; /* n_layers entries: blocks [0, n) have landmark keys
                                      (kvdex_append_kvl) */
  uint32_t n_indexes;
  kvdex_layer_index *indexes;   /* layers that have had a kvdex_build_index, ascending */
} kvdex_seq_info;
/* Frees the arrays, not the struct, and clears them (a second call is a no-op).
 * kvdex_stat zeroes *info first, so freeing after a failed stat is safe. */
void kvdex_seq_info_free(kvdex_seq_info *info);

/* seq_id: 1..256 bytes of [A-Za-z0-9._:/-]. create: KVDEX_EEXIST if the id is taken
 * (the existing sequence is unchanged), KVDEX_EINVAL for a bad shape or id.
 * delete/stat: KVDEX_ENOTFOUND if absent; bytes_freed gets the bytes returned to
 * the node's memory budget. */
int kvdex_create(kvdex_db *db, const char *seq_id, const kvdex_shape *shape);
int kvdex_delete(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed /* OUT, or NULL */);
int kvdex_stat(kvdex_db *db, const char *seq_id, kvdex_seq_info *info /* OUT */);

/* Lists sequence ids of the handle's namespace, sorted by strcmp. *ids is an
 * array of n strings, freed with kvdex_list_free. */
int kvdex_list(kvdex_db *db, char ***ids /* OUT */, size_t *n /* OUT */);
void kvdex_list_free(char **ids, size_t n);

/* Streaming append: begin, feed blocks, then commit (all or nothing) or abort.
 * kvdex_append_kv copies nothing it does not need to: over gRPC each call is one
 * stream message (a block of more than 16 MiB of K+V is split by token range).
 * A failed kvdex_append_kv ends the stream: later calls return the same code and
 * only commit (which reports it and stores nothing) or abort remain. Over gRPC the
 * server judges messages asynchronously, so a refusal (gap, conflict, memory cap,
 * another stream in progress) may only be reported by a later kvdex_append_kv or
 * by the commit. Begin fails with KVDEX_ENOTFOUND for an unknown sequence. */
int kvdex_append_begin(kvdex_db *db, const char *seq_id, kvdex_appender **out /* OUT */);
int kvdex_append_kv(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                    const void *k, const void *v);
/* kvdex_append_kv plus the prefill queries of the same tokens, for attention-aware
 * indexes (kvdex_build_index "graph"): q is in the sequence dtype, layout
 * [n_q_heads][n_tokens][head_dim] (all query heads); NULL = none (then it is
 * kvdex_append_kv). Stored with the stream's commit. A layer keeps the queries of at
 * most 4096 tokens, evenly spread: token t is kept iff t is a multiple of the layer's
 * stride, a power of two that doubles whenever more would be kept (so the sample does
 * not depend on how tokens were split into appends). Kept queries count against the
 * memory cap; re-sent queries of a token must be identical (else KVDEX_ECONFLICT).
 * kvdex_build_index gives each KV head's index the queries of its GQA group. */
int kvdex_append_kvq(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v, const void *q);
/* kvdex_append_kvq plus caller-given landmark keys (Landmark Attention: one key per
 * block of tokens), for kvdex_build_index "landmark:mode=given". A block is the
 * sequence's block_tokens tokens (B; block b = tokens [b*B, (b+1)*B)), and its
 * landmark is passed with the call whose range holds the block's last token: this call
 * takes the blocks b with token_start < (b+1)*B <= token_start + n_tokens, so
 * n_blocks = floor((token_start + n_tokens) / B) - floor(token_start / B), possibly 0
 * (then landmarks is not read). landmarks: sequence dtype, layout
 * [n_kv_heads][n_blocks][head_dim], finite values (else KVDEX_EINVAL); NULL = none.
 * q may be NULL (no prefill queries). Stored with the stream's commit and counted
 * against the memory cap (KVDEX_ENOMEM). A layer's landmarks are contiguous from
 * block 0 (kvdex_seq_info.layer_landmark_blocks says how many it has): re-sent
 * landmarks of a block that has one must be identical, and landmarks for blocks after
 * one that has none (appended without landmarks) are refused; both KVDEX_ECONFLICT.
 * To add the missing ones, re-send those tokens (an identical K/V replay, a no-op for
 * K/V) with their landmarks. */
int kvdex_append_kvl(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                     const void *k, const void *v, const void *q, const void *landmarks);
/* Commits the stream. tokens_appended (may be NULL) gets the new tokens stored,
 * replayed identical tokens excluded. A stream with no block commits nothing and
 * succeeds. Frees the appender whatever the result. */
int kvdex_append_commit(kvdex_appender *ap, uint64_t *tokens_appended /* OUT */);
/* Discards the stream (nothing is stored) and frees the appender. NULL: no-op. */
void kvdex_append_abort(kvdex_appender *ap);

/* Reads K and V of `n` tokens of one layer, all KV heads, into caller buffers of
 * n_kv_heads * n * head_dim elements each, layout [n_kv_heads][n][head_dim].
 * Ids may come in any order and repeat; each must be below the layer's committed
 * length (KVDEX_EINVAL otherwise). n = 0 reads nothing. On failure the buffers'
 * contents are unspecified (over gRPC part of them may have been written). */
int kvdex_read(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
               size_t n, void *k_out, void *v_out);

typedef struct kvdex_search_req {
  uint32_t k;       /* top-k per query head */
  uint32_t sinks;   /* exclude the first `sinks` tokens */
  uint32_t window;  /* exclude the last `window` tokens */
  /* How to search (NULL = exact):
   *   NULL, "" or "exact"  exact scan of every eligible token;
   *   "auto"               the layer's ready index (kvdex_build_index) if any, else exact;
   *   a kind               "graph", "ivf", "hnsw", "landmark": the layer's ready index,
   *                        which must be of that kind: KVDEX_ECONFLICT when none is
   *                        ready (or it is of another kind), KVDEX_EINVAL for an
   *                        unknown kind;
   *   "retained"           exact scan of the layer's retained set only (kvdex_retain
   *                        with materialize; KVDEX_ECONFLICT when it has none).
   * With an index, each query head searches its KV head's index for k + sinks +
   * window candidates, drops the ineligible ones and merges them with an exact scan
   * of the eligible tokens appended after the build, so new tokens are never missed;
   * the hits are the best k of those (fewer only when the index returns fewer). */
  const char *index;
  uint32_t ef;      /* graph, hnsw: beam width override (0 = the spec's) */
  uint32_t nprobe;  /* ivf: lists probed override (0 = the spec's) */
  uint32_t blocks;  /* landmark: blocks selected override (0 = the spec's) */
} kvdex_search_req;

/* Results of one query head: n hits in descending score, ties by ascending id;
 * n < k when fewer than k tokens are eligible. */
typedef struct kvdex_hits {
  uint32_t n;
  uint64_t *ids;
  float *scores;
} kvdex_hits;

typedef struct kvdex_search_out {
  uint32_t n_q_heads;
  kvdex_hits *heads;      /* n_q_heads entries */
  uint64_t keys_scanned;  /* keys scored: exact, summed over KV heads; with an index,
                             the index's distance computations summed over query
                             heads, plus the tail keys scanned (once per KV head) */
  uint64_t tokens;        /* committed tokens of the layer when the search ran */
  char index[32];         /* what served it: "exact" or the index kind */
} kvdex_search_out;
void kvdex_search_out_free(kvdex_search_out *out); /* frees the arrays, not the struct */

/* Batched decode search: for each of n_seqs sequences, queries q[i] (f32,
 * [n_q_heads][head_dim] of that sequence's shape) on `layer`; out[i] receives the
 * result for seq_ids[i] (free each with kvdex_search_out_free). Over gRPC the whole
 * batch is one call. If any sequence fails the whole call fails, out[] is left
 * zeroed and nothing needs freeing. n_seqs = 0 is a no-op. Errors: KVDEX_EINVAL
 * (k = 0 or > 65536, layer out of range, non-finite query), KVDEX_ENOTFOUND. */
int kvdex_search(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                 const char *const *seq_ids, const float *const *q, kvdex_search_out *out /* OUT */);

/* ---- retrieval indexes ------------------------------------------------------------ */

/* KVDEX_ALL_LAYERS (every layer that has tokens) is defined in <kvdex/kvdex_base.h>. */

/* Starts building a retrieval index for `layer` of a sequence (or, with
 * KVDEX_ALL_LAYERS, for every layer that has tokens) and returns at once; the build
 * runs in the background (over gRPC on the server's build threads, "local:" on a
 * build thread of the handle), one index per KV head, from the tokens committed when
 * it starts and the layer's prefill queries (kvdex_append_kvq).
 * spec: "kind:name=value,...", e.g. "graph:degree=32", "ivf:nlist=256", "hnsw:M=32",
 * "landmark:mode=minmax", "landmark:mode=given". mode=given is built from the layer's
 * caller-given landmarks (kvdex_append_kvl) and covers the complete blocks that have
 * one when it starts, tokens [0, layer_landmark_blocks * block_tokens); searches scan
 * the later tokens exactly (kvdex_layer_index.tokens says what it covers). Its spec's
 * block, if set, must equal the sequence's block_tokens (else the build FAILS with
 * "INVALID_ARGUMENT: ..."); a layer to build without landmarks is KVDEX_ECONFLICT.
 * kvdex_stat shows the layer KVDEX_INDEX_BUILDING, then READY (searches with index
 * "auto" or its kind use it from then on; a rebuild replaces the old index
 * atomically) or FAILED with a message (nothing else changes then, e.g. when the
 * finished index would pass the node's memory cap). The index counts against the
 * memory cap and is freed with its sequence. Errors (nothing queued): KVDEX_EINVAL
 * (bad spec, with the parser's message; layer out of range), KVDEX_ENOTFOUND,
 * KVDEX_ECONFLICT (the layer has no tokens; with KVDEX_ALL_LAYERS none has),
 * KVDEX_EBUSY (a build of one of these layers is queued or running). */
int kvdex_build_index(kvdex_db *db, const char *seq_id, uint32_t layer, const char *spec);

/* ---- attention: Attend, Retain, merging partial results --------------------------- */

/* One sequence of a batched kvdex_attend. */
typedef struct kvdex_attend_item {
  const char *seq_id;
  const float *q;         /* f32 [n_q_heads][head_dim] of this sequence's shape */
  const uint64_t *extra;  /* tokens every query head also attends (e.g. a landmark */
  uint32_t n_extra;       /* block's): each < the layer's length and outside sinks /
                             window, at most 65536; duplicates count once; may be NULL
                             when n_extra is 0 */
} kvdex_attend_item;

typedef struct kvdex_attend_options {
  uint32_t k;        /* tokens retrieved per query head, 1..65536 (ignored when dense) */
  uint32_t sinks;    /* tokens [0, sinks) are not attended: the caller attends them */
  uint32_t window;   /* nor the last `window` tokens */
  /* What retrieves the tokens: as kvdex_search_req.index (NULL/""/"exact", "auto", a
   * kind), or "retained": the best k of the layer's retained set (kvdex_retain with
   * materialize; KVDEX_ECONFLICT when it has none). */
  const char *index;
  uint32_t ef, nprobe, blocks; /* index overrides, as kvdex_search_req (0 = the spec's) */
  float scale;       /* logits = scale * q.k; 0 = 1/sqrt(head_dim); finite, >= 0 */
  int dense;         /* 1: attend every token of [sinks, n - window) (the exact reference) */
  const uint8_t *streaming; /* NULL, or per query head (n_q_heads of every item's
                               sequence): 1 = a streaming head (DuoAttention), nothing
                               retrieved, o = 0, lse = -INFINITY */
} kvdex_attend_options;

typedef struct kvdex_attend_info {
  uint64_t keys_touched; /* keys scored by retrieval (as kvdex_search_out.keys_scanned);
                            dense: eligible tokens x n_kv_heads */
  uint64_t tokens;       /* committed tokens of the layer when the call ran */
  uint64_t attended;     /* tokens attended, summed over query heads */
  double seconds;        /* the store's time on this item, retrieval + attention (over
                            gRPC measured on the server: the call's wall time minus the
                            items' seconds is network and queueing) */
  char index[32];        /* "dense", "exact", "retained" or the index kind */
} kvdex_attend_info;

/* Attend: sparse attention over the tokens kvdex holds, for `layer` of n_items
 * sequences (batched decode; over gRPC one call). For item i and each query head h,
 * over the token set T (the top-k of opts->index for h, plus the extra tokens):
 *   o[i][h]   = sum_{t in T} softmax_t(scale * q_h . k_t) v_t     (head_dim floats)
 *   lse[i][h] = log sum_{t in T} exp(scale * q_h . k_t)            (natural log)
 * An empty T gives o = 0, lse = -INFINITY. Query head h reads KV head
 * h / (n_q_heads / n_kv_heads). The engine combines this partial result with its own
 * (the sinks and the window, attended on its GPU) by kvdex_merge_partials.
 * o[i]: caller's buffer of n_q_heads * head_dim floats; lse[i]: n_q_heads floats;
 * info: n_items entries or NULL. If any item fails the whole call fails (the message
 * names the item); o and lse may then be partly written and info is zeroed.
 * n_items = 0 is a no-op. Changes no stored state. Errors: KVDEX_EINVAL (k 0 or >
 * 65536 without dense, layer out of range, non-finite query, bad scale, extras out
 * of range or too many, unknown index), KVDEX_ENOTFOUND, KVDEX_ECONFLICT (the index
 * kind is not ready; "retained" without a retained set), KVDEX_ENOMEM. */
int kvdex_attend(kvdex_db *db, uint32_t layer, const kvdex_attend_options *opts, size_t n_items,
                 const kvdex_attend_item *items, float *const *o /* OUT */,
                 float *const *lse /* OUT */, kvdex_attend_info *info /* OUT, or NULL */);

/* KVDEX_POOLING_MAX / KVDEX_POOLING_AVG are defined in <kvdex/kvdex_base.h>. */

typedef struct kvdex_retain_options {
  uint32_t budget;      /* tokens kept per KV head: 1 .. eligible tokens */
  uint32_t pool_window; /* odd width of the centred pooling window, 1..255; 0 = 1 (none) */
  int pooling;          /* KVDEX_POOLING_MAX or KVDEX_POOLING_AVG */
  uint32_t sinks;       /* tokens [0, sinks) are not candidates */
  uint32_t window;      /* nor the last `window` tokens */
  float scale;          /* logits = scale * q.k; 0 = 1/sqrt(head_dim) */
  int materialize;      /* 1: the selection becomes the layer's retained set (replacing
                           an older one; counted against the memory cap, freed with the
                           sequence), used by index "retained" of search and attend */
} kvdex_retain_options;

/* Retain (SnapKV / InfiniRetri selection) for `layer` of a sequence: q_obs holds n_obs
 * observation queries, f32 [n_obs][n_q_heads][head_dim] (e.g. the last prompt tokens'
 * queries). Eligible tokens E = [sinks, n - window). Each token t of E scores
 *   mass(t, g) = sum_obs sum_{h in KV group g} softmax_{t in E}(scale * q[obs][h] . k_t)
 * pooled (max or mean) over [t - w/2, t + w/2] clipped to E; the `budget` best per
 * KV head g (ties: lower id first) go to ids[g * budget ..] in ascending id order,
 * their pooled scores to scores (may be NULL). ids: n_kv_heads * budget entries.
 * Errors (nothing changed, ids/scores unspecified): KVDEX_EINVAL (layer out of range,
 * n_obs 0 or > 4096, non-finite query, budget 0 or > |E|, even pool_window > 0 or
 * > 255, unknown pooling, bad scale), KVDEX_ENOTFOUND, KVDEX_ENOMEM (materialize over
 * the memory cap: the older set is kept). */
int kvdex_retain(kvdex_db *db, const char *seq_id, uint32_t layer, const float *q_obs,
                 uint32_t n_obs, const kvdex_retain_options *opts, uint64_t *ids /* OUT */,
                 float *scores /* OUT, or NULL */);

/* kvdex_merge_partials (the LSE merge of two partial results) is declared in
 * <kvdex/kvdex_base.h>: index/attend.c and the remote client use the same one. */

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_KVDEX_H */
