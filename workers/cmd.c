/* cmd: the preamble shared by the `kvdex` subcommands (cmd.h). */
#include "workers/cmd.h"

#include <stdio.h>

#include "kvstore/base.h"

int kvdex_cmd_preamble(kvdex_settings *s, unsigned cmd, const char *prog, const char *usage,
                       int argc, char **argv) {
  int rc = kvdex_settings_parse(s, cmd, usage, argc, argv, stdout);
  if (rc == 1) return 0; /* --help printed */
  if (rc) {
    fprintf(stderr, "%s: %s\n", prog, kvdex_errmsg());
    return 2;
  }
  kvdex_log_configure((int)kvdex_setting_num(s, KVDEX_SET_LOG_LEVEL), NULL, NULL);
  return KVDEX_CMD_RUN;
}
