/* commands: the subcommands of the `kvdex` binary. Each parses its own settings
 * (workers/settings.h) and returns a process exit code. */
#ifndef KVDEX_COMMANDS_H
#define KVDEX_COMMANDS_H

int kvdex_cmd_serve(int argc, char **argv);
int kvdex_cmd_demo(int argc, char **argv);
int kvdex_cmd_bench(int argc, char **argv);
int kvdex_cmd_inspect(int argc, char **argv);
int kvdex_cmd_gen(int argc, char **argv);
int kvdex_cmd_cluster(int argc, char **argv);
/* gpu_worker_cmd.c: the decode loop on the CPU twins (--cpu); no CUDA linked. */
int kvdex_cmd_gpu_worker(int argc, char **argv);

/* The client connection options of a client command's settings: --timeout,
 * --namespace, --tls-ca, --tls-client-cert, --tls-client-key, --token. The strings
 * point into the settings. */
struct kvdex_settings;
struct kvdex_open_opts;
void kvdex_cmd_client_opts(const struct kvdex_settings *s, struct kvdex_open_opts *oo /* OUT */);

#endif /* KVDEX_COMMANDS_H */
