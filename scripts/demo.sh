#!/usr/bin/env bash
# The whole story, offline, on the embedded defaults (SQLite MLflow, local DVC cache, `airflow dags test`):
#   hospital A -> dvc repro -> promote;  hospital B (phone camera) arrives -> DAG `monitor` flags drift and
#   triggers `finetune` -> ingest, QLoRA re-fine-tune, gates, promote;  a table of before / after.
# It runs in a scratch copy of the project (demo/project), so your checkout and its params.yaml stay as
# they are. Usage: scripts/demo.sh [VENV_BIN]   (make demo passes .venv/bin)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$(cd "${1:-$ROOT/.venv/bin}" && pwd)"
WORK="$ROOT/demo"
P="$WORK/project"
START=$(date +%s)
step() { echo; echo "== $(date +%H:%M:%S) [$(( $(date +%s) - START ))s] $*"; }

rm -rf "$WORK"
mkdir -p "$P"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$P" 2>/dev/null || true)
cd "$P"
git init -q && git config user.name demo && git config user.email demo@localhost
git add -A && git commit -qm "demo workspace"

export PATH="$BIN:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
export MLFLOW_TRACKING_URI="sqlite:///$P/mlflow.db" PIPELINE_PROJECT="$P" PIPELINE_PYTHON="$BIN/python"
export AIRFLOW_HOME="$WORK/airflow" AIRFLOW__CORE__DAGS_FOLDER="$P/dags" AIRFLOW__CORE__LOAD_EXAMPLES=False
export PIPELINE_TASK_RETRIES=0
dvc remote modify --local shared url "$WORK/dvc-remote"  # the finetune DAG pushes here (publish)

step "hospital A: dvc repro (synth -> curate -> split -> base -> train -> evaluate)"
dvc repro -q
step "promote the first model (it becomes champion only if every gate passes)"
python -m pipeline promote > "$WORK/promote_a.json" 2> "$WORK/promote_a.err" && cat "$WORK/promote_a.json" \
  || { echo "not promoted:"; cat "$WORK/promote_a.err"; }
mkdir -p "$WORK/model_a" && cp -r models/adapter "$WORK/model_a/adapter" && ln -s "$P/models/base" "$WORK/model_a/base"
cp reports/metrics.json "$WORK/metrics_a.json"

step "hospital B's phone pictures arrive (labelled, 300 lesions)"
python -m pipeline synth --out data/incoming/hospital_b --n 300 --seed 1 --site hospital_b --camera phone \
  --set synth.faults.mismatch=0 > /dev/null

step "Airflow: DAG monitor (nightly drift check; triggers finetune when drift crosses the thresholds)"
airflow db migrate > "$WORK/airflow.log" 2>&1
airflow pools set dvc 1 "DVC tasks, one at a time" >> "$WORK/airflow.log" 2>&1
airflow dags test monitor >> "$WORK/airflow.log" 2>&1
python - <<'EOF'
import json; d = json.load(open("reports/drift/hospital_b/drift.json"))
print("drift:", d["status"], "retrain", d["retrain"], d["reasons"])
EOF
CONF=$(python - <<'EOF'
import json, os, sqlite3
db = sqlite3.connect(os.path.join(os.environ["AIRFLOW_HOME"], "airflow.db"))
rows = db.execute("SELECT conf FROM dag_run WHERE dag_id = 'finetune' AND state = 'queued'").fetchall()
print(rows[0][0] if rows else "")
EOF
)
if [ -z "$CONF" ]; then echo "monitor did not trigger finetune"; exit 1; fi
echo "finetune triggered with conf $CONF"

step "Airflow: DAG finetune (ingest -> dvc repro with QLoRA -> gates -> promote)"
airflow dags test finetune -c "$CONF" >> "$WORK/airflow.log" 2>&1 || { tail -50 "$WORK/airflow.log"; exit 1; }

step "model A on the same evaluation sets, for the before / after table"
python -m pipeline evaluate --set paths.models="$WORK/model_a" --set paths.reports="$WORK/reports_a" > /dev/null 2>&1

python - "$WORK" <<'EOF'
import json, os, sys
from mlflow import MlflowClient
work = sys.argv[1]
after = json.load(open("reports/metrics.json"))
before = json.load(open(os.path.join(work, "reports_a", "metrics.json")))
drift = json.load(open("reports/drift/hospital_b/drift.json"))
c = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
name = "lesion-adapter"
def alias(a):
    try:
        return "v" + str(c.get_model_version_by_alias(name, a).version)
    except Exception:
        return "none"
versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
rows = [("hospital A, old test set (macro-F1)", "hospital_b_old_test"), ("hospital B, held-out (macro-F1)", "hospital_b")]
print()
print(f"| {'':40} | {'before (model A)':>16} | {'after (re-fine-tuned)':>21} |")
print(f"|{'-' * 42}|{'-' * 18}|{'-' * 23}|")
for label, key in rows:
    print(f"| {label:40} | {before['sets'][key]['f1_macro']:>16.3f} | {after['sets'][key]['f1_macro']:>21.3f} |")
print(f"| {'ignore rate (test split)':40} | {before['image_reliance']['ignore_rate']:>16.3f} | {after['image_reliance']['ignore_rate']:>21.3f} |")
print(f"| {'gates passed':40} | {str(before['passed']):>16} | {str(after['passed']):>21} |")
e = drift["embedding_drift"]; l = drift["loss_drift"]
print(f"\ndrift of hospital B: embedding {e['method']} {e['score']:.3f} (threshold {e['threshold']}, drifted {e['drifted']}); "
      f"alignment score {l['method']} {l['score'] if l['score'] is None else round(l['score'], 4)} (drifted {l['drifted']})")
for v in versions:
    print(f"registry {name} v{v.version}: {v.tags.get('decision', '')[:160]}")
print(f"champion: {alias('champion')}, challenger: {alias('challenger')}, previous: {alias('previous')}")
failed = [k for k, g in after["gates"].items() if not g["passed"]]
if failed:
    print("failing gates after re-fine-tuning: " + ", ".join(f"{k} ({after['gates'][k]['value']})" for k in failed))
EOF
step "done in $(( $(date +%s) - START )) s"
echo "Evidently report: $P/reports/drift/hospital_b/drift.html"
echo "MLflow UI:        $BIN/mlflow ui --backend-store-uri sqlite:///$P/mlflow.db"
echo "Airflow log:      $WORK/airflow.log"
echo "DVC remote:       $WORK/dvc-remote (pushed by finetune's publish step; git log in $P)"
