/* gpu_worker_cmd: the `kvdex gpu-worker` command around the decode loop of
 * gpu_worker.h — settings, connecting to the store, the report (tokens/s and the time
 * split), --check. Shared by the `kvdex` binary (CPU twins only, no CUDA linked) and
 * //workers:kvdex_gpu_worker (the same command on the CUDA kernels).
 */
#ifndef KVDEX_GPU_WORKER_CMD_H
#define KVDEX_GPU_WORKER_CMD_H

#include "workers/gpu_worker.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Runs the command (argv[0] is the subcommand name). gpu: the CUDA backend, or NULL
 * in a build without CUDA (then only --cpu runs; otherwise it says which binary to
 * use, exit 2). gpu_available: says whether a device is usable (NULL: assume yes).
 * prog: the name used in messages. Returns the exit code: 0 ok, 1 failure (or --check
 * over tolerance), 2 bad options, 3 no usable GPU. */
int kvdex_gpu_worker_main(int argc, char **argv, const kvdex_gw_backend *gpu,
                          int (*gpu_available)(void), const char *prog);

#ifdef __cplusplus
}
#endif
#endif /* KVDEX_GPU_WORKER_CMD_H */
