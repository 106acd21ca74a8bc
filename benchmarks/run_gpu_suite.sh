#!/usr/bin/env bash
# One call on a lent GPU: correctness of the kernels at full shapes, then the issue-5/issue-4 benchmarks.
# Usage (repo root, diffusers + importlib_metadata wheels in .whl/):  bash benchmarks/run_gpu_suite.sh OUT_DIR
set -u
OUT=${1:-/tmp/m4v_gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== GPU kernel tests (bf16, full shapes)"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_ops_conv_triton.py tests/test_ops_norm_triton.py \
  tests/test_ops_ssd_triton.py -k "gpu or cuda" 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_ops_fused.py tests/test_models_cuda_graphs.py \
  -k "cuda or graph" 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_layers_mamba2.py -k cuda 2>&1 | tail -3 \
  | tee -a "$OUT/gpu_tests.txt"
timeout 30 python3 benchmarks/check_ssd_strided.py 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.txt"
echo "== compiled element-wise ops against eager, by size (m4v.ops.fused thresholds)"
timeout 300 python3 benchmarks/bench_fused_ops.py --tokens 256 1024 2048 4096 16384 --out "$OUT/fused_ops.json" 2>&1 \
  | tail -8
echo "== in_proj matmul against its output alignment (issue 5b)"
timeout 120 python3 benchmarks/bench_matmul_align.py --out "$OUT/matmul_align.json" 2>&1 | tail -17
echo "== mixer layers (issue 5b)"
timeout 110 python3 benchmarks/bench_layers.py --ssd-backends triton --out "$OUT/layers.json" 2>&1 | tail -16
timeout 200 python3 benchmarks/profile_layers.py --top 8 --out "$OUT/layers_profile.json" 2>&1 | grep -A8 "^=="
echo "== end-to-end generation (issue 5c)"
timeout 600 python3 benchmarks/bench_generate.py --out "$OUT/generate.json" --reps 1 \
  --layouts full_temp full_attn no_mixer --cuda-graphs off,on 2>&1 | tail -14
echo "== training throughput, one GPU (issue 4)"
timeout 60 python3 benchmarks/bench_train.py --out "$OUT/train.json" 2>&1 | tail -6
