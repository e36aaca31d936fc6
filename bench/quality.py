"""Benchmark: the committed defaults, end to end, on both benchmarks, 3 seeds each (the README's headline).

For each domain and seed, in a fresh folder: make the data (synth / examples/parts/generate.py with that
seed), then `curate`, `split`, `base`, `train`, `evaluate` through the command line with the committed
params file and only the seeds overridden (synth or generator, curate's detector, split, train,
evaluate; the base's own seed stays, it stands in for one foundation model). The validation split is
evaluated as an extra set (`evaluate.sets.val`), so each run reports val and test macro-F1. Nothing here
chooses a setting: the test figures are read once, after the fact.

Saved per run and as mean ± sd per domain: val and test macro-F1, ignore rate, perceptual score,
mismatch AUROC, the largest subgroup macro-F1 gap and its upper bound, the positive-recall gap and its
upper bound, whether every gate passed; and each stage's seconds.

    python bench/quality.py [--domains lesions,parts] [--seeds 0,1,2] [--jobs 1] [--work bench/work/quality] [--resume]

`--trained RESULTS:ARM` skips what `bench/val_arms.py` has already done for an arm that was then adopted:
each seed's folder of that arm (its data, curation, split, base and adapter, made by the same commands,
seeds and thread count as here) is copied, its test split put back, and only `evaluate` runs, as DVC
re-runs only the stages whose inputs changed. It refuses unless every override of the arm is what the
params file now holds, and the folder's base and adapter hashes are the ones RESULTS recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = {
    "lesions": {"params": ROOT / "params.yaml", "split": "data/split", "curated": "data/curated", "reports": "reports",
                "models": "models"},
    "parts": {"params": ROOT / "examples/parts/params.yaml", "split": "work/parts/split", "curated": "work/parts/curated", "reports": "work/parts/reports",
              "models": "work/parts/models"},
}
STAGES = ("curate", "split", "base", "train", "evaluate")


def make_data(domain: str, seed: int, work: Path, env: dict) -> list[str]:
    if domain == "lesions":
        return [sys.executable, "-m", "pipeline", "synth", "--params", str(DOMAINS[domain]["params"]),
                "--set", f"synth.seed={seed}"]
    return [sys.executable, str(ROOT / "examples/parts/generate.py"), "--out", "work/parts/raw", "--seed", str(seed)]


def seed_folder(work: Path, domain: str, seed: int) -> Path:
    """Where bench/val_arms.py keeps one seed's shared data and its arms' runs."""
    return work / domain / f"seed{seed}"


def adopted_arm(spec: str, domain: str) -> dict:
    """`RESULTS:ARM` of bench/val_arms.py, checked: its domain, and every override equal to the params file's value."""
    import yaml

    path, name = spec.rsplit(":", 1)
    saved = json.loads(Path(path).read_text())
    if saved["domain"] != domain or name not in saved["arms"]:
        raise SystemExit(f"--trained {spec}: no arm {name!r} of domain {domain!r} in {path}")
    params = yaml.safe_load(DOMAINS[domain]["params"].read_text())
    for o in saved["arms"][name]["overrides"]:
        key, value = o.split("=", 1)
        node = params
        for k in key.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        if node != yaml.safe_load(value):
            raise SystemExit(f"--trained {spec}: {key} is {node!r} in {DOMAINS[domain]['params'].name}, the arm "
                             f"trained with {value}: adopt the arm first, or run without --trained")
    cmd = saved["command"].split()
    work = Path(cmd[cmd.index("--work") + 1]) if "--work" in cmd else ROOT / "bench" / "work" / "val_arms"
    return {"spec": spec, "work": work if work.is_absolute() else ROOT / work, "arm": name,
            "runs": {r["seed"]: r for r in saved["arms"][name]["runs"]}, "shared_seconds": saved["shared_seconds"]}


