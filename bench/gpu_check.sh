#!/usr/bin/env bash
# Everything a lent GPU should run, in well under 8 minutes:
#   1. the GPU tests (real kernels, no interpreter): pytest -m gpu with VTOK_FAST_TEST_GPU=1;
#   2. the benchmarks of the GPU-critical ops on CUDA and the ToMe profile, writing JSON and logs.
# Results go to $OUT (the device tool brings that folder back) or bench/results.
# Usage (device machine, repo root): bash bench/gpu_check.sh
# Peers missing from the GPU image (vector-quantize-pytorch and its pure-Python needs) travel as
# wheels in .whl/ (git-ignored), fetched beforehand on a machine with PyPI:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl vector-quantize-pytorch==1.32.0 einx==0.4.3 \
#     loguru torch-einops-utils frozendict
# Time budget (8 min): tests <= 150 s, each of the five benchmarks <= 60 s, the profile <= 30 s
# (results are saved after every provider, so a benchmark cut short still leaves its JSON).
set -u
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 VTOK_FAST_TEST_GPU=1
unset TRITON_INTERPRET

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# setup.py maps bench/ into the package as vtok_fast.bench; pip cannot build it offline there, so
# link it in place and import from the source tree.
ln -sfn ../bench vtok_fast/bench
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python3 -m vtok_fast.cli info
} 2>&1 | tee "$out/gpu_info.txt"

timeout "${GPU_TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log"

for op in ${GPU_BENCH_OPS:-patch-embed codebook tome attention merge}; do
  timeout "${GPU_BENCH_TIMEOUT:-60}" python3 -m vtok_fast.cli bench "$op" --device cuda --out "$out" --no-progress \
    --min-time "${GPU_BENCH_MIN_TIME:-0.2}" 2>&1 | tee -a "$out/gpu_bench.log"
done

timeout "${GPU_PROFILE_TIMEOUT:-30}" python3 -m vtok_fast.cli bench tome --profile --device cuda --out "$out" \
  2>&1 | tee -a "$out/gpu_bench.log"
