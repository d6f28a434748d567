#!/bin/bash
# On the GPU machine, from the repo root, with .gpu carried (see bundle.sh):
#     bash benchmarks/device/run.sh [full|lora|comfy]     (default full; results under $OUT)
# full: gpu_check (correctness, speed, ComfyUI) + bench_lora --forward + the Vista4D render at 81
# frames (all-dynamic and half-static), about 3 minutes on an H200.
set -u
what=${1:-full}
R=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/site /tmp/pk /tmp/cui
tar -xJf .gpu/kitchen.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl
tar -xzf .gpu/ComfyUI-0.33.0.tar.gz -C /tmp/cui
ln -sfn "$R" /tmp/pk/wanquant
export PYTHONPATH=/tmp/pk:/tmp/site:$R/.gpu/avstub PYTHONUNBUFFERED=1
export COMFYUI_PATH=/tmp/cui/ComfyUI WANQUANT_COMFY_STUBS=$R/.gpu/stubs
nvidia-smi -L
cd /tmp
case $what in
  full)  timeout 330 python3 -m wanquant.benchmarks.gpu_check --json "$OUT/gpu_check.json" --max-seconds 290 > "$OUT/gpu_check.log" 2>&1
         echo "gpu_check rc=$?"; grep -E "^(FAIL|SUMMARY)" "$OUT/gpu_check.log" ;;
  comfy) timeout 230 python3 -m wanquant.benchmarks.gpu_check --skip correctness,speed --json "$OUT/gpu_check.json" --max-seconds 210 > "$OUT/gpu_check.log" 2>&1
         echo "gpu_check rc=$?"; grep -E "^(PASS|FAIL|SKIP|SUMMARY)" "$OUT/gpu_check.log" ;;
esac
timeout 60 python3 -m wanquant.benchmarks.bench_lora --forward --reps 30 2>&1 | tee "$OUT/bench_lora.log"
timeout 120 python3 -m wanquant.benchmarks.bench_vista4d_render --frames 81 --static 0 0.5 --devices cuda --runs 3 \
    2>&1 | tee "$OUT/bench_vista4d_render.log"
