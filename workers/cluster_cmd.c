/* cluster_cmd: `kvdex cluster status|repair|rebalance` — the operator's view of a
 * cluster handle (client/kvdex.h, kvdex_cluster_*): which nodes are up, where each
 * sequence sits, and the two maintenance runs that put copies back where rendezvous
 * hashing wants them. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "client/kvdex.h"
#include "workers/client_opts.h"
#include "workers/cmd.h"
#include "workers/commands.h"
#include "workers/settings.h"

static void human_bytes(char *buf, size_t size, uint64_t b) {
  static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = (double)b;
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, u++;
  snprintf(buf, size, u ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static void print_report(const kvdex_cluster_report *r, int verify) {
  size_t up = 0, diverged = 0;
  for (size_t i = 0; i < r->n_nodes; i++) up += r->nodes[i].up != 0;
  for (size_t i = 0; i < r->n_seqs; i++) diverged += r->seqs[i].diverged != 0;
  printf("%zu nodes (%zu up), %zu sequences: %llu under-replicated, %llu misplaced", r->n_nodes,
         up, r->n_seqs, (unsigned long long)r->under_replicated, (unsigned long long)r->misplaced);
  if (verify) printf(", %zu with diverged replicas", diverged);
  if (r->lost) printf(", %llu lost (known to this client only)", (unsigned long long)r->lost);
  printf("\n\n%-28s %-5s %9s %9s %23s\n", "node", "state", "sequences", "importing",
         "bytes used / cap");
  for (size_t i = 0; i < r->n_nodes; i++) {
    const kvdex_cluster_node *n = &r->nodes[i];
    if (!n->up) {
      printf("%-28s %-5s %s\n", n->addr, "DOWN", n->error);
      continue;
    }
    char used[32], cap[32], both[72];
    human_bytes(used, sizeof used, n->bytes_used);
    if (n->bytes_cap)
      human_bytes(cap, sizeof cap, n->bytes_cap);
    else
      snprintf(cap, sizeof cap, "unlimited");
    snprintf(both, sizeof both, "%s / %s", used, cap);
    printf("%-28s %-5s %9llu %9llu %23s%s\n", n->addr, "up", (unsigned long long)n->sequences,
           (unsigned long long)n->importing, both, n->breaker_open ? "  (breaker open)" : "");
  }
  if (r->n_seqs == 0) return;
  printf("\n%-40s %10s %9s  %s\n", "sequence", "tokens", "owners ok", "owners | holders (tokens)");
  for (size_t i = 0; i < r->n_seqs; i++) {
    const kvdex_cluster_seq *q = &r->seqs[i];
    char name[340];
    snprintf(name, sizeof name, "%s/%s", q->ns, q->id);
    const char *flag = q->diverged                   ? "  DIVERGED"
                       : q->owners_ok < q->n_owners ? "  UNDER-REPLICATED"
                       : q->misplaced               ? "  MISPLACED"
                                                    : "";
    printf("%-40s %10llu %6u/%-2u  %s | %s%s\n", name, (unsigned long long)q->tokens, q->owners_ok,
           q->n_owners, q->owners, q->holders, flag);
  }
}

typedef struct progress_state {
  time_t last;
  char key[400];
} progress_state;

/* One line when a copy or delete starts, then at most one a second, then its end. */
static void on_progress(void *ctx, const kvdex_cluster_progress *p) {
  progress_state *ps = ctx;
  char key[400];
  snprintf(key, sizeof key, "%s %s/%s %s", p->action, p->ns, p->id, p->to ? p->to : "");
  time_t now = time(NULL);
  int first = strcmp(key, ps->key) != 0;
  int last = p->done_tokens == p->total_tokens;
  if (!first && !last && now == ps->last) return;
  snprintf(ps->key, sizeof ps->key, "%s", key);
  ps->last = now;
  if (!strcmp(p->action, "copy"))
    printf("[%zu/%zu] copy %s/%s %s -> %s: %llu/%llu tokens\n", p->seq_index + 1, p->n_seqs,
           p->ns, p->id, p->from, p->to, (unsigned long long)p->done_tokens,
           (unsigned long long)p->total_tokens);
  else if (!strcmp(p->action, "delete"))
    printf("[%zu/%zu] delete %s/%s on %s (no longer an owner)\n", p->seq_index + 1, p->n_seqs,
           p->ns, p->id, p->to);
  else
    printf("[%zu/%zu] skip %s/%s: no complete copy on a node that is up\n", p->seq_index + 1,
           p->n_seqs, p->ns, p->id);
  fflush(stdout);
}

