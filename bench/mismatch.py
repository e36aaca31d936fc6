"""Benchmark: how well curate's mismatch detector finds swapped captions, against known ground truth.

For random swaps and same-site swaps (two sites, two cameras), at 10 % and 20 % noise, on a synthetic
benchmark with no other faults: AUROC, AUPRC and F1 at the prevalence-matched threshold (flag as many
pairs as there are swaps), for our score (CSLS, cross-fitted) and for plain 1 - cosine from the same
encoder. Prints a table and saves bench/results/mismatch.json.

    python bench/mismatch.py [--n 1200] [--seeds 0] [--set curate.mismatch.epochs=20 ...]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import config, mismatch, synth  # noqa: E402


def prevalence_f1(y: np.ndarray, score: np.ndarray) -> float:
    """F1 when the top-k scores are flagged, k = number of true mismatches."""
    flag = np.zeros(len(y), bool)
    flag[np.argsort(-score, kind="stable")[: int(y.sum())]] = True
    return float(f1_score(y, flag))


def one_run(params: config.Params, n: int, noise: float, mode: str, seed: int) -> dict:
    faults = dataclasses.replace(params.synth.faults, vague=0, mismatch=noise, mismatch_mode=mode, exact_duplicate=0,
                                 near_duplicate=0, corrupt=0, not_image=0, empty_file=0)
    cfg = dataclasses.replace(params.synth, n=n, seed=seed, faults=faults, site="hospital_a,hospital_b",
                              camera="dermatoscope,phone")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        synth.run(cfg, params.data, out)
        rows = list(csv.DictReader(open(out / "manifest.csv")))
        truth = {r["id"]: r["fault"] for r in csv.DictReader(open(out / "truth.csv"))}
        y = np.array([truth[r["id"]] == "mismatch" for r in rows])
        t0 = time.perf_counter()
        s = mismatch.score_pairs([str(out / r["image"]) for r in rows], [r["caption"] for r in rows],
                                 params.curate.mismatch)
        seconds = time.perf_counter() - t0
    res = {"mode": mode, "noise": noise, "seed": seed, "n": len(rows), "seconds": round(seconds, 1)}
    for name, score in (("csls", -s.csls), ("cosine", 1 - s.cosine)):
        res[name] = {"auroc": round(float(roc_auc_score(y, score)), 4),
                     "auprc": round(float(average_precision_score(y, score)), 4),
                     "f1_at_prevalence": round(prevalence_f1(y, score), 4)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--modes", nargs="+", default=["random", "same_site"])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench/results/mismatch.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = config.load(ROOT / "params.yaml", args.overrides)
    runs = []
    print(f"{'swaps':<10}{'noise':>6}{'seed':>5}{'n':>6} | {'AUROC':>6} {'AUPRC':>6} {'F1@p':>6} | "
          f"{'1-cos AUROC':>11} {'AUPRC':>6} {'F1@p':>6} | {'s':>5}")
    for mode in args.modes:
        for noise in args.noise:
            for seed in args.seeds:
                r = one_run(params, args.n, noise, mode, seed)
                runs.append(r)
                c, p = r["csls"], r["cosine"]
                print(f"{mode:<10}{noise:>6.2f}{seed:>5}{r['n']:>6} | {c['auroc']:>6.3f} {c['auprc']:>6.3f} "
                      f"{c['f1_at_prevalence']:>6.3f} | {p['auroc']:>11.3f} {p['auprc']:>6.3f} "
                      f"{p['f1_at_prevalence']:>6.3f} | {r['seconds']:>5.0f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"params": config.flatten(params.curate.mismatch), "runs": runs}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
