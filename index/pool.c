/* pool: a fixed set of worker threads, created once, that run batches of indexed
 * tasks for the exact scan (and anyone else who wants parallel-for). The caller of
 * kvdex_pool_run works on its own batch too; batches from concurrent callers queue
 * and share the workers. No work stealing, no futures, no resizing.
 *
 * Locking: pool->mu guards the batch queue, `stop`, and each batch's `done`,
 * `users` and `queued`; task indices are claimed with an atomic counter, outside it.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "index/index.h"

#define MAX_POOL_THREADS 4096

typedef struct pool_batch {
  kvdex_task_fn fn;
  void *ctx;
  size_t n;
  _Atomic size_t next; /* next unclaimed task index */
  size_t done;         /* tasks finished (mu) */
  unsigned users;      /* workers currently inside this batch (mu) */
  int queued;          /* still on the pool's queue (mu) */
  pthread_cond_t done_cv;
  struct pool_batch *link;
} pool_batch;

struct kvdex_pool {
  pthread_mutex_t mu;
  pthread_cond_t work_cv;
  pool_batch *head, *tail; /* batches that may still have unclaimed tasks (mu) */
  int stop;                /* (mu) */
  unsigned n_threads;
  pthread_t *threads;
};

typedef struct worker_arg {
  kvdex_pool *pool;
  unsigned index;
} worker_arg;

/* Set on pool threads: a task that calls kvdex_pool_run on its own pool runs the
 * nested batch inline instead of waiting for workers that may all be busy. */
static _Thread_local kvdex_pool *tl_pool;

/* Takes b off the queue. Runs with pool->mu held. */
static void do_unqueue(kvdex_pool *p, pool_batch *b) {
  pool_batch **pp = &p->head, *prev = NULL;
  while (*pp && *pp != b) {
    prev = *pp;
    pp = &(*pp)->link;
  }
  if (*pp) {
    *pp = b->link;
    if (p->tail == b) p->tail = prev;
  }
  b->queued = 0;
  b->link = NULL;
}

/* Claims and runs tasks of b until none is left; returns how many it ran. */
static size_t drain(pool_batch *b, unsigned worker) {
  size_t mine = 0;
  for (;;) {
    size_t i = atomic_fetch_add_explicit(&b->next, 1, memory_order_relaxed);
    if (i >= b->n) return mine;
    b->fn(b->ctx, i, worker);
    mine++;
  }
}

static void *worker_main(void *argp) {
  worker_arg *arg = argp;
  kvdex_pool *p = arg->pool;
  unsigned w = arg->index;
  free(arg);
  tl_pool = p;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->head && !p->stop) pthread_cond_wait(&p->work_cv, &p->mu);
    if (!p->head) break; /* stopping and nothing queued */
    pool_batch *b = p->head;
    b->users++;
    pthread_mutex_unlock(&p->mu);
    size_t mine = drain(b, w);
    pthread_mutex_lock(&p->mu);
    if (b->queued) do_unqueue(p, b); /* every task is claimed */
    b->done += mine;
    b->users--;
    if (b->done == b->n && b->users == 0) pthread_cond_signal(&b->done_cv);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

static void stop_and_join(kvdex_pool *p, unsigned started) {
  pthread_mutex_lock(&p->mu);
  p->stop = 1;
  pthread_cond_broadcast(&p->work_cv);
  pthread_mutex_unlock(&p->mu);
  for (unsigned i = 0; i < started; i++) pthread_join(p->threads[i], NULL);
}

int kvdex_pool_create(unsigned n_threads, kvdex_pool **out) {
  if (!out) return kvdex__seterr(KVDEX_EINVAL, "pool: NULL out");
  *out = NULL;
  if (n_threads == 0) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    n_threads = cpus > 0 ? (unsigned)cpus : 1;
  }
  if (n_threads > MAX_POOL_THREADS)
    return kvdex__seterr(KVDEX_EINVAL, "pool: %u threads (at most %d)", n_threads,
                         MAX_POOL_THREADS);
  kvdex_pool *p = calloc(1, sizeof *p);
  pthread_t *threads = calloc(n_threads, sizeof *threads);
  if (!p || !threads) {
    free(p);
    free(threads);
    return kvdex__seterr(KVDEX_ENOMEM, "pool: out of memory");
  }
  p->threads = threads;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->work_cv, NULL);
  /* Workers start with every signal blocked: signals belong to the host's threads. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  unsigned started = 0;
  int err = 0;
  for (; started < n_threads; started++) {
    worker_arg *arg = malloc(sizeof *arg);
    if (!arg) {
      err = ENOMEM;
      break;
    }
    arg->pool = p;
    arg->index = started;
    if ((err = pthread_create(&threads[started], NULL, worker_main, arg))) {
      free(arg);
      break;
    }
    char name[16];
    snprintf(name, sizeof name, "kvdex-pool-%u", started);
    pthread_setname_np(threads[started], name);
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  p->n_threads = started;
  if (err) {
    stop_and_join(p, started);
    kvdex_pool_destroy(p);
    return kvdex__seterr(KVDEX_ENOMEM, "pool: cannot start worker thread %u of %u: %s", started,
                         n_threads, strerror(err));
  }
  *out = p;
  return KVDEX_OK;
}

void kvdex_pool_destroy(kvdex_pool *pool) {
  if (!pool) return;
  if (!pool->stop) stop_and_join(pool, pool->n_threads);
  pthread_cond_destroy(&pool->work_cv);
  pthread_mutex_destroy(&pool->mu);
  free(pool->threads);
  free(pool);
}

unsigned kvdex_pool_size(const kvdex_pool *pool) { return pool ? pool->n_threads : 0; }

void kvdex_pool_run(kvdex_pool *pool, size_t n_tasks, kvdex_task_fn fn, void *ctx) {
  if (n_tasks == 0) return;
  if (!pool || pool->n_threads == 0 || n_tasks == 1 || tl_pool == pool) {
    for (size_t i = 0; i < n_tasks; i++) fn(ctx, i, 0);
    return;
  }
  pool_batch b = {.fn = fn, .ctx = ctx, .n = n_tasks, .queued = 1};
  atomic_init(&b.next, 0);
  pthread_cond_init(&b.done_cv, NULL);

  pthread_mutex_lock(&pool->mu);
  if (pool->tail) pool->tail->link = &b;
  else pool->head = &b;
  pool->tail = &b;
  /* The caller takes one task itself; wake at most one worker per other task. */
  if (n_tasks - 1 >= pool->n_threads) {
    pthread_cond_broadcast(&pool->work_cv);
  } else {
    for (size_t i = 0; i + 1 < n_tasks; i++) pthread_cond_signal(&pool->work_cv);
  }
  pthread_mutex_unlock(&pool->mu);

  size_t mine = drain(&b, pool->n_threads);

  pthread_mutex_lock(&pool->mu);
  if (b.queued) do_unqueue(pool, &b);
  b.done += mine;
  /* Workers may still be running tasks they claimed, or be about to notice that
   * nothing is left; b lives on this stack, so wait until none refers to it. */
  while (b.done < b.n || b.users > 0) pthread_cond_wait(&b.done_cv, &pool->mu);
  pthread_mutex_unlock(&pool->mu);
  pthread_cond_destroy(&b.done_cv);
}
