/* client_int.h — private to client/: the transport vtable behind kvdex_db.
 * kvdex.c validates every public argument that needs no shape knowledge and then
 * dispatches through db->vt; local.c (the embedded engine, //client:kvdex only),
 * grpc.c (one remote server) and cluster.c (many) implement it. Nothing here is
 * part of the public API.
 */
#ifndef KVDEX_CLIENT_INT_H
#define KVDEX_CLIENT_INT_H

#include <stddef.h>
#include <stdint.h>

#include "client/kvdex.h"
#include "kvstore/base.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvdex__vt kvdex__vt;

/* The common head of every transport's handle. A transport allocates its own
 * struct with this as the first member. */
struct kvdex_db {
  const kvdex__vt *vt;
  char ns[KVDEX_MAX_NAMESPACE + 1]; /* validated namespace, never empty */
};

/* The common head of every transport's appender. */
struct kvdex_appender {
  kvdex_db *db;
  kvdex_shape shape; /* the sequence's shape, known from begin on */
  int failed;        /* first failure code, 0 while healthy */
  char why[256];     /* kvdex_errmsg() of that failure, reported again by commit */
};

/* Arguments reach these functions already checked by kvdex.c: non-NULL pointers,
 * valid sequence ids, a valid shape for create, k in range, n_seqs > 0.
 * Every function sets kvdex_errmsg() on failure and changes no state then. */
struct kvdex__vt {
  const char *name; /* "local" or "grpc", used in messages */
  void (*close)(kvdex_db *db);
  int (*create)(kvdex_db *db, const char *seq_id, const kvdex_shape *shape);
  int (*del)(kvdex_db *db, const char *seq_id, uint64_t *bytes_freed /* OUT, or NULL */);
  int (*stat)(kvdex_db *db, const char *seq_id, kvdex_seq_info *info /* OUT */);
  /* *ids: n strings (malloc'd, as is the array), sorted by strcmp. */
  int (*list)(kvdex_db *db, char ***ids /* OUT */, size_t *n /* OUT */);
  /* Allocates the transport's appender and fills its head (db, shape). */
  int (*append_begin)(kvdex_db *db, const char *seq_id, kvdex_appender **out /* OUT */);
  /* layer < shape.n_layers, n_tokens > 0 and no overflow: checked by kvdex.c.
   * q: prefill queries [n_q_heads][n_tokens][head_dim], or NULL. landmarks: one per
   * block of shape.block_tokens ending in the range, [n_kv_heads][n_blocks][head_dim],
   * or NULL (kvdex.c passes NULL when n_blocks is 0). */
  int (*append_kv)(kvdex_appender *ap, uint32_t layer, uint64_t token_start, uint32_t n_tokens,
                   const void *k, const void *v, const void *q, const void *landmarks);
  /* Ends the stream and frees the appender whatever the result. */
  int (*append_commit)(kvdex_appender *ap, uint64_t *tokens_appended /* OUT, or NULL */);
  void (*append_abort)(kvdex_appender *ap);
  int (*read)(kvdex_db *db, const char *seq_id, uint32_t layer, const uint64_t *token_ids,
              size_t n, void *k_out, void *v_out);
  /* out[0..n_seqs) arrive zeroed; on failure they are left zeroed. req->index is
   * judged by the transport (the server, for grpc). */
  int (*search)(kvdex_db *db, uint32_t layer, const kvdex_search_req *req, size_t n_seqs,
                const char *const *seq_ids, const float *const *q, kvdex_search_out *out);
  /* spec non-empty; layer is checked by the transport (it needs the shape). */
  int (*build_index)(kvdex_db *db, const char *seq_id, uint32_t layer, const char *spec);
  /* n_items > 0, items' seq_id, q non-NULL, o[i], lse[i] non-NULL, k in range unless
   * dense, extras <= KVDEX_MAX_EXTRA_TOKENS: checked by kvdex.c. info: n_items
   * zeroed entries, or NULL. Shapes, layer, index, extras' values: the transport. */
  int (*attend)(kvdex_db *db, uint32_t layer, const kvdex_attend_options *opts, size_t n_items,
                const kvdex_attend_item *items, float *const *o, float *const *lse,
                kvdex_attend_info *info);
  /* q_obs, ids non-NULL, 1 <= n_obs <= 4096, budget > 0: checked by kvdex.c. */
  int (*retain)(kvdex_db *db, const char *seq_id, uint32_t layer, const float *q_obs,
                uint32_t n_obs, const kvdex_retain_options *opts, uint64_t *ids, float *scores);
};

