/* gpu_worker_cmd: `kvdex gpu-worker` — parses the settings, opens the store, runs the
 * decode loop (gpu_worker.h) on the CUDA backend or, with --cpu, on the CPU twins, and
 * prints tokens/s, the time split per phase and the --check result. The loop itself
 * lives in gpu_worker.c; the CUDA backend in gpu_worker_cuda.c (its own binary).
 */
#include "workers/gpu_worker_cmd.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvstore/base.h"
#include "workers/client_opts.h"
#include "workers/cmd.h"
#include "workers/commands.h"
#include "workers/settings.h"

static const char USAGE[] =
    "usage: kvdex gpu-worker [--cpu] [options]\n\n"
    "A decode loop over a synthetic stack of layers, as an inference engine's GPU\n"
    "worker runs it: per step and layer it attends the tokens it holds (sinks + recent\n"
    "window, and with --s2-vert-stride the S2 shard of odd layers) on the GPU, asks the\n"
    "store's Attend for the rest, merges the two partials by LSE, appends the new\n"
    "token's K/V to the store, and reports tokens/s and the time per phase. --cpu runs\n"
    "the same loop on the kernels' CPU twins; without it the CUDA build is needed\n"
    "(bazel build //workers:kvdex_gpu_worker). --check compares every output with dense\n"
    "attention (f64); with --index dense it must match within --tolerance.\n"
    "Exit: 0 ok, 1 failure or --check over tolerance, 2 bad options, 3 no usable GPU.";

typedef struct report {
  const char *prog;
  uint32_t steps;
  int64_t every_ms;
  double last;
  int quiet;
} report;

static void on_progress(void *ctx, uint32_t step, const kvdex_gw_stats *st) {
  report *r = ctx;
  if (r->quiet || r->every_ms <= 0) return;
  double t = kvdex__now_s();
  if ((t - r->last) * 1000.0 < (double)r->every_ms && step + 1 != r->steps) return;
  r->last = t;
  fprintf(stderr, "%s: step %u/%u, %.1f tokens/s\n", r->prog, step + 1, r->steps,
          st->total_s > 0 ? st->steps_done / st->total_s : 0.0);
}

static double pct(double part, double total) { return total > 0 ? 100.0 * part / total : 0.0; }

