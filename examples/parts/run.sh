#!/usr/bin/env bash
# The parts benchmark end to end, from the repository root: make the data, then every stage with
# examples/parts/params.yaml (no code change), then a drift check of a batch from line 2's camera.
#   bash examples/parts/run.sh [.venv/bin]
set -euo pipefail
BIN=${1:-.venv/bin}
P=examples/parts/params.yaml
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0 MLFLOW_DISABLE_TELEMETRY=true
"$BIN/python" examples/parts/generate.py --out work/parts/raw --n 1000 --seed 0
for stage in curate split base train; do
  echo "== $stage"; "$BIN/python" -m pipeline "$stage" --params "$P"
done
echo "== evaluate"; "$BIN/python" -m pipeline evaluate --params "$P" || echo "(exit $?: a gate failed; see work/parts/reports/metrics.json)"
# line 2's camera: warmer side light, noise, blur, JPEG; no captions needed for the image-side check
"$BIN/python" examples/parts/generate.py --out work/parts/incoming/line2 --n 300 --seed 7 --camera cam_b --prefix L2-
echo "== monitor"; "$BIN/python" -m pipeline monitor --params "$P" --batch work/parts/incoming/line2 || echo "(exit $?: 1 = drift found, retraining called for)"
