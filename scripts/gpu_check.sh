#!/usr/bin/env bash
# forkrl's GPU check: what a CPU cannot verify, in one run of at most ~8 minutes on one GPU (the parts' limits add
# up to 460 s).
#
#   bash scripts/gpu_check.sh [OUT]            # on a GPU machine; results in OUT (default gpu-check/)
#   bash scripts/gpu_check.sh --smoke [OUT]    # the same steps on a CPU, tiny sizes: checks the script itself
#
# Parts, each under its own time limit, each recorded in OUT/summary.json (rc, seconds) even when one fails:
#   env          the device, driver and package versions (OUT/env.json)
#   gpu_tests    the GPU-marked tests (pytest -m gpu; OUT/gpu_tests.xml)
#   sampler      the GPU samplers against the forward loop: hf, static (compiled), static_eager, continuous
#                batching; times, and each one's largest log-prob gap to the trainer's forward at the sampled tokens
#                (OUT/gpu_sampler.json)
#   grpo_hf      SFT then 5 GRPO steps in bf16 end to end, sampled by the model's forward (OUT/grpo_hf/)
#   grpo_static  the same, sampled by the static backend (OUT/grpo_static/)
#   grpo_step    benchmarks/grpo_step.py --device cuda: forkrl vs TRL on the same GPU work, with the training MFU
#                against the measured bf16 matmul peak (forkrl alone where TRL is not installed; OUT/grpo_step.json)
#
# No package registry is needed: forkrl runs from this checkout (PYTHONPATH), and the packages a GPU image may lack
# (pydantic, pytest, trl, ...) are installed from the wheels in $FORKRL_WHEELS (default ./wheels), if that directory
# exists: make it beforehand on a machine with a registry with scripts/gpu_wheels.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=${1:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 FORKRL_CACHE="$OUT/cache"
WHEELS=${FORKRL_WHEELS:-wheels}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "gpu_check: installing $WHEELS failed" >&2
fi

SCALE=1
if [ $SMOKE = 1 ]; then
  DEVICE=cpu
  SCALE=4  # a shared 2-core CPU is no GPU: room for a busy machine
  SAMPLER_ARGS=(--size tiny --rows 4 --group 2 --new-tokens 6 --prompt-min 2 --prompt-max 12 --repeats 1 --threads 1
                --cb-blocks 4)
  STEP_ARGS=(--tiny --steps 1 --warmup 0)
  TRAIN_OVER='{"model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
    "intermediate_size": 64}}, "task": {"train_size": 200, "heldout_size": 8}, "sampling": {"max_new_tokens": 12},
    "sft": {"steps": 3, "batch_size": 8, "micro_batch_size": 8},
    "grpo": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "micro_batch_size": 16}, "eval": {"num_problems": 4}}'
else
  DEVICE=cuda
  SAMPLER_ARGS=(--size 0.5b --rows 64 --new-tokens 256 --repeats 2)
  STEP_ARGS=(--config default --steps 5 --warmup 2)
  TRAIN_OVER='{}'
fi
LIBS=forkrl,trl
"$PY" -c "import trl" 2>/dev/null || LIBS=forkrl

SUMMARY="$OUT/parts.jsonl"
: > "$SUMMARY"
part() {  # part NAME SECONDS COMMAND...: run it under its limit, log its output, record rc and time
  local name=$1 limit=$(($2 * SCALE))
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$((SECONDS - t0))
  tail -n 25 "$OUT/$name.log"
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"timed_out\": $([ $rc = 124 ] && echo true || echo false)}" >> "$SUMMARY"
}

part env 30 "$PY" - "$OUT/env.json" <<'EOF'
import json, platform, subprocess, sys
import torch, transformers
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError:
        pass
for mod in ("peft", "pydantic", "trl", "vllm", "pytest"):
    try:
        info[mod] = __import__(mod).__version__
    except ImportError:
        info[mod] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF
part gpu_tests 90 "$PY" -m pytest -m gpu -p no:cacheprovider tests/test_static_sampler.py tests/test_gpu.py \
  --junitxml="$OUT/gpu_tests.xml"
part sampler 100 "$PY" benchmarks/gpu_sampler.py --device "$DEVICE" "${SAMPLER_ARGS[@]}" --json "$OUT/gpu_sampler.json"
for backend in hf static; do
  "$PY" - "$OUT/grpo_$backend.yaml" "$backend" "$TRAIN_OVER" "$SMOKE" <<'EOF'
import json, sys, yaml
from forkrl.config import deep_merge
cfg = yaml.safe_load(open("examples/gpu_check.yaml"))
cfg = deep_merge(cfg, {"sampling": {"backend": sys.argv[2]}, **json.loads(sys.argv[3])})
if sys.argv[4] == "1":  # on a CPU: float32 (bf16 there is slow and not what the check is about)
    cfg["model"]["dtype"] = "float32"
yaml.safe_dump(cfg, open(sys.argv[1], "w"))
EOF
  rm -rf "$OUT/grpo_$backend"
  part "grpo_$backend" 60 "$PY" -m forkrl.cli train "$OUT/grpo_$backend.yaml" --out "$OUT/grpo_$backend"
done
part grpo_step 120 "$PY" benchmarks/grpo_step.py --device "$DEVICE" --libs "$LIBS" "${STEP_ARGS[@]}" \
  --json "$OUT/grpo_step.json"

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = [json.loads(x) for x in (out / "parts.jsonl").read_text().splitlines()]
summary = {"parts": parts, "ok": all(p["rc"] == 0 for p in parts)}
for name in ("grpo_hf", "grpo_static"):
    metrics = out / name / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        grpo = [r for r in rows if r.get("stage") == "grpo"]
        summary[name] = {"steps": len(grpo), "logp_mismatch": [r.get("logp_mismatch") for r in grpo],
                         "correction_weight_mean": [r.get("correction_weight_mean") for r in grpo],
                         "loss": [r.get("loss") for r in grpo], "sample_s": [r.get("sample_s") for r in grpo]}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({"ok": summary["ok"], "parts": {p["part"]: p["rc"] for p in parts}}))
EOF
