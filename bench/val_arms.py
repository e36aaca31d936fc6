"""Choosing a model setting on the validation split: candidate arms against the committed params.

For one domain and each seed of `--seeds`, the data, `curate` and `split` run once with the committed
params (seeds as in `bench/quality.py`); then each arm runs `base`, `train` and `evaluate` with its own params overrides
(e.g. more image tokens, smaller patches: settings that change the base, so every arm pre-trains its own).
Arms whose overrides touch neither `model.*` nor `base.*` keys share one base, pre-trained once beside the
data (the base reads only its own params and the training split, so theirs would be the same weights).
Every arm is evaluated on the **validation** split: its split folder's `test.jsonl` is the validation
split, so `evaluate`'s figures are validation figures and the test split is never read. `committed` is the
arm with no overrides. A choice needs the mean over seeds: one seed's arm differs by ±0.1 on the parts
from its base's rounding alone. Saves bench/results/val_arms_<domain>.json (or `--out`): per arm and seed,
macro-F1, per-label F1, ignore rate, seconds and the run's per-epoch validation answer cross-entropy
(MLflow's `val/ce`: its last and lowest value), and per arm the mean ± sd over the seeds; earlier
invocations' results are kept under `earlier`. `--collect` adds the `val/ce` figures to a saved file's runs
from their work folders (files saved before they were recorded), training nothing.

    python bench/val_arms.py --domain parts --seeds 0,1,2 --jobs 3 \\
        --arm tokens36=model.tokens_per_image=36 --arm patch4=model.tokens_per_image=36,model.vision.patch_size=4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import DOMAINS, ROOT, make_data, mean_sd, packages, seed_folder  # noqa: E402


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode not in (0, 1) or (r.returncode == 1 and "evaluate" not in cmd):
        raise RuntimeError(f"{' '.join(cmd[:4])} in {cwd} exited {r.returncode}: {r.stderr[-2000:]}")
    return round(time.perf_counter() - start, 1)


def prepare(d: dict, domain: str, seed: int, work: Path, env: dict, seeds: list[str], share_base: bool) -> dict:
    """Data, curate, split (and the shared base) of one seed, once: kept in `work/shared` for every arm."""
    shared = work / "shared"
    if (shared / "done").is_file() and share_base and "base" not in json.loads((shared / "done").read_text()):
        (shared / "done").unlink()  # data made before base sharing: made again, with its base
    if (shared / "done").is_file():
        return json.loads((shared / "done").read_text())
    shutil.rmtree(shared, ignore_errors=True)
    shared.mkdir(parents=True)
    e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{shared}/mlflow.db"}
    seconds = {"data": run(make_data(domain, seed, shared, e), shared, e, shared / "data.log")}
    for stage in ("curate", "split", "base") if share_base else ("curate", "split"):  # no arm shares it: none made
        seconds[stage] = run([sys.executable, "-m", "pipeline", stage, "--params", str(d["params"]),
                              *[f"--set={o}" for o in seeds]], shared, e, shared / f"{stage}.log")
    (shared / "done").write_text(json.dumps(seconds))
    return seconds


def seed_overrides(seed: int) -> list[str]:
    return [f"curate.mismatch.seed={seed}", f"split.seed={seed}", f"train.seed={seed}", f"evaluate.seed={seed}",
            "evaluate.sets={}"]


def split_top(spec: str) -> list[str]:
    """`a=1,b=[x, y]` -> ['a=1', 'b=[x, y]']: commas inside brackets belong to a YAML list."""
    out, depth, cur = [], 0, ""
    for ch in spec:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur] if cur else out


def val_ce(folder: Path) -> dict | None:
    """The training run's per-epoch `val/ce` in the folder's MLflow store: last value, lowest and its epoch
    (None where the folder holds no store: none is created)."""
    import mlflow

    if not (folder / "mlflow.db").is_file():
        return None
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        hist = sorted(client.get_metric_history(run.info.run_id, "val/ce"), key=lambda m: m.step)
        if hist:
            low = min(range(len(hist)), key=lambda i: hist[i].value)
            return {"last": hist[-1].value, "min": hist[low].value, "min_epoch": low + 1, "epochs": len(hist)}
    return None


def collect(dst: Path, work: Path) -> None:
    """Adds each run's `val/ce` to the saved file `dst` from the runs' folders under `work`; trains nothing.
    A run whose folder is gone keeps the figure the file holds."""
    saved = json.loads(dst.read_text())
    for a in saved["arms"].values():
        for r in a["runs"]:
            r["val_ce"] = val_ce(seed_folder(work, saved["domain"], r["seed"]) / r["arm"]) or r.get("val_ce")
    dst.write_text(json.dumps(saved, indent=1) + "\n")


def summarise(arms: dict, results: list[dict]) -> dict:
    """Per arm: its overrides, every seed's figures, and the mean ± sd of macro-F1 and ignore rate."""
    out = {}
    for name in arms:
        runs = sorted((r for r in results if r["arm"] == name), key=lambda r: r["seed"])
        out[name] = {"overrides": arms[name], "seeds": [r["seed"] for r in runs],
                     "val_f1_macro": mean_sd([r["val_f1_macro"] for r in runs]),
                     "val_ignore_rate": mean_sd([r["val_ignore_rate"] for r in runs]), "runs": runs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="parts", choices=sorted(DOMAINS))
    ap.add_argument("--seeds", default="0", help="comma-separated: each arm runs on every seed's data")
    ap.add_argument("--arm", action="append", default=[], help="NAME=key=value[,key=value...]")
    ap.add_argument("--committed", action="store_true", help="also run the committed params as an arm")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "val_arms"))
    ap.add_argument("--out", default=None, help="default: bench/results/val_arms_<domain>.json")
    ap.add_argument("--collect", action="store_true",
                    help="add val/ce to the saved file's runs (--out or the default) from their work folders; train nothing")
    args = ap.parse_args()
    dst = Path(args.out) if args.out else ROOT / "bench" / "results" / f"val_arms_{args.domain}.json"
    if args.collect:
        collect(dst, Path(args.work).resolve())
        print(f"saved {dst}")
        return
    arms = {name: split_top(spec) for name, spec in (a.split("=", 1) for a in args.arm)}
    if args.committed:
        arms = {"committed": [], **arms}
    d, seed_list = DOMAINS[args.domain], [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    needs_base = lambda name: any(o.startswith(("model.", "base.")) for o in arms[name])  # noqa: E731
    share_base = any(not needs_base(a) for a in arms)
    work_of = lambda seed: seed_folder(Path(args.work).resolve(), args.domain, seed)  # noqa: E731
    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, len(seed_list)))) as pool:
        shared_seconds = dict(zip(seed_list, pool.map(
            lambda s: prepare(d, args.domain, s, work_of(s), env, seed_overrides(s), share_base), seed_list)))

    def one(job: tuple[int, str]) -> dict:
        seed, name = job
        folder = work_of(seed) / name
        shared = work_of(seed) / "shared"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(shared, folder, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "*.log", "done"))
        split = folder / d["split"]
        shutil.copyfile(split / "val.jsonl", split / "test.jsonl")  # evaluate reads val: the test split is never read
        e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
        secs = {}
        for stage in ("base", "train", "evaluate"):
            if stage == "base" and not needs_base(name):
                continue  # the shared base, copied with the data
            secs[stage] = run([sys.executable, "-m", "pipeline", stage, "--params", str(d["params"]),
                               *[f"--set={o}" for o in seed_overrides(seed) + arms[name]]], folder, e, folder / f"{stage}.log")
        m = json.loads((folder / d["reports"] / "metrics.json").read_text())
        sel = json.loads((folder / d["models"] / "train_metrics.json").read_text()).get("selection", {"metric": "last"})
        out = {"arm": name, "seed": seed, "val_f1_macro": m["f1_macro"], "val_per_label_f1": m.get("f1_per_class"),
               "val_ignore_rate": m["image_reliance"]["ignore_rate"], "n_val": m["n"], "seconds": secs,
               "shared_base": not needs_base(name), "val_ce": val_ce(folder),
               # what a later run of the same seed and arm must reproduce (as bench/quality.py records)
               "base_sha256": (folder / d["models"] / "base" / "weights_sha256.txt").read_text().strip(),
               "adapter_sha256": m.get("adapter_sha256"),
               "selection": {k: sel.get(k) for k in ("metric", "epoch", "f1_macro", "last_f1_macro")}}
        print(json.dumps(out), flush=True)
        return out

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, [(s, a) for a in arms for s in seed_list]))
    earlier = json.loads(dst.read_text()) if dst.is_file() else {}
    out = {"command": " ".join(["python", "bench/val_arms.py", *sys.argv[1:]]), "domain": args.domain,
           "seeds": seed_list, "packages": packages(), "split_read": "validation only (each arm's test.jsonl is the validation split)",
           "shared_seconds": shared_seconds, "arms": summarise(arms, results)}
    if earlier:  # earlier invocations: kept, for the record
        out["earlier"] = [{k: v for k, v in earlier.items() if k not in ("earlier", "earlier_data")}] + \
            earlier.get("earlier", []) + earlier.get("earlier_data", [])
    dst.write_text(json.dumps(out, indent=1) + "\n")
    for name, a in out["arms"].items():
        print(f"{name}: val macro-F1 {a['val_f1_macro']['mean']:.3f} ± {a['val_f1_macro']['sd']:.3f}, "
              f"ignore {a['val_ignore_rate']['mean']:.3f} ± {a['val_ignore_rate']['sd']:.3f}")
    print(f"saved {dst}")


if __name__ == "__main__":
    main()