/* Transport constructors. `target` is the grpc "host:port" (already validated).
 * kvdex__local_open is local.c's in //client:kvdex and local_unavailable.c's
 * (KVDEX_EUNIMPL) in //client:kvdex_remote. */
int kvdex__local_open(const kvdex_open_opts *opts, kvdex_db **out /* OUT */);
int kvdex__grpc_open(const char *target, int tls, const kvdex_open_opts *opts,
                     kvdex_db **out /* OUT */);

/* ---- grpc.c internals for the cluster transport (cluster.c) ---------------------------
 * These take the namespace explicitly: they serve every namespace, whatever the
 * handle's. */

/* The calling thread's overall deadline for the grpc calls it makes from now on
 * (CLOCK_MONOTONIC ms; 0 = none): each call's timeout is the handle's, cut to it. */
void kvdex__grpc_set_deadline(int64_t monotonic_ms);

/* One sequence as seen in a node's ListSequences. */
typedef struct kvdex__node_seq {
  char ns[KVDEX_MAX_NAMESPACE + 1];
  char id[KVDEX_MAX_SEQ_ID + 1];
  kvdex_shape shape;
  uint32_t n_layers;
  uint64_t *layer_tokens;   /* n_layers entries */
  uint64_t total_tokens;    /* sum over layers */
  uint64_t bytes;
  int importing;            /* hidden: a copy being imported */
} kvdex__node_seq;
typedef struct kvdex__node_list {
  kvdex__node_seq *seqs;
  size_t n;
  uint64_t bytes_used, bytes_cap;
} kvdex__node_list;
/* ListSequences of a grpc handle's node: ns "" = every namespace. */
int kvdex__grpc_list_node(kvdex_db *db, const char *ns, kvdex__node_list *out /* OUT */);
void kvdex__node_list_free(kvdex__node_list *l);
/* Deletes ns/seq_id on the handle's node (hidden or not); KVDEX_ENOTFOUND if absent. */
int kvdex__grpc_delete_ns(kvdex_db *db, const char *ns, const char *seq_id,
                          uint64_t *bytes_freed /* OUT, or NULL */);
/* Copies ns/seq_id from the node of `src` to the node of `dst` (both grpc handles).
 * On dst it is created hidden (importing) unless it exists there: a hidden copy is
 * resumed, a visible one with the same shape is brought up to date (repair), another
 * shape is KVDEX_ECONFLICT. Per layer, one AppendKV stream (committed per layer, so a
 * rerun resumes) gets the K/V dst lacks, streamed from a ReadKV of src, then the
 * layer's prefill queries and landmark keys, each re-sent with an identical replay of
 * its token so that dst keeps the same query sample and landmark blocks. Then every
 * BuildIndex spec of src is queued on dst (not waited for) and a hidden copy is
 * published. progress (may be NULL) gets the tokens copied so far and the total after
 * each message; *bytes_copied (may be NULL) the K/V bytes sent. */
typedef void (*kvdex__copy_progress_fn)(void *ctx, uint64_t done_tokens, uint64_t total_tokens);
int kvdex__grpc_copy_seq(kvdex_db *src, kvdex_db *dst, const char *ns, const char *seq_id,
                         kvdex__copy_progress_fn progress, void *ctx, uint64_t *bytes_copied);
/* A 64-bit checksum of the visible ns/seq_id: its shape, per-layer token counts and
 * every K and V byte in token order (read with ReadKV). Equal copies, equal sums. */
int kvdex__grpc_checksum(kvdex_db *db, const char *ns, const char *seq_id, uint64_t *sum /* OUT */);

/* Allocates out->heads as one block: the n_q_heads head array, then total_hits ids,
 * then total_hits scores; *ids and *scores point at those two arrays, which the
 * caller hands out to the heads in order. out->n_q_heads is set, the heads are
 * zeroed. KVDEX_ENOMEM with *out untouched on failure. kvdex_search_out_free
 * frees the block. */
int kvdex__search_out_alloc(kvdex_search_out *out, uint32_t n_q_heads, size_t total_hits,
                            uint64_t **ids /* OUT */, float **scores /* OUT */);

/* Sorts ids by strcmp (for list). */
void kvdex__sort_ids(char **ids, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_CLIENT_INT_H */
