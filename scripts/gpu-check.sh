#!/usr/bin/env bash
# One call on a lent GPU machine (see /work/.library/device): the CUDA tests, the hot-path and cache
# tests on CUDA's torch, `ca2vdm bench` on the GPU and `ca2vdm distill --set device=cuda` on a tiny
# teacher, in about 5 minutes (step 4, the Wan block benchmark, adds up to 4). Steps 1-3 need only the
# machine's own torch, numpy, safetensors, pytest and pyyaml (no PyAV, no text encoder: nothing they
# run reads a video file or encodes a prompt). Results go to $OUT (or outputs/gpu-check).
# Step 4 (issue 24's block benchmark) also needs diffusers and a Self-Forcing checkout at $SF_REF
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
# 3. ca2vdm distill with device: cuda on a tiny teacher, 2 iterations per stage (float32, no autocast, no
#    samples or diagnostic: those need PyAV / matplotlib), then the same run with device: cpu; the
#    largest differences of the pairs and the students printed (the draws are the CPU's on both)
if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    D="$OUT/distill"
    rm -rf "$D" && mkdir -p "$D"
    python3 - "$D" <<'PY' 2>&1 | tee "$OUT/distill_cuda.txt" || status=1
import sys, torch
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import tiny_model
from ca2vdm.checkpoint import save_checkpoint
d = Path(sys.argv[1])
teacher = tiny_model(dtype=torch.float32, conditioning="class", num_classes=10, prediction="sample",
                     max_context_frames=4, prefix_frames=0)
save_checkpoint(d / "teacher", teacher, {"data": {"dataset": "moving-digits", "num_clips": 16, "size": 8,
                                                  "digit_size": 5, "val_clips": 2}})
(d / "distill.yaml").write_text(f"""teacher: {d / 'teacher'}
levels: [1.0, 0.8, 0.45]
teacher_steps: 4
autocast: "off"
samples: 0
ode_pairs: {{clips: 4, batch_size: 2}}
ode_init: {{steps: 2, batch_size: 2, lr: 0.001, warmup: 1, save_every: 2, eval_every: 0, log_every: 1}}
dmd: {{iterations: 2, batch_size: 2, ratio: 1, log_every: 1, save_every: 2, sample_every: 0, diagnose_every: 0,
       generator_lr: 0.001}}
""")
PY
    timeout 120 python3 -m ca2vdm.cli distill "$D/distill.yaml" --out-dir "$D/cuda" --set device=cuda \
        2>&1 | tee -a "$OUT/distill_cuda.txt" || status=1
    timeout 120 python3 -m ca2vdm.cli distill "$D/distill.yaml" --out-dir "$D/cpu" --set device=cpu \
        > "$D/cpu.log" 2>&1 || status=1
    python3 - "$D" <<'PY' 2>&1 | tee -a "$OUT/distill_cuda.txt" || status=1
import sys
from pathlib import Path
from safetensors.torch import load_file
d = Path(sys.argv[1])
for f in ("pairs/pairs_00000.safetensors", "ode_init/checkpoint/model.safetensors", "dmd/checkpoint/model.safetensors",
          "dmd/state.safetensors"):
    a, b = load_file(str(d / "cuda" / f)), load_file(str(d / "cpu" / f))
    assert a.keys() == b.keys(), f
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    scale = max(b[k].double().abs().max().item() for k in b if b[k].is_floating_point())
    print(f"distill cuda vs cpu, {f}: largest difference {diff:.3g} (largest value {scale:.3g})")
PY
else
    echo "no CUDA: the distill check skipped" | tee "$OUT/distill_cuda.txt"
fi
# 4. one Wan-1.3B block (depth 1) at full shape in bf16: ours vs Self-Forcing's CausalWanModel vs diffusers'
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