def reuse(trained: dict, domain: str, seed: int, work: Path) -> dict:
    """Copy the adopted arm's run of this seed into `work`, its test split put back; the seconds it took."""
    d, run = DOMAINS[domain], trained["runs"].get(seed)
    src = seed_folder(trained["work"], domain, seed)
    if run is None or not (src / trained["arm"]).is_dir():
        raise SystemExit(f"--trained {trained['spec']}: no run of seed {seed} in {src}")
    shutil.copytree(src / trained["arm"], work, symlinks=True, ignore=shutil.ignore_patterns("*.log"))
    shutil.copyfile(src / "shared" / d["split"] / "test.jsonl", work / d["split"] / "test.jsonl")
    if (work / d["models"] / "base" / "weights_sha256.txt").read_text().strip() != run.get("base_sha256"):
        raise SystemExit(f"--trained: seed {seed}'s base in {src} is not the one {trained['spec']} recorded")
    if json.loads((work / d["reports"] / "metrics.json").read_text()).get("adapter_sha256") != run.get("adapter_sha256"):
        raise SystemExit(f"--trained: seed {seed}'s adapter in {src} is not the one {trained['spec']} recorded")
    return {**trained["shared_seconds"][str(seed)], **{k: v for k, v in run["seconds"].items() if k != "evaluate"}}


