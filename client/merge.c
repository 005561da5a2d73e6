/* merge.c — kvdex_merge_partials in //client:kvdex: the LSE merge of index/attend.c,
 * the same one the server and "local:" use for their own partials.
 */
#include "client/kvdex.h"
#include "index/attend.h"

void kvdex_merge_partials(const float *o_a, float lse_a, const float *o_b, float lse_b,
                          uint32_t d, float *o_out, float *lse_out) {
  kvdex_attend_merge(o_a, lse_a, o_b, lse_b, d, o_out, lse_out);
}
