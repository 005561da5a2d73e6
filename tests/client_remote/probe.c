/* probe: a small program of the public C API, built twice by this package's BUILD:
 * against //client:kvdex_remote (remote_probe) and //client:kvdex (full_probe).
 * client_remote_test.py inspects both binaries and runs them.
 *
 *   probe local            kvdex_open("local:")
 *   probe grpc HOST:PORT   kvdex_open("grpc://HOST:PORT") and the first call (list)
 *
 * Prints one line: the result's code name (OK, EUNIMPL, EUNAVAIL, ... or the number),
 * a tab, and kvdex_errmsg() (empty on success). Exits 0 whenever it could run.
 */
#include <stdio.h>
#include <string.h>

#include <kvdex/kvdex.h>

static const char *code_name(int rc) {
  switch (rc) {
    case KVDEX_OK: return "OK";
    case KVDEX_EINVAL: return "EINVAL";
    case KVDEX_ETIMEDOUT: return "ETIMEDOUT";
    case KVDEX_EUNAVAIL: return "EUNAVAIL";
    case KVDEX_EUNIMPL: return "EUNIMPL";
    case KVDEX_EINTERNAL: return "EINTERNAL";
    default: return NULL;
  }
}

static int report(int rc) {
  const char *name = code_name(rc);
  if (name)
    printf("%s\t%s\n", name, rc ? kvdex_errmsg() : "");
  else
    printf("%d\t%s\n", rc, kvdex_errmsg());
  return 0;
}

int main(int argc, char **argv) {
  kvdex_db *db = NULL;
  if (argc == 2 && !strcmp(argv[1], "local")) {
    int rc = kvdex_open("local:", NULL, &db);
    kvdex_close(db);
    return report(rc);
  }
  if (argc == 3 && !strcmp(argv[1], "grpc")) {
    char uri[300];
    snprintf(uri, sizeof uri, "grpc://%s", argv[2]);
    kvdex_open_opts opts = {0};
    opts.timeout_ms = 10000;
    int rc = kvdex_open(uri, &opts, &db);
    if (rc == KVDEX_OK) {
      char **ids = NULL;
      size_t n = 0;
      rc = kvdex_list(db, &ids, &n);
      if (rc == KVDEX_OK) kvdex_list_free(ids, n);
    }
    kvdex_close(db);
    return report(rc);
  }
  fprintf(stderr, "usage: probe local | probe grpc HOST:PORT\n");
  return 2;
}
