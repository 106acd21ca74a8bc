#!/usr/bin/env bash
# Issue 5's three speed goals measured in one run on one GPU, then read off by benchmarks/issue5_goals.py.
#   bash benchmarks/run_issue5_goals.sh OUT_DIR        (repo root; about 15 minutes on an H100: (a) 5.5 with tuning, (b) 2, (c) about 7)
# tests: first the three Triton ops' tests on the GPU;
# (a) bench_ssd.py: our SSD op against fla's chunk_simple_gla and mamba_ssm's mamba_chunk_scan_combined (their
#     rows say "not importable" unless fla-core and mamba_ssm, built with MAMBA_SKIP_CUDA_BUILD=TRUE, are installed);
# (b) bench_layers.py: the MM-DiM (+ temporal branch) and attention layers eager, compiled and as CUDA graphs;
# (c) bench_generate.py: full_temp and full_attn at 241 frames, 768x1280, random weights, CUDA graphs on.
# host: the ops' host time per call (bench_op_dispatch.py) and where the SSD op's goes (profile_op_host.py), ~2 min.
# Each step writes its JSON into OUT_DIR as it ends; goals.json and the goal table come last.
# PARTS (default "tests a b c host") picks steps, e.g. PARTS="tests a b" when the lease cannot hold (c).
set -u
OUT=${1:?output folder}
PARTS=${PARTS:-tests a b c host}
has() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if has tests; then
  echo "== kernel tests on the GPU $(date +%T)"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_ops_ssd_triton.py tests/test_ops_conv_triton.py \
    tests/test_ops_norm_triton.py tests/test_ops_eager.py tests/test_ops_triton_host.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
fi
if has a; then
  echo "== (a) SSD op $(date +%T)"
  python3 benchmarks/bench_ssd.py --no-breakdown --out "$OUT/ssd.json" 2>&1 | tail -12
fi
if has b; then
  echo "== (b) mixer layers $(date +%T)"
  python3 benchmarks/bench_layers.py --tokens 3968 15488 --ssd-backends triton --compile default reduce-overhead \
    --cuda-graphs --out "$OUT/layers.json" 2>&1 | tail -24
fi
if has c; then
  echo "== (c) end to end, 241 frames $(date +%T)"
  python3 benchmarks/bench_generate.py --frames 241 --reps 1 --layouts full_temp full_attn --cuda-graphs on \
    --out "$OUT/generate.json" 2>&1 | tail -8
fi
if has host; then
  echo "== host time per op call: eager autograd.Function vs custom op $(date +%T)"
  timeout 120 python3 benchmarks/bench_op_dispatch.py --out "$OUT/op_dispatch.json" 2>&1 | tail -4
  echo "== SSD op host time: launch costs, cProfile, forward kernels against fla's $(date +%T)"
  timeout 150 python3 benchmarks/profile_op_host.py --out "$OUT/op_host.json" 2>&1 | grep -v -i warning | tail -40
fi
echo "== goals $(date +%T)"
args=()
for k in ssd layers generate; do [ -f "$OUT/$k.json" ] && args+=("--$k" "$OUT/$k.json"); done
python3 benchmarks/issue5_goals.py "${args[@]}" --out "$OUT/goals.json"
