/* faiss_shim.h — private to index/: the one function faiss_c_shim.cc adds beyond
 * the official FAISS C API subset it implements. FAISS keeps its distance-computation
 * counters in process-wide globals that the C API does not expose for HNSW.
 */
#ifndef KVDEX_FAISS_SHIM_H
#define KVDEX_FAISS_SHIM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Reads FAISS's cumulative distance counters: faiss::indexIVF_stats.ndis (keys
 * scored in the probed lists) and, for HNSW, faiss::hnsw_stats.n3 + ndis (FAISS
 * 1.7.x counts level-0 distance computations in n3; the greedy descent through
 * the upper levels is not counted). Either pointer may be NULL. The counters are plain
 * globals updated at the end of each search, so a caller that wants per-search
 * deltas must serialise searches (index/faiss.c does, under its mutex). */
void kvdex_faiss_stats(uint64_t *ivf_ndis, uint64_t *hnsw_ndis);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_FAISS_SHIM_H */
