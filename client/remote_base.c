/* remote_base.c — in //client:kvdex_remote only: the three functions of the client
 * core whose one definition still sits in a library this build must not link:
 * kvdex_shape_check and kvdex_name_check (kvstore/kvstore.c, which brings the store
 * and jemalloc) and the LSE merge behind kvdex_merge_partials (index/attend.c, which
 * brings the index). Same code, same messages. When the checks move to
 * //kvstore:base and the merge to a store-free index target, this file goes and
 * merge.c serves both libraries. //client:kvdex links the originals instead.
 */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "client/client_int.h"

void kvdex_merge_partials(const float *o_a, float lse_a, const float *o_b, float lse_b,
                          uint32_t d, float *o_out, float *lse_out) {
  if (isnan(lse_a) || isnan(lse_b) || lse_a == INFINITY || lse_b == INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = NAN;
    *lse_out = NAN;
    return;
  }
  double m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = 0.0f;
    *lse_out = -INFINITY;
    return;
  }
  double ea = exp(lse_a - m), eb = exp(lse_b - m), sum = ea + eb;
  float wa = (float)(ea / sum), wb = (float)(eb / sum);
  /* Element-wise, so o_out may be either input; an empty side is not read. */
  if (lse_b == -INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = wa * o_a[c];
  } else if (lse_a == -INFINITY) {
    for (uint32_t c = 0; c < d; c++) o_out[c] = wb * o_b[c];
  } else {
    for (uint32_t c = 0; c < d; c++) o_out[c] = wa * o_a[c] + wb * o_b[c];
  }
  *lse_out = (float)(m + log(sum));
}
