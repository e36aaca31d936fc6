"""Benchmark: does the three-part loss help, and do separate learning rates help? (Evaluation issue)

On the default synthetic benchmark (the split and built-in base that `dvc repro` wrote), for each seed:
  three_part   the defaults: contrastive + CE + MSE (0.4 / 0.5 / 0.1), train.lr.vision / train.lr.text
  ce_only      cross-entropy only (0 / 1 / 0), same learning rates
  single_lr    the three-part loss with one learning rate for both sides (--single-lr, default: the
               vision side's train.lr.vision)
Each run trains an adapter from the same base with `train.seed` = the seed and evaluates it on the
*validation* split (a comparison that chooses a design is made on val; the test split is not read):
macro-F1, ignore rate and the answer log-likelihood AUROC on the known mismatched val pairs, which need no
alignment heads, so every arm is judged alike. The cosine alignment-score AUROC and R@1 need the heads;
the cross-entropy-only arm never trains them (its alignment weights are 0), so for it they are not
reported (null) rather than measured on random heads. Runs go in separate processes, `--jobs` at a time,
2 threads each. Prints mean ± sd per variant and saves bench/results/ablation.json.

    python bench/ablation.py [--seeds 3] [--jobs 1] [--split data/split] [--base models/base]
    python bench/ablation.py --quality bench/work/quality --variants three_part,ce_only   # on quality's runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("f1_macro", "ignore_rate", "mismatch_auroc_loglik", "mismatch_auroc", "r@1")
HEAD_FREE = METRICS[:3]


def variants(single_lr: float) -> dict[str, list[str]]:
    return {
        "three_part": [],
        "ce_only": ["train.loss.w_con=0", "train.loss.w_ce=1.0", "train.loss.w_mse=0"],
        "single_lr": [f"train.lr.vision={single_lr}", f"train.lr.text={single_lr}"],
    }


def one(variant: str, seed: int, overrides: list[str], split: str, base: str, work: Path, extra: list[str],
        reuse: str | None = None) -> dict:
    """Child process body: train + evaluate one (variant, seed); returns the metrics. `reuse`: an adapter
    already trained with exactly this variant's settings and seed on this split and base (a
    `bench/quality.py` run of the defaults): evaluated, not trained again."""
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(ROOT))
    from pipeline import config, data as dataio, scoring, train

    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "base").exists():
        os.symlink(Path(base).resolve(), models / "base")
    p = config.load(ROOT / "params.yaml", [f"paths.split={split}", f"paths.models={models}",
                                           f"paths.reports={work / 'reports'}", f"train.seed={seed}",
                                           f"evaluate.seed={seed}", *overrides, *extra])
    start = time.perf_counter()
    if reuse:
        os.symlink(Path(reuse).resolve(), models / "adapter")
        tm = json.loads((Path(reuse).parent / "train_metrics.json").read_text())
    else:
        tm = train.run(p, dataio.read_jsonl(Path(split) / "train.jsonl"), dataio.read_jsonl(Path(split) / "val.jsonl"))
    val = {"test": dataio.read_jsonl(Path(split) / "val.jsonl")}  # the primary slot holds val: test is not read
    m, _ = scoring.evaluate_adapter(models / "adapter", val, dataio.read_jsonl(Path(split) / "val_mismatch.jsonl"), p)
    heads = p.train.loss.w_con > 0 or p.train.loss.w_mse > 0
    return {"variant": variant, "seed": seed, "split": "val", "f1_macro": m["f1_macro"],
            "ignore_rate": m["image_reliance"]["ignore_rate"], "mismatch_auroc_loglik": m["mismatch_auroc_loglik"],
            "mismatch_auroc": m["mismatch_auroc"] if heads else None, "r@1": m["retrieval"]["r@1"] if heads else None, "f1_per_class": m["f1_per_class"], "steps": tm["steps"],
            "final_ce": tm["final"].get("loss/ce"), "seconds": round(time.perf_counter() - start, 1)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == v]
        out[v] = {}
        for k in METRICS:
            vals = [r[k] for r in rows if r[k] is not None]
            out[v][k] = {"mean": statistics.fmean(vals) if vals else None,
                         "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (2 threads each)")
    ap.add_argument("--split", default="data/split")
    ap.add_argument("--base", default="models/base")
    ap.add_argument("--single-lr", type=float, default=None, help="default: params' train.lr.vision")
    ap.add_argument("--variants", default="three_part,ce_only,single_lr", help="which arms, comma-separated")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra params override for every run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ablation.json"))
    ap.add_argument("--quality", default=None, help="a bench/quality.py work folder: seed s runs on its lesions/seed<s> "
                    "project (its split and base) and its default-trained adapter is the three_part arm")
    ap.add_argument("--reuse", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, metavar=("VARIANT", "SEED", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single_lr is None:
        sys.path.insert(0, str(ROOT))
        from pipeline import config

        args.single_lr = config.load(ROOT / "params.yaml", args.extra).train.lr.vision
    table = {k: v for k, v in variants(args.single_lr).items() if k in args.variants.split(",")}
    if args.child:
        v, seed, work = args.child
        print(json.dumps(one(v, int(seed), table[v], args.split, args.base, Path(work), args.extra, args.reuse)))
        return

    def project(seed: int) -> Path | None:
        return Path(args.quality).resolve() / "lesions" / f"seed{seed}" if args.quality else None

    for s in range(args.seeds):
        where = project(s) or Path(".")
        for need in (where / args.split / "train.jsonl", where / args.base / "config.json"):
            if not need.is_file():
                sys.exit(f"ablation: {need} not found: run `make demo` (or dvc repro, or bench/quality.py) first")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    todo = [(v, s) for s in range(args.seeds) for v in table]
    runs, running = [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        while todo or running:
            while todo and len(running) < args.jobs:
                v, s = todo.pop(0)
                cmd = [sys.executable, __file__, "--split", args.split, "--base", args.base, "--variants", args.variants,
                       "--single-lr", str(args.single_lr), "--child", v, str(s), f"{tmp}/{v}-{s}"]
                cmd += [x for e in args.extra for x in ("--set", e)]
                where = project(s)
                if where is not None and v == "three_part" and (where / "models" / "adapter").is_dir():
                    cmd += ["--reuse", str(where / "models" / "adapter")]
                running.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                cwd=where))
            time.sleep(1)
            for proc in [r for r in running if r.poll() is not None]:
                running.remove(proc)
                out, err = proc.communicate()
                if proc.returncode:
                    sys.exit(f"ablation: a run failed:\n{err[-3000:]}")
                runs.append(json.loads(out.strip().splitlines()[-1]))
                print(f"  {runs[-1]['variant']:<11} seed {runs[-1]['seed']}: F1 {runs[-1]['f1_macro']:.3f} "
                      f"ignore {runs[-1]['ignore_rate']:.3f} ({runs[-1]['seconds']} s)", flush=True)
    summary = summarise(sorted(runs, key=lambda r: (list(table).index(r["variant"]), r["seed"])))
    print(f"\n{'variant':<12}" + "".join(f"{k:>22}" for k in METRICS))
    for v, row in summary.items():
        cells = "".join(f"{row[k]['mean']:>14.3f} ± {row[k]['sd']:.3f}" if row[k]["mean"] is not None else f"{'n/a':>22}"
                        for k in METRICS)
        print(f"{v:<12}{cells}")
    result = {"command": "python bench/ablation.py " + " ".join(sys.argv[1:]), "summary": summary, "runs": runs,
              "seeds": args.seeds, "single_lr": args.single_lr, "quality": args.quality, "evaluated_on": "val",
              "extra": args.extra, "wall_seconds": round(time.perf_counter() - start, 1),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "jobs": args.jobs}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
