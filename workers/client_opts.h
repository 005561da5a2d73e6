/* client_opts: the connection options of the client commands (demo, inspect, cluster,
 * gpu-worker) from their settings: --timeout, --namespace, --tls-ca,
 * --tls-client-cert, --tls-client-key and --token (KVDEX_TOKEN). */
#ifndef KVDEX_CLIENT_OPTS_H
#define KVDEX_CLIENT_OPTS_H

#include "client/kvdex.h"
#include "workers/settings.h"

/* Fills *oo; its strings point into the settings, which must outlive it. Empty
 * strings become NULL (no CA file = the system roots, no token, ...). */
void kvdex_client_opts(const kvdex_settings *s, kvdex_open_opts *oo /* OUT */);

#endif /* KVDEX_CLIENT_OPTS_H */
