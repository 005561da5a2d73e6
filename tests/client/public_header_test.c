/* The installed public header stands alone: a C11 program that includes only
 * <kvdex/kvdex.h> compiles with -Werror, sees none of kvdex's internals, and can use
 * the whole handle life cycle (open, create, stat, delete, close) with kvdex_errmsg(). */
#include <kvdex/kvdex.h>

#include <stdio.h>
#include <string.h>

#ifdef KVDEX_LOG
#error "kvdex.h leaks the internal KVDEX_LOG macro"
#endif
#ifdef KVDEX_BASE_H
#error "kvdex.h includes the internal kvstore/base.h"
#endif
#ifdef KVDEX_KVSTORE_H
#error "kvdex.h includes kvstore/kvstore.h"
#endif

static int failures;
#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      failures++;                                                     \
    }                                                                 \
  } while (0)

int main(void) {
  kvdex_db *db = NULL;
  CHECK(kvdex_open("local:", NULL, &db) == KVDEX_OK);
  if (!db) return 1;
  kvdex_shape shape = {.n_layers = 2, .n_kv_heads = 2, .n_q_heads = 4, .head_dim = 8,
                       .block_tokens = 0, .dtype = KVDEX_DTYPE_F16};
  CHECK(kvdex_create(db, "s", &shape) == KVDEX_OK);
  int rc = kvdex_create(db, "s", &shape);
  CHECK(rc == KVDEX_EEXIST);
  CHECK(strstr(kvdex_errmsg(), "s") != NULL);
  CHECK(strcmp(kvdex_errname(rc), "KVDEX_EEXIST") == 0);
  kvdex_seq_info info;
  CHECK(kvdex_stat(db, "s", &info) == KVDEX_OK);
  CHECK(info.shape.n_layers == 2 && info.shape.dtype == KVDEX_DTYPE_F16);
  kvdex_seq_info_free(&info);
  CHECK(kvdex_delete(db, "s", NULL) == KVDEX_OK);
  CHECK(kvdex_stat(db, "s", &info) == KVDEX_ENOTFOUND);
  kvdex_close(db);
  kvdex_close(NULL);
  kvdex_log_configure(KVDEX_LOG_WARN, NULL, NULL);
  printf("%s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
