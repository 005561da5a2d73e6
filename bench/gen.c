/* gen: the out-of-distribution generator (see gen.h for the model). */
#include "bench/gen.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvstore/base.h"


static double unif(uint64_t *s) { return ((kvdex__splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static float gauss(uint64_t *s) { /* Box-Muller */
  double u = unif(s), v = unif(s);
  return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static void rand_unit(uint64_t *s, float *v, uint32_t d) {
  double n = 0;
  for (uint32_t i = 0; i < d; i++) {
    v[i] = gauss(s);
    n += (double)v[i] * v[i];
  }
  float inv = (float)(1.0 / sqrt(n));
  for (uint32_t i = 0; i < d; i++) v[i] *= inv;
}

void kvdex_gen_defaults(kvdex_gen_opts *o) {
  if (!o->dim) o->dim = 128;
  if (!o->topics) o->topics = (uint32_t)(o->n_keys / 256 > 16 ? o->n_keys / 256 : 16);
  if (!o->span) o->span = 64;
  if (o->key_offset == 0) o->key_offset = 4;
  if (o->query_offset == 0) o->query_offset = 4;
  if (o->query_scale == 0) o->query_scale = 2.5f;
  if (o->query_noise == 0) o->query_noise = 0.15f;
  if (o->noise == 0) o->noise = 1;
  if (o->drift == 0) o->drift = 1;
  if (o->heavy_frac == 0) o->heavy_frac = 0.0005f;
}

void kvdex_gen_free(kvdex_gen_data *d) {
  if (!d) return;
  free(d->keys);
  free(d->values);
  free(d->train);
  free(d->test);
  free(d->needle_pos);
  free(d->needle_query);
  memset(d, 0, sizeof *d);
}

/* One query: a mix of 1-2 topic centres, the query offset, noise. */
static void make_query(const kvdex_gen_opts *o, uint64_t *s, const float *centres,
                       const float *qoff, const float *heavy_dir, float *q) {
  uint32_t d = o->dim;
  uint32_t t1 = (uint32_t)(kvdex__splitmix64(s) % o->topics), t2 = (uint32_t)(kvdex__splitmix64(s) % o->topics);
  float w2 = (float)unif(s) * 0.5f;
  for (uint32_t i = 0; i < d; i++)
    q[i] = o->query_scale * (centres[(size_t)t1 * d + i] + w2 * centres[(size_t)t2 * d + i]) +
           o->query_offset * qoff[i] + 0.6f * heavy_dir[i] + o->query_noise * gauss(s);
}

int kvdex_gen(const kvdex_gen_opts *in, kvdex_gen_data *out) {
  memset(out, 0, sizeof *out);
  kvdex_gen_opts o = *in;
  kvdex_gen_defaults(&o);
  if (!o.n_keys || o.dim < 2 || o.dim > 4096)
    return kvdex__seterr(KVDEX_EINVAL, "gen: need n_keys > 0 and 2 <= dim <= 4096");
  if (o.n_needles && o.n_needles > o.n_test)
    return kvdex__seterr(KVDEX_EINVAL, "gen: %u needles need at least as many test queries",
                         o.n_needles);
  uint32_t d = o.dim;
  uint64_t s = o.seed * 0x2545f4914f6cdd1dull + 1;
  size_t kn = (size_t)o.n_keys * d;
  float *centres = malloc((size_t)o.topics * d * sizeof(float));
  float *koff = malloc(d * sizeof(float)), *qoff = malloc(d * sizeof(float));
  float *heavy = malloc(d * sizeof(float)), *rot1 = malloc(d * sizeof(float)),
        *rot2 = malloc(d * sizeof(float));
  out->keys = malloc(kn * sizeof(float));
  out->values = malloc(kn * sizeof(float));
  out->train = malloc(((size_t)o.n_train * d + 1) * sizeof(float));
  out->test = malloc(((size_t)o.n_test * d + 1) * sizeof(float));
  out->needle_pos = calloc(o.n_needles + 1, sizeof(uint64_t));
  out->needle_query = calloc(o.n_needles + 1, sizeof(uint32_t));
  int rc = 0;
  if (!centres || !koff || !qoff || !heavy || !rot1 || !rot2 || !out->keys || !out->values ||
      !out->train || !out->test || !out->needle_pos || !out->needle_query) {
    rc = kvdex__seterr(KVDEX_ENOMEM, "gen: out of memory for %llu keys x %u",
                       (unsigned long long)o.n_keys, d);
    goto done;
  }
  for (uint32_t t = 0; t < o.topics; t++) {
    rand_unit(&s, centres + (size_t)t * d, d);
    for (uint32_t i = 0; i < d; i++) centres[(size_t)t * d + i] *= 1.5f;
  }
  rand_unit(&s, koff, d);
  rand_unit(&s, qoff, d);
  rand_unit(&s, heavy, d);
  rand_unit(&s, rot1, d);
  rand_unit(&s, rot2, d);

  /* Keys: topic runs of geometric length around `span`. */
  uint32_t topic = 0;
  uint64_t run_left = 0;
  for (uint64_t t = 0; t < o.n_keys; t++) {
    if (!run_left) {
      topic = (uint32_t)(kvdex__splitmix64(&s) % o.topics);
      run_left = 1 + (uint64_t)(-log(unif(&s)) * o.span);
    }
    run_left--;
    float *k = out->keys + t * d;
    double phase = 6.283185307179586 * (double)t / (double)(o.n_keys + 1);
    float c = (float)cos(phase) * o.drift, sn = (float)sin(phase) * o.drift;
    int is_heavy = unif(&s) < o.heavy_frac;
    for (uint32_t i = 0; i < d; i++) {
      k[i] = centres[(size_t)topic * d + i] + o.key_offset * koff[i] + c * rot1[i] + sn * rot2[i] +
             o.noise * 0.35f * gauss(&s);
      if (is_heavy) k[i] += 3.0f * heavy[i];
    }
    float *v = out->values + t * d;
    for (uint32_t i = 0; i < d; i++) v[i] = gauss(&s);
  }
  for (uint32_t j = 0; j < o.n_train; j++) make_query(&o, &s, centres, qoff, heavy, out->train + (size_t)j * d);
  for (uint32_t j = 0; j < o.n_test; j++) make_query(&o, &s, centres, qoff, heavy, out->test + (size_t)j * d);

  /* Needles: depth i/(n-1) of the context; the key is the part of its query
   * orthogonal to the other needles' queries, scaled to beat the best existing score
   * by a wide margin. Orthogonal, so a needle scores 0 on the other needle queries:
   * planting one never pushes an earlier one out of first place. */
  if (o.n_needles) {
    uint32_t nn = o.n_needles;
    double *basis = malloc((size_t)nn * d * sizeof(double)), *u = malloc(d * sizeof(double));
    if (!basis || !u) {
      free(basis);
      free(u);
      rc = kvdex__seterr(KVDEX_ENOMEM, "gen: out of memory for needles");
      goto done;
    }
    for (uint32_t i = 0; i < nn; i++) {
      uint64_t pos = nn == 1 ? o.n_keys / 2
                             : (uint64_t)((double)i / (nn - 1) * (double)(o.n_keys - 1));
      uint32_t qi = i * (o.n_test / nn);
      const float *q = out->test + (size_t)qi * d;
      /* Orthonormal basis of the other needles' queries (Gram-Schmidt). */
      uint32_t nb = 0;
      for (uint32_t j = 0; j < nn; j++) {
        if (j == i) continue;
        const float *qj = out->test + (size_t)(j * (o.n_test / nn)) * d;
        double *b = basis + (size_t)nb * d, nrm = 0;
        for (uint32_t k = 0; k < d; k++) b[k] = qj[k];
        for (uint32_t c = 0; c < nb; c++) {
          double dot = 0;
          for (uint32_t k = 0; k < d; k++) dot += b[k] * basis[(size_t)c * d + k];
          for (uint32_t k = 0; k < d; k++) b[k] -= dot * basis[(size_t)c * d + k];
        }
        for (uint32_t k = 0; k < d; k++) nrm += b[k] * b[k];
        if (nrm < 1e-12) continue; /* dependent: adds nothing */
        nrm = 1.0 / sqrt(nrm);
        for (uint32_t k = 0; k < d; k++) b[k] *= nrm;
        nb++;
      }
      for (uint32_t k = 0; k < d; k++) u[k] = q[k];
      for (uint32_t c = 0; c < nb; c++) {
        double dot = 0;
        for (uint32_t k = 0; k < d; k++) dot += u[k] * basis[(size_t)c * d + k];
        for (uint32_t k = 0; k < d; k++) u[k] -= dot * basis[(size_t)c * d + k];
      }
      double best = -INFINITY, qu = 0;
      for (uint64_t t = 0; t < o.n_keys; t++) {
        double sc = 0;
        for (uint32_t k = 0; k < d; k++) sc += (double)q[k] * out->keys[t * d + k];
        if (sc > best) best = sc;
      }
      for (uint32_t k = 0; k < d; k++) qu += (double)q[k] * u[k]; /* = |u|^2 */
      double target = fabs(best) * 1.5 + 10.0;
      for (uint32_t k = 0; k < d; k++) out->keys[pos * d + k] = (float)(u[k] * target / qu);
      out->needle_pos[i] = pos;
      out->needle_query[i] = qi;
    }
    free(basis);
    free(u);
  }
done:
  free(centres);
  free(koff);
  free(qoff);
  free(heavy);
  free(rot1);
  free(rot2);
  if (rc) kvdex_gen_free(out);
  return rc;
}
