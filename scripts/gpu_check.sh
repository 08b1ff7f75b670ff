#!/usr/bin/env bash
# CUDA checks for `--device` and checkpoint-dtype compute (issue 10). Needs one visible NVIDIA GPU.
#
#   scripts/gpu_check.sh            # DEVICE=cuda by default; OUT=<dir> keeps the outputs
#   DEVICE=cpu scripts/gpu_check.sh # a dry run of the same steps on the CPU
#
# 1. calibration benchmark on the GPU (float32 and bfloat16): observer vs plain forward (<= 1.3x);
# 2. a streamed prune (--offload) and an in-memory prune of the same tiny bf16 checkpoint on the
#    GPU: same plan, outputs in bf16, both reload;
# 2b. with 2+ GPUs: an in-memory prune with --device auto spread over them (device_map), same plan;
# 3. the device/dtype contract tests and the streamed == in-memory tests, on the GPU
#    (MOEPRUNE_TEST_DEVICE=cuda) where they take a device, on the CPU otherwise.
# Each step prints its figures; the script stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$(mktemp -d /tmp/moeprune-gpu-check.XXXX)}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TOKENIZERS_PARALLELISM=false

python -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', torch.cuda.device_count(), torch.cuda.get_device_name(0) if ok else '-'); sys.exit(0 if ok or sys.argv[1] == 'cpu' else 1)" "$DEVICE"
TIMER=""
[ -x /usr/bin/time ] && TIMER="/usr/bin/time -v"

echo "== 1. calibration benchmark on $DEVICE"
python scripts/bench_calibration.py --device "$DEVICE" --dtype float32 --tokens "${TOKENS:-8192}" --repeats "${REPEATS:-3}" | tee "$OUT/bench_calibration_f32.txt"
python scripts/bench_calibration.py --device "$DEVICE" --dtype bfloat16 --tokens "${TOKENS:-8192}" --repeats "${REPEATS:-3}" | tee "$OUT/bench_calibration_bf16.txt"

echo "== 2. streamed and in-memory prune on $DEVICE"
python - "$OUT" "$DEVICE" <<'PY'
import json, sys, time
from pathlib import Path
import torch
from moeprune.io.loading import load_model
from moeprune.testing.tiny_models import save_tiny_checkpoint

out, device = Path(sys.argv[1]), sys.argv[2]
src = save_tiny_checkpoint("qwen3_moe", out / "f32")
model = load_model(str(src))[0].to(torch.bfloat16)
model.save_pretrained(out / "bf16", max_shard_size="20KB")
for f in src.iterdir():
    if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
        (out / "bf16" / f.name).write_bytes(f.read_bytes())
(out / "calib.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(200)))
PY
CAL=(--calibration "$OUT/calib.txt" --samples 16 --seq-len 64 --strategy frequency --ratio 0.5 --device "$DEVICE")
$TIMER moeprune prune "$OUT/bf16" "${CAL[@]}" --offload -o "$OUT/streamed" 2> "$OUT/time_streamed.txt"
$TIMER moeprune prune "$OUT/bf16" "${CAL[@]}" --no-offload -o "$OUT/in_memory" 2> "$OUT/time_in_memory.txt"
grep -h "Maximum resident\|Elapsed" "$OUT"/time_*.txt || true
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
from moeprune import load_pruned
out = Path(sys.argv[1])
a = json.loads((out / "streamed" / "moeprune_plan.json").read_text())["layers"]
b = json.loads((out / "in_memory" / "moeprune_plan.json").read_text())["layers"]
same = all(a[k]["kept"] == b[k]["kept"] for k in a)
print("plans equal (streamed on GPU vs in memory on GPU):", same)
for name in ("streamed", "in_memory"):
    m = load_pruned(out / name)
    print(name, "reloads; dtype", m.lm_head.weight.dtype, "experts", m.config.num_experts)
    assert m.lm_head.weight.dtype == torch.bfloat16
assert same, "streamed and in-memory plans differ"
PY

GPUS=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -ge 2 ]; then
  echo "== 2b. in-memory prune spread over $GPUS GPUs (--device auto: accelerate device_map)"
  python - "$OUT" <<'PY'
import sys
from pathlib import Path
import torch
from moeprune.devices import device_map_for, is_spread
from moeprune.io.loading import load_model
out = Path(sys.argv[1])
model = load_model(str(out / "bf16"), device="auto")[0]
print("device_map_for(auto) =", device_map_for("auto"), "; spread:", is_spread(model), "; devices:", sorted(set(map(str, model.hf_device_map.values()))))
assert device_map_for("auto") == "auto" and hasattr(model, "hf_device_map")
PY
  $TIMER moeprune prune "$OUT/bf16" --calibration "$OUT/calib.txt" --samples 16 --seq-len 64 --strategy frequency --ratio 0.5 \
    --device auto --no-offload -o "$OUT/multi_gpu" 2> "$OUT/time_multi_gpu.txt"
  python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
a = json.loads((out / "multi_gpu" / "moeprune_plan.json").read_text())["layers"]
b = json.loads((out / "in_memory" / "moeprune_plan.json").read_text())["layers"]
print("plans equal (spread over GPUs vs one GPU):", all(a[k]["kept"] == b[k]["kept"] for k in a))
assert all(a[k]["kept"] == b[k]["kept"] for k in a)
PY
else
  echo "== 2b. skipped: $GPUS GPU(s) visible; the spread (device_map) run needs 2 or more"
fi

echo "== 3. contract tests on $DEVICE"
MOEPRUNE_TEST_DEVICE="$DEVICE" python -m pytest -q -x tests/test_devices.py tests/test_device_map.py tests/test_streaming.py tests/test_plan_operations.py
echo "gpu_check: all passed; outputs in $OUT"
