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

#endif /* KVDEX_COMMANDS_H */
