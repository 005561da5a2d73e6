/* client_opts: settings -> kvdex_open_opts for the client commands. */
#include "workers/client_opts.h"

#include <string.h>

void kvdex_client_opts(const kvdex_settings *s, kvdex_open_opts *oo) {
  memset(oo, 0, sizeof *oo);
  oo->timeout_ms = (uint32_t)kvdex_setting_num(s, KVDEX_SET_TIMEOUT_MS);
  oo->name_space = kvdex_setting_str(s, KVDEX_SET_NAMESPACE);
  const char *ca = kvdex_setting_str(s, KVDEX_SET_TLS_CA);
  const char *cert = kvdex_setting_str(s, KVDEX_SET_TLS_CLIENT_CERT);
  const char *key = kvdex_setting_str(s, KVDEX_SET_TLS_CLIENT_KEY);
  const char *token = kvdex_setting_str(s, KVDEX_SET_TOKEN);
  oo->tls_ca_file = ca && ca[0] ? ca : NULL;
  oo->tls_cert_file = cert && cert[0] ? cert : NULL;
  oo->tls_key_file = key && key[0] ? key : NULL;
  oo->auth_token = token && token[0] ? token : NULL;
}
