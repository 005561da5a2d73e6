/* inspect: `kvdex inspect` — lists the sequences of a store (normally a server)
 * with their shape, committed tokens per layer and bytes, and below each sequence one
 * line per layer that has had a BuildIndex (state, index, memory, tokens covered). */
#include <stdio.h>
#include <string.h>

#include "client/kvdex.h"
#include "workers/client_opts.h"
#include "workers/cmd.h"
#include "workers/commands.h"
#include "workers/settings.h"

int kvdex_cmd_inspect(int argc, char **argv) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(&s, KVDEX_CMD_INSPECT, "kvdex inspect",
                              "usage: kvdex inspect --uri grpc://HOST:PORT [options]\n\n"
                              "Lists the sequences of a namespace with shape, tokens and bytes.",
                              argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  kvdex_open_opts oo;
  kvdex_client_opts(&s, &oo);
  kvdex_db *db = NULL;
  char **ids = NULL;
  size_t n = 0;
  int exit_code = 1;
  const char *uri = kvdex_setting_str(&s, KVDEX_SET_URI);
  if (!strncmp(uri, "local:", 6)) {
    /* An embedded store lives and dies with this process: nothing to inspect. */
    fprintf(stderr, "kvdex inspect: needs a server: --uri grpc://HOST:PORT (or KVDEX_URI)\n");
    kvdex_settings_free(&s);
    return 2;
  }
  if (kvdex_open(uri, &oo, &db) || kvdex_list(db, &ids, &n)) {
    fprintf(stderr, "kvdex inspect: %s: %s\n", uri, kvdex_errmsg());
    goto out;
  }
  printf("%zu sequence(s) in namespace %s at %s\n", n, kvdex_setting_str(&s, KVDEX_SET_NAMESPACE), uri);
  if (n) printf("%-32s %6s %8s %7s %8s %5s %6s %12s %12s\n", "sequence", "layers", "kv_heads",
                "q_heads", "head_dim", "dtype", "block", "tokens[0]", "bytes");
  for (size_t i = 0; i < n; i++) {
    kvdex_seq_info info = {0};
    if (kvdex_stat(db, ids[i], &info)) { /* deleted meanwhile: say so, go on */
      printf("%-32s (%s)\n", ids[i], kvdex_errmsg());
      continue;
    }
    printf("%-32s %6u %8u %7u %8u %5s %6u %12llu %12llu\n", ids[i], info.shape.n_layers,
           info.shape.n_kv_heads, info.shape.n_q_heads, info.shape.head_dim,
           kvdex_dtype_name(info.shape.dtype), info.shape.block_tokens,
           (unsigned long long)(info.n_layers ? info.layer_tokens[0] : 0),
           (unsigned long long)info.bytes);
    static const char *const states[] = {"none", "building", "ready", "failed"};
    for (uint32_t j = 0; j < info.n_indexes; j++) {
      const kvdex_layer_index *li = &info.indexes[j];
      printf("  layer %-5u index %-8s %s  %llu bytes, %llu tokens, %.2f s%s%s\n", li->layer,
             states[li->state & 3], li->describe[0] ? li->describe : li->spec,
             (unsigned long long)li->memory_bytes, (unsigned long long)li->tokens,
             li->build_seconds, li->error[0] ? "  error: " : "", li->error);
    }
    kvdex_seq_info_free(&info);
  }
  exit_code = 0;
out:
  kvdex_list_free(ids, n);
  kvdex_close(db);
  kvdex_settings_free(&s);
  return exit_code;
}