int kvdex_gpu_worker_main(int argc, char **argv, const kvdex_gw_backend *gpu,
                          int (*gpu_available)(void), const char *prog) {
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(&s, KVDEX_CMD_GPU_WORKER, prog, USAGE, argc, argv);
  if (rc != KVDEX_CMD_RUN) return rc;
  int json = (int)kvdex_setting_num(&s, KVDEX_SET_JSON);
  int cpu = (int)kvdex_setting_num(&s, KVDEX_SET_GW_CPU);
  int keep = (int)kvdex_setting_num(&s, KVDEX_SET_GW_KEEP);
  double tol = kvdex_setting_real(&s, KVDEX_SET_GW_TOLERANCE);
  const char *uri = kvdex_setting_str(&s, KVDEX_SET_GW_URI);
  char seq_id[128];
  kvdex_gw_config cfg = {
      .seq_id = seq_id,
      .shape = {.n_layers = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_LAYERS),
                .n_kv_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_KV_HEADS),
                .n_q_heads = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_Q_HEADS),
                .head_dim = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_HEAD_DIM),
                .block_tokens = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_BLOCK_TOKENS),
                .dtype = (int)kvdex_setting_num(&s, KVDEX_SET_DTYPE)},
      .context = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_GW_CONTEXT),
      .steps = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_STEPS),
      .sinks = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GW_SINKS),
      .window = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GW_WINDOW),
      .k = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_K),
      .index = kvdex_setting_str(&s, KVDEX_SET_GW_INDEX),
      .seed = (uint64_t)kvdex_setting_num(&s, KVDEX_SET_SEED),
      .s2_vert_stride = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GW_S2_VERT_STRIDE),
      .s2_local_blocks = (uint32_t)kvdex_setting_num(&s, KVDEX_SET_GW_S2_LOCAL_BLOCKS),
      .check = (int)kvdex_setting_num(&s, KVDEX_SET_GW_CHECK),
  };
  const char *given_id = kvdex_setting_str(&s, KVDEX_SET_GW_SEQ);
  if (given_id[0]) snprintf(seq_id, sizeof seq_id, "%s", given_id);
  else
    snprintf(seq_id, sizeof seq_id, "gpu-worker-%ld-%llu", (long)getpid(),
             (unsigned long long)cfg.seed);
  int exit_code = 1;
  kvdex_db *db = NULL;
  int created = 0;
  kvdex_gw_stats st;
  memset(&st, 0, sizeof st);

  if (kvdex_gw_config_check(&cfg)) {
    fprintf(stderr, "%s: %s\n", prog, kvdex_errmsg());
    exit_code = 2;
    goto out;
  }
  if (!cfg.index[0]) {
    fprintf(stderr, "%s: --index is empty (exact, auto, graph, ivf, hnsw, landmark, dense)\n",
            prog);
    exit_code = 2;
    goto out;
  }
  const kvdex_gw_backend *be = kvdex_gw_twin_backend();
  if (!cpu) {
    if (!gpu) {
      fprintf(stderr,
              "%s: GPU mode needs the CUDA build of the worker, which this binary does not "
              "link: build and run kvdex_gpu_worker (bazel build //workers:kvdex_gpu_worker; "
              "bazel-bin/workers/kvdex_gpu_worker gpu-worker ...), or pass --cpu to run the same "
              "loop on the CPU twins\n",
              prog);
      exit_code = 2;
      goto out;
    }
    if (gpu_available && !gpu_available()) {
      fprintf(stderr,
              "%s: no usable CUDA device (no GPU, or no or too old a driver); pass --cpu to "
              "run on the CPU twins\n",
              prog);
      exit_code = 3;
      goto out;
    }
    be = gpu;
  }
  kvdex_open_opts oo;
  kvdex_client_opts(&s, &oo);
  if (kvdex_open(uri, &oo, &db)) {
    fprintf(stderr, "%s: cannot open %s: %s\n", prog, uri, kvdex_errmsg());
    exit_code = 2;
    goto out;
  }
  if (!json)
    printf("%s on %s, backend %s: %u layer(s) x %u kv heads x %u q heads x head_dim %u, %s, "
           "context %llu, %u steps; held: %u sinks + %u window + the new token%s; store: "
           "index %s%s\n",
           prog, uri, be->name, cfg.shape.n_layers, cfg.shape.n_kv_heads, cfg.shape.n_q_heads,
           cfg.shape.head_dim, kvdex_dtype_name(cfg.shape.dtype),
           (unsigned long long)cfg.context, cfg.steps, cfg.sinks, cfg.window,
           cfg.s2_vert_stride ? " (odd layers: S2 shard)" : "", cfg.index,
           strcmp(cfg.index, "dense") ? "" : " (every token outside sinks + window)");
  fflush(stdout);
  report rep = {.prog = prog, .steps = cfg.steps,
                .every_ms = kvdex_setting_num(&s, KVDEX_SET_GW_PROGRESS), .last = kvdex__now_s(),
                .quiet = json};
  rc = kvdex_gw_run(db, &cfg, be, on_progress, NULL, &rep, &st);
  created = st.created;
  if (rc) {
    fprintf(stderr, "%s: %s (after %u of %u steps)\n", prog, kvdex_errmsg(), st.steps_done,
            cfg.steps);
    goto out;
  }

  uint64_t want_tokens = cfg.context + cfg.steps;
  int tokens_ok = st.final_tokens == want_tokens;
  int dense = !strcmp(cfg.index, "dense");
  int check_ok = !cfg.check || !dense || st.max_rel_err <= tol;
  double per = st.total_s / cfg.steps * 1e3;
  double other = st.total_s - st.local_s - st.store_s - st.merge_s - st.append_s - st.gen_s;
  if (other < 0) other = 0;
  double net = st.store_s - st.store_cpu_s; /* network + queueing: kvdex_attend wall minus the
                                               store's own time */
  if (net < 0) net = 0;
  double tps = st.total_s > 0 ? cfg.steps / st.total_s : 0;
  if (json) {
    printf("{\"backend\":\"%s\",\"uri\":\"%s\",\"seq_id\":\"%s\",\"layers\":%u,\"kv_heads\":%u,"
           "\"q_heads\":%u,\"head_dim\":%u,\"dtype\":\"%s\",\"context\":%llu,\"steps\":%u,"
           "\"sinks\":%u,\"window\":%u,\"index\":\"%s\",\"k\":%u,\"s2_vert_stride\":%u,"
           "\"tokens_per_s\":%.3f,\"ms_per_step\":%.4f,\"local_ms\":%.4f,\"store_ms\":%.4f,"
           "\"store_cpu_ms\":%.4f,\"network_ms\":%.4f,"
           "\"merge_ms\":%.4f,\"append_ms\":%.4f,\"gen_ms\":%.4f,\"other_ms\":%.4f,"
           "\"prefill_s\":%.3f,\"load_s\":%.3f,\"store_attended\":%llu,\"local_attended\":%llu,"
           "\"local_bytes\":%llu,\"final_tokens\":%llu,\"expected_tokens\":%llu",
           be->name, uri, seq_id, cfg.shape.n_layers, cfg.shape.n_kv_heads, cfg.shape.n_q_heads,
           cfg.shape.head_dim, kvdex_dtype_name(cfg.shape.dtype), (unsigned long long)cfg.context,
           cfg.steps, cfg.sinks, cfg.window, cfg.index, cfg.k, cfg.s2_vert_stride, tps, per,
           st.local_s / cfg.steps * 1e3, st.store_s / cfg.steps * 1e3,
           st.store_cpu_s / cfg.steps * 1e3, net / cfg.steps * 1e3, st.merge_s / cfg.steps * 1e3, st.append_s / cfg.steps * 1e3,
           st.gen_s / cfg.steps * 1e3, other / cfg.steps * 1e3, st.prefill_s, st.load_s,
           (unsigned long long)st.store_attended, (unsigned long long)st.local_attended,
           (unsigned long long)st.local_bytes, (unsigned long long)st.final_tokens,
           (unsigned long long)want_tokens);
    if (cfg.check)
      printf(",\"checked\":%llu,\"max_rel_err\":%.6g,\"mean_rel_err\":%.6g,\"tolerance\":%g,"
             "\"check_asserted\":%s,\"check_ok\":%s",
             (unsigned long long)st.checked, st.max_rel_err, st.mean_rel_err, tol,
             dense ? "true" : "false", check_ok ? "true" : "false");
    printf("}\n");
  } else {
    int local = !strncmp(uri, "local:", 6);
    printf("prefill: %llu tokens x %u layer(s) appended to the store in %.3f s; held tokens "
           "read back (ReadKV) and loaded in %.3f s (%.1f MiB held at the end)\n",
           (unsigned long long)cfg.context, cfg.shape.n_layers, st.prefill_s, st.load_s,
           st.local_bytes / 1048576.0);
    printf("decode:  %u steps in %.3f s = %.2f tokens/s (%.3f ms per step, %u layer(s))\n",
           cfg.steps, st.total_s, tps, per, cfg.shape.n_layers);
    printf("split (ms per step, %% of decode time):\n");
    char lbl[80];
    snprintf(lbl, sizeof lbl, "local attention (%s)", be->name);
    printf("  %-40s %9.3f ms %5.1f%%\n", lbl, st.local_s / cfg.steps * 1e3,
           pct(st.local_s, st.total_s));
    printf("  %-40s %9.3f ms %5.1f%%\n", "store CPU attend (retrieval + attention)",
           st.store_cpu_s / cfg.steps * 1e3, pct(st.store_cpu_s, st.total_s));
    printf("  %-40s %9.3f ms %5.1f%%\n",
           local ? "store call overhead (in-process)" : "network + queueing (store calls)",
           net / cfg.steps * 1e3, pct(net, st.total_s));
    printf("  %-40s %9.3f ms %5.1f%%\n", "LSE merge", st.merge_s / cfg.steps * 1e3,
           pct(st.merge_s, st.total_s));
    printf("  %-40s %9.3f ms %5.1f%%\n", "append new K/V to the store",
           st.append_s / cfg.steps * 1e3, pct(st.append_s, st.total_s));
    printf("  %-40s %9.3f ms %5.1f%%\n", "generate q, k, v (the model)", st.gen_s / cfg.steps * 1e3,
           pct(st.gen_s, st.total_s));
    printf("  %-40s %9.3f ms %5.1f%%\n", "other", other / cfg.steps * 1e3,
           pct(other, st.total_s));
    printf("attended per step and q head: %.1f tokens locally, %.1f by the store (dense layers)\n",
           st.local_attended / (double)cfg.steps / cfg.shape.n_q_heads /
               (cfg.shape.n_layers - (cfg.s2_vert_stride ? cfg.shape.n_layers / 2 : 0)),
           st.store_attended / (double)cfg.steps / cfg.shape.n_q_heads /
               (cfg.shape.n_layers - (cfg.s2_vert_stride ? cfg.shape.n_layers / 2 : 0)));
    printf("store:   %llu tokens per layer after the run (context %llu + %u steps): %s\n",
           (unsigned long long)st.final_tokens, (unsigned long long)cfg.context, cfg.steps,
           tokens_ok ? "OK" : "MISMATCH");
    if (cfg.check) {
      if (dense)
        printf("check:   max relative error %.3g (mean %.3g) over %llu outputs vs dense attention "
               "(f64); tolerance %g: %s\n",
               st.max_rel_err, st.mean_rel_err, (unsigned long long)st.checked, tol,
               check_ok ? "PASS" : "FAIL");
      else
        printf("check:   max relative error %.3g (mean %.3g) over %llu outputs vs dense attention "
               "(f64); index %s top-%u: reported, not asserted\n",
               st.max_rel_err, st.mean_rel_err, (unsigned long long)st.checked, cfg.index, cfg.k);
    }
  }
  if (!tokens_ok)
    fprintf(stderr, "%s: the store holds %llu tokens per layer, expected %llu\n", prog,
            (unsigned long long)st.final_tokens, (unsigned long long)want_tokens);
  if (!check_ok)
    fprintf(stderr, "%s: --check failed: max relative error %.3g > tolerance %g\n", prog,
            st.max_rel_err, tol);
  exit_code = tokens_ok && check_ok ? 0 : 1;
out:
  if (created && !keep) {
    if (kvdex_delete(db, seq_id, NULL) && exit_code == 0)
      fprintf(stderr, "%s: delete %s: %s\n", prog, seq_id, kvdex_errmsg());
  } else if (created && keep && !json) {
    printf("kept:    sequence %s\n", seq_id);
  }
  kvdex_close(db);
  kvdex_settings_free(&s);
  return exit_code;
}

int kvdex_cmd_gpu_worker(int argc, char **argv) {
  return kvdex_gpu_worker_main(argc, argv, NULL, NULL, "kvdex gpu-worker");
}
