#!/usr/bin/env bash
# GPU checks in device runs of at most 10 minutes each: environment, then the GPU tests (stage "tests"), the rest of
# the suite on the GPU machine ("suite"), the iteration benchmark ("bench"), kernel timings and the TP breakdown
# ("tune"). Usage (on a CUDA machine, from the repo root): bash scripts/gpu_check.sh OUTDIR [STAGE|all]
set -uo pipefail
out=${1:-gpu-out}
stage=${2:-all}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$out/env.txt"
if [[ $stage == tests || $stage == all ]]; then
  python3 -m pytest -q -m gpu --durations=15 tests 2>&1 | tee "$out/pytest_gpu.txt" | tail -30
fi
if [[ $stage == suite || $stage == all ]]; then
  python3 -m pytest -q -x -m "not gpu" tests 2>&1 | tee "$out/pytest_all.txt" | tail -8
fi
if [[ $stage == bench || $stage == all ]]; then
  variants=bptt,tp-linearized-local,tp-linearized-local-triton,tp-linearized-local-triton_fused
  variants+=,tp-linearized-local-cuda_graph,tp-difference-local-triton,tp-exact-local-triton,tp-exact-local
  variants+=,tp-linearized-through_time,tp-linearized-local-naive
  python3 -m seqtp bench --device cuda --repeats "${REPEATS:-20}" --warmup 3 --variants "$variants" \
      --json "$out/bench_gpu.json" 2>&1 | grep -v USDT | tee "$out/bench_gpu.txt" | tail -34
  graphed=bptt,tp-linearized-local-triton,tp-linearized-local-triton_fused,tp-exact-local-triton
  python3 -m seqtp bench --device cuda --graph --repeats "${REPEATS:-20}" --warmup 3 --variants "$graphed" \
      --json "$out/bench_gpu_graph.json" 2>&1 | grep -v USDT | tee "$out/bench_gpu_graph.txt" | tail -14
fi
if [[ $stage == tune || $stage == all ]]; then
  python3 scripts/kernel_tune.py 2>&1 | tee "$out/kernel_tune.txt" | tail -60
fi