int kvdex_cmd_cluster(int argc, char **argv) {
  static const char usage[] =
      "usage: kvdex cluster status|repair|rebalance --uri URI [options]\n\n"
      "URI: \"grpc://h1:port,h2:port,h3:port?replicas=2\" or \"dns:///name:port?replicas=2\"\n"
      "(grpcs:// or dns:///...&tls=1 for TLS).\n"
      "  status     nodes (up/down, sequences, bytes) and every sequence's owners and\n"
      "             holders over every namespace; --verify also compares replica checksums.\n"
      "             Exit 0 when every sequence has all its owners complete and every node\n"
      "             is up, 1 when not.\n"
      "  repair     copy each sequence to every owner that is up and lacks it or lags it\n"
      "             (e.g. a node restarted empty); copies are hidden until complete.\n"
      "  rebalance  after adding or removing nodes: repair, then delete the copies on\n"
      "             nodes that are no longer owners, once all owners hold the sequence.\n"
      "repair and rebalance print progress, can be interrupted and rerun (they resume),\n"
      "and exit 0 only when every sequence ends fully replicated on its owners.";
  if (argc < 2 || argv[1][0] == '-') {
    int help = argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"));
    if (help) {
      kvdex_settings s;
      char *args[] = {"cluster", "--help", NULL};
      return kvdex_cmd_preamble(&s, KVDEX_CMD_CLUSTER, "kvdex cluster", usage, 2, args);
    }
    fprintf(stderr, "%s\n", usage);
    return 2;
  }
  const char *action = argv[1];
  if (strcmp(action, "status") && strcmp(action, "repair") && strcmp(action, "rebalance")) {
    fprintf(stderr, "kvdex cluster: unknown action '%s' (status, repair or rebalance)\n", action);
    return 2;
  }
  char prog[64];
  snprintf(prog, sizeof prog, "kvdex cluster %s", action);
  kvdex_settings s;
  int rc = kvdex_cmd_preamble(&s, KVDEX_CMD_CLUSTER, prog, usage, argc - 1, argv + 1);
  if (rc != KVDEX_CMD_RUN) return rc;
  kvdex_open_opts oo;
  kvdex_client_opts(&s, &oo);
  const char *uri = kvdex_setting_str(&s, KVDEX_SET_URI);
  kvdex_db *db = NULL;
  int exit_code = 1;
  kvdex_cluster_report rep = {0};
  if (kvdex_open(uri, &oo, &db)) {
    fprintf(stderr, "%s: %s\n", prog, kvdex_errmsg());
    exit_code = 2;
    goto out;
  }
  int verify = (int)kvdex_setting_num(&s, KVDEX_SET_VERIFY);
  if (!strcmp(action, "status")) {
    rc = kvdex_cluster_status(db, verify, &rep);
    if (rc) {
      fprintf(stderr, "kvdex cluster status: %s\n", kvdex_errmsg());
      exit_code = rc == KVDEX_EINVAL ? 2 : 1;
      goto out;
    }
    print_report(&rep, verify);
    size_t down = 0, diverged = 0;
    for (size_t i = 0; i < rep.n_nodes; i++) down += !rep.nodes[i].up;
    for (size_t i = 0; i < rep.n_seqs; i++) diverged += rep.seqs[i].diverged != 0;
    exit_code = (down || rep.under_replicated || rep.misplaced || diverged) ? 1 : 0;
    goto out;
  }
  progress_state ps = {0};
  int move = !strcmp(action, "rebalance");
  rc = move ? kvdex_cluster_rebalance(db, on_progress, &ps, &rep)
            : kvdex_cluster_repair(db, on_progress, &ps, &rep);
  char bytes[32];
  human_bytes(bytes, sizeof bytes, rep.bytes_copied);
  printf("%s: %llu copied (%s of K/V), %llu deleted, %llu failed\n\n", action,
         (unsigned long long)rep.copied, bytes, (unsigned long long)rep.deleted,
         (unsigned long long)rep.failed);
  if (rep.n_nodes) print_report(&rep, 0);
  if (rc) {
    fprintf(stderr, "%s: %s\n", prog, kvdex_errmsg());
    exit_code = rc == KVDEX_EINVAL ? 2 : 1;
    goto out;
  }
  exit_code = 0;
out:
  kvdex_cluster_report_free(&rep);
  kvdex_close(db);
  kvdex_settings_free(&s);
  return exit_code;
}
