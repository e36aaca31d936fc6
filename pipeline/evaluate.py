"""`evaluate`: accuracy and what accuracy hides (docs/design.md §3.5).

On the test split (and any extra sets in `evaluate.sets`): greedy generation, the impression parsed
into a label, F1; image reliance (blank image, images swapped for ones of another label, ignore rate,
perceptual score); mismatch robustness on `val_mismatch.jsonl`; alignment geometry; per-subgroup bias
with a bootstrap interval on the largest gap; gates (computed by `pipeline/scoring.py`). This stage
writes the reports, the plots and one MLflow run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import config, data as dataio, model as modelmod, scoring, tracking
from pipeline.errors import InputError


# ------------------------------------------------------------------------------------------- plots
def plots(metrics: dict, labels: Sequence[str], steps_csv: Path, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cm = np.asarray(metrics["confusion"])
    names = list(labels) + ["unparseable"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test: macro-F1 {metrics['f1_macro']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)
    written.append("confusion.png")

    groups = metrics.get("bias", {}).get("groups", {})
    if groups:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        keys = list(groups)
        x = np.arange(len(keys))
        pos = next((k for k in next(iter(groups.values())) if k.startswith("recall_") and not k.endswith("_ci")), None)

        def bars(offset: float, key: str, label: str) -> None:  # value, and its bootstrap interval as a whisker
            vals = [groups[k][key] or 0 for k in keys]
            ci = [groups[k].get(f"{key}_ci") or [v, v] for k, v in zip(keys, vals)]
            err = [[max(0.0, v - c[0]) for v, c in zip(vals, ci)], [max(0.0, c[1] - v) for v, c in zip(vals, ci)]]
            ax.bar(x + offset, vals, 0.4, yerr=err, capsize=3, label=label)

        bars(-0.2, "f1_macro", "macro-F1")
        if pos:
            bars(0.2, pos, pos.replace("_", " "))
        ax.set_xticks(x, [f"{k}\n(n={groups[k]['n']})" for k in keys], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title(f"per {metrics['bias'].get('subgroup')} ({metrics['bias'].get('confidence', 0.95):.0%} bootstrap intervals)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "subgroups.png", dpi=100)
        plt.close(fig)
        written.append("subgroups.png")

    if steps_csv.is_file():
        import csv

        rows = list(csv.DictReader(open(steps_csv)))
        if rows:
            fig, ax = plt.subplots(figsize=(5, 3.2))
            step = [int(r["step"]) for r in rows]
            for k in ("loss/total", "loss/ce", "loss/contrastive", "loss/mse"):
                ax.plot(step, [float(r[k]) for r in rows], label=k.split("/")[1], lw=1)
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
            ax.set_title("training loss terms")
            fig.tight_layout()
            fig.savefig(out / "loss.png", dpi=100)
            plt.close(fig)
            written.append("loss.png")
    return written


def flat_metrics(m: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of the metrics as MLflow metric names (`image_reliance.ignore_rate`, ...)."""
    out = {}
    for k, v in m.items():
        if k in ("confusion", "unparseable", "max_gap_ci", "max_gap_groups", "insufficient", "subgroup", "per_value",
                 "confidence"):
            continue
        key = f"{prefix}{k}".replace("@", "_at_")
        if isinstance(v, dict):
            out.update(flat_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
            out[key] = float(v)
    return out


def main(params: config.Params) -> dict:
    models, reports = Path(params.paths.models), Path(params.paths.reports)
    adapter = models / "adapter"
    if not adapter.is_dir():
        raise InputError(f"evaluate: no adapter at {adapter} (run train first)")
    sets, mismatch = scoring.load_sets(params)
    metrics, predictions = scoring.evaluate_adapter(adapter, sets, mismatch, params)
    train_metrics = models / "train_metrics.json"
    tm = json.loads(train_metrics.read_text()) if train_metrics.is_file() else {}
    metrics["adapter_sha256"] = dataio.dir_sha256(adapter)
    metrics["train_run_id"] = tm.get("mlflow_run_id")
    metrics.update(modelmod.peak_memory())
    with dataio.atomic_dir(reports / "eval") as out:
        for name, rows in predictions.items():
            dataio.write_jsonl(out / ("predictions.jsonl" if name == "test" else f"predictions_{name}.jsonl"), rows)
        dataio.write_json(out / "subgroups.json", metrics.get("bias", {}))
        plots(metrics, params.data.labels, models / "train_steps.csv", out)
    metrics["eval_run_id"] = log_run(metrics, params, reports / "eval")
    dataio.write_json(reports / "metrics.json", metrics)
    failed = scoring.failed_gates(metrics["gates"])
    return {"f1_macro": metrics["f1_macro"], "ignore_rate": metrics["image_reliance"]["ignore_rate"],
            "mismatch_auroc": metrics["mismatch_auroc"], "gates_passed": not failed, "failed_gates": failed}


def log_run(metrics: dict, params: config.Params, folder: Path) -> str | None:
    """One MLflow run per evaluate: metrics with the names of docs/design.md §3.5, the report files."""
    import mlflow

    tracking.use_experiment(params.mlflow.experiment)
    with mlflow.start_run(run_name="evaluate") as run:
        mlflow.log_params({k: str(v) for k, v in config.flatten(params.evaluate).items()})
        mlflow.log_metrics(flat_metrics({k: v for k, v in metrics.items() if k != "sets"}))
        mlflow.log_metrics(flat_metrics(metrics.get("sets", {}), "sets."))
        mlflow.set_tags({"adapter_sha256": metrics["adapter_sha256"], "train_run_id": str(metrics["train_run_id"]),
                         "gates_passed": str(metrics["passed"])})
        mlflow.log_dict(metrics, "metrics.json")
        mlflow.log_artifacts(str(folder), artifact_path="eval")
        return run.info.run_id

