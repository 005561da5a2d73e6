/* local_unavailable.c — "local:" in //client:kvdex_remote, the build without the
 * embedded engine: kvdex_open("local:") fails with KVDEX_EUNIMPL and says which
 * library has it. //client:kvdex links local.c in its place.
 */
#include "client/client_int.h"

int kvdex__local_open(const kvdex_open_opts *opts, kvdex_db **out) {
  (void)opts;
  (void)out;
  return kvdex__seterr(KVDEX_EUNIMPL,
                       "local: needs the embedded engine, which this program was built "
                       "without; link //client:kvdex instead of //client:kvdex_remote");
}
