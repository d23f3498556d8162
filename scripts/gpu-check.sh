#!/usr/bin/env bash
# One call on a lent GPU machine (see /work/.library/device): the CUDA tests, the hot-path and cache
# tests on CUDA's torch, and `ca2vdm bench` on the GPU, in under 5 minutes (step 3, the Wan block
# benchmark, adds up to 4). Steps 1-2 need only the machine's own torch, numpy, safetensors, pytest
# and pyyaml (no PyAV, no text encoder: nothing they run reads a video file or encodes a prompt). Results go to $OUT (or outputs/gpu-check).
# Step 3 (issue 24's block benchmark) also needs diffusers and a Self-Forcing checkout at $SF_REF
# (default /tmp/sf-ref); without either, or without CUDA, it is skipped and says so.
#   run: bash scripts/gpu-check.sh            then copy $OUT's files into BENCHMARKS.md, device named
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
python3 - <<'PY' 2>&1 | tee "$OUT/device.txt"
import platform, torch
print("torch", torch.__version__, "python", platform.python_version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
# 1. CUDA tests under sync-debug "error" where they ask for it, plus the device-independent hot path
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_hot_path.py tests/test_cache.py \
    2>&1 | tee "$OUT/cuda_tests.txt" || status=1
# 2. per-step time of every generation mode on the GPU: the small preset, then the paper's model
timeout 120 python3 -m ca2vdm.cli bench --preset small --device cuda --frames 81 --steps 10 \
    --json "$OUT/bench_small_cuda.json" 2>&1 | tee "$OUT/bench_small_cuda.txt" || status=1
timeout 150 python3 -m ca2vdm.cli bench --preset paper --device cuda --dtype bfloat16 --frames 41 --steps 10 \
    --full-frame-budget 41 --json "$OUT/bench_paper_cuda.json" 2>&1 | tee "$OUT/bench_paper_cuda.txt" || status=1
# 3. one Wan-1.3B block (depth 1) at full shape in bf16: ours vs Self-Forcing's CausalWanModel vs diffusers'
#    recompute (all at the full 1560 tokens per frame on a GPU); the parity check first, at --small
SF_REF=${SF_REF:-/tmp/sf-ref}
if python3 -c "import sys, torch, diffusers; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        && [ -f "$SF_REF/wan/modules/causal_model.py" ]; then
    timeout 60 python3 scripts/bench_wan_block.py --reference "$SF_REF" --small --device cuda \
        2>&1 | tee "$OUT/bench_wan_block_small_cuda.txt" || status=1
    timeout 200 python3 scripts/bench_wan_block.py --reference "$SF_REF" --device cuda --dtype bfloat16 \
        --diffusers-full --out "$OUT/bench_wan_block_cuda.json" 2>&1 | tee "$OUT/bench_wan_block_cuda.txt" || status=1
else
    echo "skipped the Wan block benchmark: needs CUDA, diffusers and a Self-Forcing checkout at $SF_REF" \
        | tee "$OUT/bench_wan_block_cuda.txt"
fi
exit $status
