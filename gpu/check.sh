#!/usr/bin/env bash
# gpu/check.sh: the one prepared check for a machine with an NVIDIA GPU (H100/H200 class,
# CUDA toolkit, optionally PyTorch; Bazel not needed). It
#   1. builds the kernels, twins and the check driver with nvcc/gcc directly;
#   2. runs tests/gpu/gpu_test (gtest) if GoogleTest is installed, and always the driver's
#      own kernel-vs-twin comparisons (the same ones, without gtest);
#   3. measures sparse-decode HBM bandwidth vs the device's peak, and S2 prefill vs
#      PyTorch's dense SDPA at 32K and 128K tokens (gpu/sdpa_peer.py, same run);
#   4. runs the decode loop kvdex_gpu_worker briefly (--index dense --check, embedded
#      store), where Bazel can build it or KVDEX_GPU_WORKER names a built one.
# Prints PASS/FAIL lines and the figures. Meant to finish in well under 5 minutes.
# Exit: 0 all PASS, 1 a FAIL, 2 build failure, 3 no usable GPU (nothing measured).
# Usage: gpu/check.sh [--build-only]
#   env: NVCC, CUDA_HOME, KVDEX_GPU_ARCH (e.g. 90), PYTHON, KVDEX_GPU_CHECK_DIR (build dir),
#        KVDEX_GPU_WORKER (a built kvdex_gpu_worker; else Bazel builds it)
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
BUILD_ONLY=0
[ "${1:-}" = "--build-only" ] && BUILD_ONLY=1

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$(command -v nvcc || echo "$CUDA_HOME/bin/nvcc")}
CC=${CC:-gcc}
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python3}
OUT=${KVDEX_GPU_CHECK_DIR:-/tmp/kvdex-gpu-check}
mkdir -p "$OUT/obj"

if [ ! -x "$NVCC" ]; then
  echo "FAIL  build: nvcc not found (set NVCC or CUDA_HOME)"
  exit 2
fi
ARCH=${KVDEX_GPU_ARCH:-}
if [ -z "$ARCH" ] && command -v nvidia-smi >/dev/null 2>&1; then
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
fi
ARCH=${ARCH:-90}
CUDA_LIB="$(dirname "$(dirname "$NVCC")")/lib64"
echo "== build: $("$NVCC" --version | tail -1), sm_$ARCH, into $OUT"

# ---- 1. build (all compiles in parallel) ----
B0=$SECONDS
pids=()
for f in gpu/decode.cu gpu/runtime.cu gpu/s2_prefill.cu gpu/topk.cu; do
  o="$OUT/obj/$(basename "$f" .cu).cu.o"
  "$NVCC" -O3 -gencode "arch=compute_$ARCH,code=sm_$ARCH" -I. -c "$f" -o "$o" \
    >"$o.log" 2>&1 &
  pids+=($!)
done
for f in kvstore/base.c gpu/args.c gpu/s2_layout.c gpu/twin.c tests/gpu/problems.c \
         tests/gpu/compare.c tests/gpu/check_main.c; do
  o="$OUT/obj/$(basename "$f" .c).o"
  "$CC" -O2 -std=c11 -D_GNU_SOURCE -Wall -Wno-format-truncation -I. -c "$f" -o "$o" >"$o.log" 2>&1 &
  pids+=($!)
