"""Choosing a model setting on the validation split: candidate arms against the committed params.

For one domain and seed, the data, `curate` and `split` run once with the committed params (seeds as in
`bench/quality.py`); then each arm runs `base`, `train` and `evaluate` with its own params overrides
(e.g. more image tokens, smaller patches: settings that change the base, so every arm pre-trains its own).
Arms whose overrides touch neither `model.*` nor `base.*` keys share one base, pre-trained once beside the
data (the base reads only its own params and the training split, so theirs would be the same weights).
Every arm is evaluated on the **validation** split: its split folder's `test.jsonl` is the validation
split, so `evaluate`'s figures are validation figures and the test split is never read. `committed` is the
arm with no overrides. Saves bench/results/val_arms_<domain>.json: per arm, macro-F1, per-label F1,
ignore rate, seconds and the command that ran it (arms of earlier runs on the same seed are kept).

    python bench/val_arms.py --domain parts --seed 0 --jobs 2 \\
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
from quality import DOMAINS, ROOT, make_data  # noqa: E402


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    if r.returncode not in (0, 1) or (r.returncode == 1 and "evaluate" not in cmd):
        raise RuntimeError(f"{' '.join(cmd[:4])} in {cwd} exited {r.returncode}: {r.stderr[-2000:]}")
    return round(time.perf_counter() - start, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domain", default="parts", choices=sorted(DOMAINS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arm", action="append", default=[], help="NAME=key=value[,key=value...]")
    ap.add_argument("--committed", action="store_true", help="also run the committed params as an arm")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "val_arms"))
    args = ap.parse_args()
    arms = {name: spec.split(",") for name, spec in (a.split("=", 1) for a in args.arm)}
    if args.committed:
        arms = {"committed": [], **arms}
    d, seed = DOMAINS[args.domain], args.seed
    work = Path(args.work) / args.domain / f"seed{seed}"
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    seeds = [f"curate.mismatch.seed={seed}", f"split.seed={seed}", f"train.seed={seed}", f"evaluate.seed={seed}",
             "evaluate.sets={}"]
    shared = work / "shared"
    seconds: dict = {}
    needs_base = lambda name: any(o.startswith(("model.", "base.")) for o in arms[name])  # noqa: E731
    if (shared / "done").is_file() and any(not needs_base(a) for a in arms) and "base" not in json.loads((shared / "done").read_text()):
        (shared / "done").unlink()  # data made before base sharing: made again, with its base
    if not (shared / "done").is_file():
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
        e = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{shared}/mlflow.db"}
        seconds["data"] = run(make_data(args.domain, seed, shared, e), shared, e, shared / "data.log")
        for stage in ("curate", "split", "base"):
            seconds[stage] = run([sys.executable, "-m", "pipeline", stage, "--params", str(d["params"]),
                                  *[f"--set={o}" for o in seeds]], shared, e, shared / f"{stage}.log")
        (shared / "done").write_text(json.dumps(seconds))

    def one(name: str) -> dict:
        folder = work / name
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
                               *[f"--set={o}" for o in seeds + arms[name]]], folder, e, folder / f"{stage}.log")
        m = json.loads((folder / d["reports"] / "metrics.json").read_text())
        out = {"arm": name, "overrides": arms[name], "val_f1_macro": m["f1_macro"],
               "val_per_label_f1": m.get("f1_per_class") or m["sets"].get("test", {}).get("f1_per_class"),
               "val_ignore_rate": m["image_reliance"]["ignore_rate"], "n_val": m["n"], "seconds": secs,
               "shared_base": not needs_base(name)}
        print(json.dumps(out), flush=True)
        return out

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, arms))
    command = " ".join(["python", "bench/val_arms.py", *sys.argv[1:]])
    for r in results:
        r["command"] = command
    dst = ROOT / "bench" / "results" / f"val_arms_{args.domain}.json"
    earlier = json.loads(dst.read_text()) if dst.is_file() else {}
    report = json.loads((shared / d["curated"] / "report.json").read_text())
    data = {"curated_accepted": report["accepted"], "split_rows": {k: sum(1 for _ in open(shared / d["split"] / f"{k}.jsonl"))
                                                                   for k in ("train", "val", "test")}}
    same = earlier.get("seed") == seed and earlier.get("data") == data
    if same:  # arms of earlier invocations on the same data stay, unless re-run
        results = [r for r in earlier.get("arms", []) if r["arm"] not in arms] + results
    commands = [c for c in earlier.get("commands", [earlier["command"]] if "command" in earlier else []) if same] + [command]
    out = {"commands": commands, "domain": args.domain, "seed": seed, "data": data,
           "split_read": "validation only (each arm's test.jsonl is the validation split)",
           "shared_seconds": seconds or json.loads((shared / "done").read_text()), "arms": results}
    if earlier and not same:  # other data (e.g. the curate params changed): kept apart, for the record
        out["earlier_data"] = [{k: v for k, v in earlier.items() if k != "earlier_data"}] + earlier.get("earlier_data", [])
    elif earlier.get("earlier_data"):
        out["earlier_data"] = earlier["earlier_data"]
    dst.write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {dst}")


if __name__ == "__main__":
    main()
