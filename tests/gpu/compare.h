/* GPU kernel vs CPU twin on the same random problem (problems.h): each tc_X copies
 * the problem to the device, runs kvdex_gpu_X and kvdex_twin_X, and reports the
 * largest relative difference. Shared by the gtest GPU tests and the check driver
 * (which must build without gtest). Needs a usable device. Plain C (test code).
 */
#ifndef KVDEX_TESTS_GPU_COMPARE_H
#define KVDEX_TESTS_GPU_COMPARE_H

#include "tests/gpu/problems.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tc_result {
  double err;      /* max |gpu - twin| / max |twin| over the main output */
  double err_lse;  /* max |gpu - twin| of lse (inf if the -inf entries differ); topk:
                      fraction of ranks whose index differs (ties may swap) */
  char msg[256];   /* on failure: which call failed and kvdex_errmsg() */
} tc_result;

/* Each returns 0, or the failing call's KVDEX_E* code (message in r->msg). */
int tc_sparse_decode(const tp_decode_cfg *c, uint64_t seed, tc_result *r);
int tc_s2_decode(const tp_decode_cfg *c, uint64_t seed, tc_result *r); /* c->s2 set */
int tc_lse_merge(uint32_t n_parts, uint32_t n_rows, uint32_t head_dim, uint64_t seed,
                 tc_result *r);
int tc_s2_prefill(const kvdex_s2_params *s2, uint32_t n_kv_heads, uint32_t seq,
                  uint32_t head_dim, int dtype, uint64_t seed, tc_result *r);
int tc_block_topk(uint32_t batch, uint32_t n_q_heads, uint32_t n_kv_heads, uint32_t head_dim,
                  uint32_t rep_cap, uint32_t k, uint64_t seed, tc_result *r);

/* The tolerance the issue sets for kernel vs twin. */
#define TC_TOL 1e-2

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_TESTS_GPU_COMPARE_H */
