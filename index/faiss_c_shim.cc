// faiss_c_shim: the subset of FAISS's official C API (declared in
// <faiss/c_api/*.h>) that index/faiss.c calls, implemented over the C++ classes,
// because Debian's FAISS 1.7.3 ships the headers but not libfaiss_c. Every entry
// point catches exceptions into FAISS's error codes (0 ok, -2 FAISS exception, -4
// std exception, -1 anything else) and keeps the message for
// faiss_get_last_error() per thread, as upstream's c_api does. Nothing here
// prints. Plus kvdex_faiss_stats (faiss_shim.h): the distance counters the C API
// lacks. Build this only where the system FAISS has no libfaiss_c.
#include <faiss/AutoTune.h>
#include <faiss/Index.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIVF.h>
#include <faiss/impl/FaissException.h>
#include <faiss/impl/HNSW.h>
#include <faiss/impl/io.h>
#include <faiss/index_factory.h>
#include <faiss/index_io.h>

#include <cstdio>
#include <exception>
#include <string>

extern "C" {
#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>
}

#include "index/faiss_shim.h"

namespace {

thread_local std::string last_error;

faiss::Index *I(FaissIndex *p) { return reinterpret_cast<faiss::Index *>(p); }
const faiss::Index *I(const FaissIndex *p) { return reinterpret_cast<const faiss::Index *>(p); }

// Runs f, turning exceptions into the C API's codes and remembering the message.
template <typename F>
int guarded(F &&f) {
  try {
    f();
    return 0;
  } catch (faiss::FaissException &e) {
    last_error = e.what();
    return -2;
  } catch (std::exception &e) {
    last_error = e.what();
    return -4;
  } catch (...) {
    last_error = "Unknown error";
    return -1;
  }
}

}  // namespace

extern "C" {

const char *faiss_get_last_error() { return last_error.empty() ? nullptr : last_error.c_str(); }

// ---- Index_c.h ----
void faiss_Index_free(FaissIndex *obj) { delete I(obj); }
int faiss_Index_d(const FaissIndex *obj) { return I(obj)->d; }
int faiss_Index_is_trained(const FaissIndex *obj) { return I(obj)->is_trained; }
idx_t faiss_Index_ntotal(const FaissIndex *obj) { return I(obj)->ntotal; }
FaissMetricType faiss_Index_metric_type(const FaissIndex *obj) {
  return static_cast<FaissMetricType>(I(obj)->metric_type);
}

int faiss_Index_train(FaissIndex *index, idx_t n, const float *x) {
  return guarded([&] { I(index)->train(n, x); });
}

int faiss_Index_add(FaissIndex *index, idx_t n, const float *x) {
  return guarded([&] { I(index)->add(n, x); });
}

int faiss_Index_search(const FaissIndex *index, idx_t n, const float *x, idx_t k,
                       float *distances, idx_t *labels) {
  return guarded([&] {
    I(index)->search(n, x, k, distances, reinterpret_cast<faiss::Index::idx_t *>(labels));
  });
}

// ---- index_factory_c.h ----
int faiss_index_factory(FaissIndex **p_index, int d, const char *description,
                        FaissMetricType metric) {
  return guarded([&] {
    *p_index = reinterpret_cast<FaissIndex *>(
        faiss::index_factory(d, description, static_cast<faiss::MetricType>(metric)));
  });
}

// ---- IndexIVF_c.h ----
FaissIndexIVF *faiss_IndexIVF_cast(FaissIndex *index) {
  return reinterpret_cast<FaissIndexIVF *>(dynamic_cast<faiss::IndexIVF *>(I(index)));
}
size_t faiss_IndexIVF_nlist(const FaissIndexIVF *obj) {
  return reinterpret_cast<const faiss::IndexIVF *>(obj)->nlist;
}
size_t faiss_IndexIVF_nprobe(const FaissIndexIVF *obj) {
  return reinterpret_cast<const faiss::IndexIVF *>(obj)->nprobe;
}
void faiss_IndexIVF_set_nprobe(FaissIndexIVF *obj, size_t nprobe) {
  reinterpret_cast<faiss::IndexIVF *>(obj)->nprobe = nprobe;
}

// ---- AutoTune_c.h ----
int faiss_ParameterSpace_new(FaissParameterSpace **space) {
  return guarded(
      [&] { *space = reinterpret_cast<FaissParameterSpace *>(new faiss::ParameterSpace()); });
}
void faiss_ParameterSpace_free(FaissParameterSpace *obj) {
  delete reinterpret_cast<faiss::ParameterSpace *>(obj);
}
int faiss_ParameterSpace_set_index_parameter(const FaissParameterSpace *space, FaissIndex *index,
                                             const char *name, double value) {
  return guarded([&] {
    reinterpret_cast<const faiss::ParameterSpace *>(space)->set_index_parameter(I(index), name,
                                                                                value);
  });
}

// ---- index_io_c.h ----
int faiss_write_index(const FaissIndex *idx, FILE *f) {
  return guarded([&] { faiss::write_index(I(idx), f); });
}
int faiss_read_index(FILE *f, int io_flags, FaissIndex **p_out) {
  return guarded([&] { *p_out = reinterpret_cast<FaissIndex *>(faiss::read_index(f, io_flags)); });
}

// ---- kvdex extra (faiss_shim.h) ----
void kvdex_faiss_stats(uint64_t *ivf_ndis, uint64_t *hnsw_ndis) {
  if (ivf_ndis) *ivf_ndis = faiss::indexIVF_stats.ndis;
  // FAISS 1.7.x counts the level-0 distance computations of a float HNSW search in
  // n3 (search_from_candidates); ndis is only used by the binary HNSW.
  if (hnsw_ndis) *hnsw_ndis = faiss::hnsw_stats.n3 + faiss::hnsw_stats.ndis;
}

}  // extern "C"
