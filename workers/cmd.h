/* cmd: the preamble every `kvdex` subcommand begins with — read its settings
 * (defaults, KVDEX_* environment, flags), answer --help, report a bad option, set the
 * log level — so that all of them behave alike and each begins with one call. What a
 * command does with its settings, and the exit codes of its own failures, stay its own.
 */
#ifndef KVDEX_CMD_H
#define KVDEX_CMD_H

#include "workers/settings.h"

/* kvdex_cmd_preamble's answer when the command should go on with its settings. */
#define KVDEX_CMD_RUN (-1)

/* Parses the settings of subcommand `cmd` (a KVDEX_CMD_* bit) from argv (argv[0] is
 * the subcommand name) as kvdex_settings_parse does; prints --help (first line
 * `usage`) to stdout, or a bad option as "PROG: MESSAGE" to stderr; then sets the
 * log level from --log-level / KVDEX_LOG_LEVEL. Returns KVDEX_CMD_RUN when the
 * command should go on, with *s filled (the caller frees it with kvdex_settings_free);
 * otherwise the process exit code to return at once, with nothing to free: 0 after
 * --help, 2 after a bad option or value. */
int kvdex_cmd_preamble(kvdex_settings *s /* OUT */, unsigned cmd, const char *prog,
                       const char *usage, int argc, char **argv);

#endif /* KVDEX_CMD_H */
