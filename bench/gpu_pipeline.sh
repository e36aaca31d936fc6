#!/usr/bin/env bash
# End to end at Gemma 3 4B's shapes on one GPU, through `python -m pipeline` as a user runs it:
#   synth (the default benchmark) -> curate -> split -> base --shape gemma-3-4b (the hub-format stand-in)
#   -> train (QLoRA, the three-part loss, STEPS optimizer steps, 896-px images, model.base = the stand-in)
#   -> evaluate on TEST test samples.
# Saves each stage's seconds, the stages' peak memory (GPU and resident) and the outputs' sizes to
# bench/results/gpu_pipeline.json (SHAPE=gemma-3-tiny: gpu_pipeline_smoke.json, the CPU smoke test).
#
#   bash bench/gpu_pipeline.sh                                   # one GPU, ~15 minutes
#   SHAPE=gemma-3-tiny STEPS=4 TEST=8 bash bench/gpu_pipeline.sh # the same commands on a CPU, ~5 minutes
#
# Extra train settings go in TRAIN_SET (e.g. TRAIN_SET="train.ce_chunk=256 train.grad_checkpointing=vision").
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${SHAPE:-gemma-3-4b}
STEPS=${STEPS:-100}
TEST=${TEST:-32}
TRAIN_SET=${TRAIN_SET:-"model.attn_implementation=sdpa train.grad_checkpointing=vision train.ce_chunk=256"}
PY=${PYTHON:-python}
WORK=${WORK:-bench/work/gpu_pipeline}
if [ "$SHAPE" = "gemma-3-4b" ]; then OUT=bench/results/gpu_pipeline.json; else OUT=bench/results/gpu_pipeline_smoke.json; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_TRACKING_URI="sqlite:///$PWD/$WORK/mlflow.db"
rm -rf "$WORK" && mkdir -p "$WORK"

SETS=(--set "paths.raw=$WORK/raw" --set "paths.curated=$WORK/curated" --set "paths.split=$WORK/split"
      --set "paths.models=$WORK/models" --set "paths.reports=$WORK/reports" --set "base.captions=$WORK/split/train.jsonl"
      --set "model.base=$WORK/standin" --set "train.peft.method=qlora" --set "train.max_steps=$STEPS"
      --set "train.epochs=1000" --set "train.batch_size=4" --set "train.grad_accum=1" --set "train.max_length=1024"
      --set "train.checkpoint_every=50" --set "evaluate.max_new_tokens=48")
for s in $TRAIN_SET; do SETS+=(--set "$s"); done

stage() {  # stage NAME ARGS...: run `python -m pipeline NAME`, keep its JSON summary and its start / end times
  local name=$1; shift
  local t0=$EPOCHREALTIME rc=0
  "$PY" -m pipeline "$name" --params params.yaml "${SETS[@]}" "$@" > "$WORK/$name.json" 2> "$WORK/$name.log" || rc=$?
  if [ $rc -ne 0 ] && { [ "$name" != evaluate ] || [ $rc -ne 1 ]; }; then tail -30 "$WORK/$name.log"; exit $rc; fi
  printf '%s\t%s\t%s\n' "$name" "$t0" "$EPOCHREALTIME" >> "$WORK/times.tsv"
  echo "$name done"
}

t0=$EPOCHREALTIME
"$PY" -m pipeline synth --params params.yaml --out "$WORK/raw" > "$WORK/synth.json"
printf '%s\t%s\t%s\n' synth "$t0" "$EPOCHREALTIME" >> "$WORK/times.tsv"
stage curate
stage split
# evaluate reads TEST test samples: the split's test file cut to its first TEST rows (the rest kept aside)
mv "$WORK/split/test.jsonl" "$WORK/split/test_full.jsonl" && head -n "$TEST" "$WORK/split/test_full.jsonl" > "$WORK/split/test.jsonl"
stage base --shape "$SHAPE" --out "$WORK/standin"
stage train
stage evaluate

"$PY" - "$WORK" "$OUT" "$SHAPE" "$STEPS" "$TEST" "$TRAIN_SET" <<'EOF'
import json, platform, sys
from pathlib import Path

import torch

work, out, shape, steps, test, train_set = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
seconds = {n: float(b) - float(a) for n, a, b in (l.split("\t") for l in (work / "times.tsv").read_text().splitlines())}
def size(p):
    p = work / p
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (p.stat().st_size if p.exists() else None)
train = json.loads((work / "train.json").read_text())
metrics = json.loads((work / "reports" / "metrics.json").read_text())
standin = json.loads((work / "base.json").read_text())
result = {
    "command": "bash bench/gpu_pipeline.sh", "shape": shape, "steps": int(steps), "test_samples": int(test),
    "train_set": train_set.split(), "machine": platform.platform(),
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
    "parameters": standin["parameters"], "seconds": {k: round(v, 1) for k, v in seconds.items()},
    "train": {k: train.get(k) for k in ("steps", "seconds", "peak_gpu_gib", "peak_rss_gib", "final", "first")},
    "train_samples_per_s": round(4 * train["steps"] / train["seconds"], 3) if train.get("seconds") else None,
    "evaluate": {k: metrics.get(k) for k in ("n", "f1_macro", "peak_gpu_gib", "peak_rss_gib")},
    "bytes": {"standin": size("standin"), "adapter": size("models/adapter"), "reports": size("reports")},
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
print(f"saved {out}")
EOF