def one(domain: str, seed: int, work_root: Path, threads: int, resume: bool = False, trained: dict | None = None) -> dict:
    work = work_root / domain / f"seed{seed}"
    if resume and (work / "result.json").is_file():  # a run that finished in an earlier invocation
        out = json.loads((work / "result.json").read_text())
        print(json.dumps({**out, "resumed": True}), flush=True)
        return out
    shutil.rmtree(work, ignore_errors=True)
    if trained is None:
        work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db", "MLFLOW_DISABLE_TELEMETRY": "true"}
    d = DOMAINS[domain]
    seeds = [f"curate.mismatch.seed={seed}", f"split.seed={seed}", f"train.seed={seed}", f"evaluate.seed={seed}",
             f"evaluate.sets={{val: {d['split']}/val.jsonl}}"]
    seconds = reuse(trained, domain, seed, work) if trained else {}
    for stage, cmd in ([] if trained else [("data", make_data(domain, seed, work, env))]) + [
            (s, [sys.executable, "-m", "pipeline", s, "--params", str(d["params"]), *[f"--set={o}" for o in seeds]])
            for s in (("evaluate",) if trained else STAGES)]:
        start = time.perf_counter()
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        seconds[stage] = round(time.perf_counter() - start, 1)
        (work / f"{stage}.log").write_text(r.stdout + r.stderr)
        if r.returncode not in (0, 1) or (r.returncode == 1 and stage != "evaluate"):
            raise RuntimeError(f"{domain} seed {seed}: {stage} exited {r.returncode}: {r.stderr[-2000:]}")
    m = json.loads((work / d["reports"] / "metrics.json").read_text())
    if trained and m["adapter_sha256"] != trained["runs"][seed].get("adapter_sha256"):  # the one evaluate loaded
        raise SystemExit(f"--trained: seed {seed}'s adapter is not the one {trained['spec']} recorded")
    cur = json.loads((work / d["curated"] / "report.json").read_text())
    sel = json.loads((work / d["models"] / "train_metrics.json").read_text()).get("selection", {"metric": "last"})
    b = m.get("bias", {})
    positive = next((k for k in b if k.startswith("max_gap_recall_") and not k.endswith(("_ci", "_groups"))), None)
    out = {"domain": domain, "seed": seed,
           "val_f1_macro": m["sets"]["val"]["f1_macro"], "test_f1_macro": m["f1_macro"],
           "ignore_rate": m["image_reliance"]["ignore_rate"],
           "perceptual_score": m["image_reliance"]["perceptual_score"],
           "mismatch_auroc": m["mismatch_auroc"],
           "bias_gap": b.get("max_gap"), "bias_gap_upper": (b.get("max_gap_ci") or [None, None])[1],
           "recall_gap": b.get(positive) if positive else None,
           "recall_gap_upper": (b.get("max_gap_recall_ci") or [None, None])[1],
           "gates_passed": all(g["passed"] for g in m["gates"].values()),
           "failed_gates": [k for k, g in m["gates"].items() if not g["passed"]],
           "n_test": m["n"], "n_val": m["sets"]["val"]["n"], "seconds": seconds,
           # what a later run of the same seed must reproduce: the base's and the adapter's weights
           "base_sha256": (work / d["models"] / "base" / "weights_sha256.txt").read_text().strip(),
           "adapter_sha256": m["adapter_sha256"],
           # train.select: the kept epoch, its validation macro-F1 (the figure it was chosen on) and the last check's
           "selection": {k: sel.get(k) for k in ("metric", "every", "epoch", "f1_macro", "last_f1_macro")},
           "trained_by": f"bench/val_arms.py, {trained['spec']} (evaluate run here)" if trained else None,
           "curate": {"accepted": cur.get("accepted"), "quarantined": cur.get("quarantined"), "reasons": cur.get("reasons"),
                      "mismatch": {k: cur.get("mismatch", {}).get(k) for k in ("model", "rule", "flagged")}}}
    (work / "result.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out), flush=True)
    return out


def packages() -> dict[str, str]:
    """The versions that decide the numbers: on the same ones, threads and machine a run should reproduce to the bit."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchvision", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy",
                 "pillow", "scikit-learn", "open_clip_torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict]) -> dict:
    keys = ("val_f1_macro", "test_f1_macro", "ignore_rate", "perceptual_score", "mismatch_auroc", "bias_gap",
            "bias_gap_upper", "recall_gap", "recall_gap_upper")
    out = {}
    for domain in sorted({r["domain"] for r in runs}):
        rs = [r for r in runs if r["domain"] == domain]
        row = {"n": len(rs), "gates_passed": f"{sum(r['gates_passed'] for r in rs)}/{len(rs)}"}
        for k in keys:
            vals = [r[k] for r in rs if r[k] is not None]
            if vals:
                row[k] = mean_sd(vals)
        out[domain] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", default="lesions,parts")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "quality"))
    ap.add_argument("--out", default="quality.json")
    ap.add_argument("--resume", action="store_true", help="reuse the runs that finished in --work (result.json)")
    ap.add_argument("--trained", default=None, metavar="RESULTS:ARM",
                    help="evaluate the adopted arm's runs of bench/val_arms.py (RESULTS: its saved file) instead of "
                         "making them again: one domain only (module docstring)")
    ap.add_argument("--keep-other-domains", action="store_true",
                    help="keep the saved runs of the domains not in --domains (marked kept_from) in --out")
    a = ap.parse_args()
    jobs = [(d, int(s)) for d in a.domains.split(",") for s in a.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    if a.trained and "," in a.domains:
        raise SystemExit("--trained: one domain at a time (--domains)")
    trained = adopted_arm(a.trained, a.domains) if a.trained else None
    start = time.perf_counter()
    with ThreadPoolExecutor(a.jobs) as pool:
        runs = list(pool.map(lambda j: one(j[0], j[1], Path(a.work), threads, a.resume, trained), jobs))
    path = ROOT / "bench" / "results" / a.out
    kept = []
    if a.keep_other_domains and path.is_file():
        old = json.loads(path.read_text())
        kept = [{**r, "kept_from": r.get("kept_from", old["command"])} for r in old["runs"]
                if r["domain"] not in a.domains.split(",")]
    runs = kept + runs
    summary = summarise(runs)
    for domain, row in summary.items():
        print(domain, json.dumps({k: (f"{v['mean']:.3f} ± {v['sd']:.3f}" if isinstance(v, dict) else v)
                                  for k, v in row.items()}))
    result = {"command": "python bench/quality.py " + " ".join(sys.argv[1:]), "machine": platform.platform(),
              "cpus": os.cpu_count(), "packages": packages(), "minutes": round((time.perf_counter() - start) / 60, 1),
              "summary": summary, "runs": runs}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