done
build_ok=1
for p in "${pids[@]}"; do wait "$p" || build_ok=0; done
if [ $build_ok = 1 ]; then
  LIBOBJS=("$OUT"/obj/*.cu.o "$OUT"/obj/base.o "$OUT"/obj/args.o "$OUT"/obj/s2_layout.o
           "$OUT"/obj/twin.o "$OUT"/obj/problems.o "$OUT"/obj/compare.o)
  "$NVCC" -o "$OUT/gpu_check" "$OUT/obj/check_main.o" "${LIBOBJS[@]}" -lcublas -lm \
    -Xlinker -rpath -Xlinker "$CUDA_LIB" \
    >"$OUT/link.log" 2>&1 || build_ok=0
fi
if [ $build_ok = 0 ]; then
  cat "$OUT"/obj/*.log "$OUT/link.log" 2>/dev/null | grep -v '^$' | tail -40
  echo "FAIL  build (logs in $OUT)"
  exit 2
fi
# The gtest GPU tests, where GoogleTest is installed (Debian: libgtest-dev).
HAVE_GTEST=0
if echo 'int main(){}' | "$CXX" -x c++ - -o "$OUT/gtest_probe" -lgtest -lpthread >/dev/null 2>&1 &&
   [ -f /usr/include/gtest/gtest.h ]; then
  if "$CXX" -O2 -std=c++17 -I. tests/gpu/gpu_test.cc "${LIBOBJS[@]}" -o "$OUT/gpu_test" \
       -L"$CUDA_LIB" -Wl,-rpath,"$CUDA_LIB" -lcudart -lcublas -lgtest_main -lgtest -lpthread -lm \
       >"$OUT/gtest_build.log" 2>&1; then
    HAVE_GTEST=1
  else
    tail -20 "$OUT/gtest_build.log"
    echo "FAIL  build: tests/gpu/gpu_test.cc"
    exit 2
  fi
fi
echo "PASS  build in $((SECONDS - B0)) s"
[ $BUILD_ONLY = 1 ] && exit 0

# ---- 2. device present? ----
rc=0
if [ $HAVE_GTEST = 1 ]; then
  echo "== tests/gpu/gpu_test (gtest)"
  timeout 120 "$OUT/gpu_test" >"$OUT/gtest.log" 2>&1
  grc=$?
  n_skip=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) tests*, listed below.*/\1/p' "$OUT/gtest.log" | head -1)
  if [ $grc != 0 ]; then
    grep -E '^\[  FAILED  \]' "$OUT/gtest.log" | head -20
    tail -30 "$OUT/gtest.log"
    echo "FAIL  gpu_test (exit $grc)"
    rc=1
  else
    echo "PASS  gpu_test ($(grep -E '^\[  PASSED  \]' "$OUT/gtest.log" | head -1), ${n_skip:-0} skipped)"
  fi
else
  echo "INFO  GoogleTest not installed: gtest binary skipped; the driver runs the same comparisons"
fi

echo "== gpu_check"
timeout 170 "$OUT/gpu_check" | tee "$OUT/gpu_check.log"
crc=${PIPESTATUS[0]}
if [ $crc = 3 ]; then
  echo "FAIL  no usable CUDA device here: nothing was measured (exit 3)"
  exit 3
fi
[ $crc != 0 ] && rc=1
[ $crc = 124 ] && echo "FAIL  gpu_check timed out"

# ---- 3. the PyTorch peer, in the same run ----
echo "== PyTorch SDPA peer (dense causal, 32 heads, head_dim 128, bf16)"
timeout 120 "$PYTHON" gpu/sdpa_peer.py --seqs 32768,131072 | tee "$OUT/sdpa.log"
prc=${PIPESTATUS[0]}
if [ $prc != 0 ]; then
  echo "FAIL  sdpa peer (exit $prc): no speed-up figure"
  rc=1
else
  for seq in 32768 131072; do
    ours=$(sed -n "s/^S2_PREFILL seq=$seq ms=\([0-9.]*\).*/\1/p" "$OUT/gpu_check.log")
    peer=$(sed -n "s/^SDPA seq=$seq ms=\([0-9.]*\).*/\1/p" "$OUT/sdpa.log")
    if [ -z "$ours" ] || [ -z "$peer" ]; then
      echo "FAIL  s2 prefill vs SDPA at $seq: missing figure"
      rc=1
      continue
    fi
    ratio=$(awk -v a="$peer" -v b="$ours" 'BEGIN { printf "%.2f", a / b }')
    if [ $seq = 131072 ]; then
      if awk -v r="$ratio" 'BEGIN { exit !(r >= 8) }'; then
        echo "PASS  s2 prefill vs dense SDPA at $seq tokens: $ours ms vs $peer ms = ${ratio}x (target >= 8x)"
      else
        echo "FAIL  s2 prefill vs dense SDPA at $seq tokens: $ours ms vs $peer ms = ${ratio}x (target >= 8x)"
        rc=1
      fi
    else
      echo "INFO  s2 prefill vs dense SDPA at $seq tokens: $ours ms vs $peer ms = ${ratio}x"
    fi
  done
fi
# ---- 4. the decode loop on the GPU: kvdex_gpu_worker (//workers:kvdex_gpu_worker) ----
# It links the whole client (gRPC, FAISS), so it is built with Bazel, or given prebuilt
# as KVDEX_GPU_WORKER=path. Embedded store ("local:"), --index dense --check: the merged
# output must equal dense attention within 1e-3; prints tokens/s and the time split.
echo "== kvdex_gpu_worker (decode loop on the GPU, embedded store)"
GW=${KVDEX_GPU_WORKER:-}
if [ -z "$GW" ] && command -v bazel >/dev/null 2>&1; then
  if timeout 600 bazel build //workers:kvdex_gpu_worker >"$OUT/gpu_worker_build.log" 2>&1; then
    GW=$(bazel cquery --output=files //workers:kvdex_gpu_worker 2>/dev/null | head -1)
  else
    tail -20 "$OUT/gpu_worker_build.log"
    echo "FAIL  build: //workers:kvdex_gpu_worker"
    rc=1
  fi
fi
if [ -n "$GW" ] && [ -x "$GW" ]; then
  if timeout 120 "$GW" gpu-worker --uri local: --index dense --check --layers 2 --kv-heads 8 \
       --q-heads 32 --head-dim 128 --context 16384 --steps 16 --progress 0 \
       >"$OUT/gpu_worker.log" 2>&1; then
    echo "PASS  gpu-worker dense check: $(grep -m1 '^check:' "$OUT/gpu_worker.log")"
  else
    tail -20 "$OUT/gpu_worker.log"
    echo "FAIL  gpu-worker (see $OUT/gpu_worker.log)"
    rc=1
  fi
  sed -n 's/^decode: */INFO  gpu-worker decode: /p; s/^  \(.*ms .*%\)$/INFO    \1/p' "$OUT/gpu_worker.log"
else
  [ -z "$GW" ] && echo "INFO  gpu-worker skipped: no bazel here (set KVDEX_GPU_WORKER=path to a built kvdex_gpu_worker)"
fi
echo "== gpu/check.sh: $([ $rc = 0 ] && echo PASS || echo FAIL) in $((SECONDS - T0)) s"
exit $rc
