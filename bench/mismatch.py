"""Benchmark: how well curate's mismatch detector finds swapped captions, and how few clean pairs it flags.

Data: the default benchmark (`typical` attributes, two sites with their own cameras) with no fault but
swapped captions (random or same-site swaps, 10 % and 20 %), and clean data (no swap at all: the default
benchmark and the second domain, `examples/parts`). Every image goes through curate's own image checks
(`checks.check_images`, which computes the detector's frozen features), every set is scored by the
committed detector (`params.yaml`, `curate.mismatch`).

Reported per run and as mean ± sd over the seeds: AUROC and AUPRC of the mismatch score, precision /
recall / F1 **at the committed rule** and F1 at the prevalence-matched threshold (flag as many pairs as
there are swaps), and the share of pairs flagged (on clean data: the share wrongly quarantined).

The heads' epochs and the rule's two settings (`margin`, `max_preferred`) are chosen with `--choose` on a validation seed that
the report never uses (seed 0; the report's seeds are 1, 2, 3): the pair with the best mean F1 on 10 %
random swaps among those that flag at most 1 % of the clean pairs, at 1,000 and 5,000 images.

    python bench/mismatch.py --choose          # -> bench/results/mismatch_choice.json
    python bench/mismatch.py [--sizes 300 1000 5000] [--seeds 1 2 3]   # -> bench/results/mismatch.json
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "parts"))
from pipeline import checks, config, mismatch, synth  # noqa: E402

CASES = [("random", 0.1), ("random", 0.2), ("same_site", 0.1), ("same_site", 0.2), ("clean", 0.0), ("parts_clean", 0.0)]


def make_set(params: config.Params, case: str, noise: float, n: int, seed: int, out: Path) -> None:
    if case == "parts_clean":
        import generate

        generate.main(["--out", str(out), "--n", str(n), "--seed", str(seed), "--vague", "0", "--mismatch", "0",
                       "--duplicates", "0", "--corrupt", "0"])
        return
    faults = dataclasses.replace(params.synth.faults, vague=0, mismatch=noise,
                                 mismatch_mode="random" if case == "clean" else case, exact_duplicate=0,
                                 near_duplicate=0, corrupt=0, not_image=0, empty_file=0)
    synth.run(dataclasses.replace(params.synth, n=n, seed=seed, faults=faults, site="hospital_a,hospital_b",
                                  camera="dermatoscope,phone"), params.data, out)


def features_of(folder: Path, cfg: config.Curate) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(features, captions, is-swapped) of every row whose image passes curate's checks."""
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    truth = {r["id"]: r["fault"] for r in csv.DictReader(open(folder / "truth.csv"))}
    recs = [checks.Row(index=i, raw=r) for i, r in enumerate(rows)]
    checks.check_images(recs, [folder] * len(recs), cfg)
    ok = [r for r in recs if not r.reasons]
    return (np.stack([r.features for r in ok]), [r.raw["caption"] for r in ok],
            np.array([truth[r.raw["id"]] == "mismatch" for r in ok]))


def measure(x: np.ndarray, captions: list[str], y: np.ndarray, cfg: config.Mismatch) -> dict:
    t0 = time.perf_counter()
    s = mismatch.score_features(x, captions, cfg)
    seconds = time.perf_counter() - t0
    flag = s.flags(cfg)
    res = {"pairs": len(y), "swapped": int(y.sum()), "flagged": int(flag.sum()),
           "flagged_share": round(float(flag.mean()), 4), "score_seconds": round(seconds, 1)}
    if y.any():
        p, r, f, _ = precision_recall_fscore_support(y, flag, average="binary", zero_division=0)
        top = np.zeros(len(y), bool)
        top[np.argsort(-s.mismatch_score, kind="stable")[: int(y.sum())]] = True
        res.update(auroc=round(float(roc_auc_score(y, s.mismatch_score)), 4),
                   auprc=round(float(average_precision_score(y, s.mismatch_score)), 4),
                   precision=round(float(p), 4), recall=round(float(r), 4), f1=round(float(f), 4),
                   f1_at_prevalence=round(float(precision_recall_fscore_support(y, top, average="binary")[2]), 4))
    return res


def choose(params: config.Params, seed: int, sizes: list[int]) -> dict:
    grid = list(itertools.product([15, 30], [1.0, 2.0, 3.0], [0.1, 0.2, 0.3]))
    table: dict[str, list] = {f"{e}/{m}/{c}": [] for e, m, c in grid}
    for n in sizes:
        for case, noise in (("random", 0.1), ("clean", 0.0)):
            with tempfile.TemporaryDirectory() as tmp:
                make_set(params, case, noise, n, seed, Path(tmp))
                x, caps, y = features_of(Path(tmp), params.curate)
            for e, m, c in grid:
                cfg = dataclasses.replace(params.curate.mismatch, head_epochs=e, margin=m, max_preferred=c)
                r = measure(x, caps, y, cfg)
                table[f"{e}/{m}/{c}"].append({"n": n, "case": case, **r})
                print(f"n={n} {case:<7} head_epochs={e} margin={m} max_preferred={c}: flagged {r['flagged_share']:.3f}"
                      + (f" F1 {r['f1']:.3f}" if "f1" in r else ""), flush=True)
    summary = {}
    for key, runs in table.items():
        summary[key] = {"f1": round(float(np.mean([r["f1"] for r in runs if r["case"] == "random"])), 4),
                        "clean_flagged": round(float(max(r["flagged_share"] for r in runs if r["case"] == "clean")), 4)}
    allowed = {k: v for k, v in summary.items() if v["clean_flagged"] <= 0.01}
    best = max(allowed or summary, key=lambda k: (allowed or summary)[k]["f1"])
    epochs, margin, share = best.split("/")
    return {"validation_seed": seed, "sizes": sizes, "criterion": "best mean F1 on 10 % random swaps with at most "
            "1 % of clean pairs flagged", "grid": "head_epochs/margin/max_preferred", "summary": summary,
            "chosen": {"head_epochs": int(epochs), "margin": float(margin), "max_preferred": float(share)},
            "runs": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 5000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--choose", action="store_true", help="choose head_epochs / margin / max_preferred on the validation seed")
    ap.add_argument("--val-seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = config.load(ROOT / "params.yaml", args.overrides)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    if args.choose:
        choice = choose(params, args.val_seed, [s for s in args.sizes if s >= 1000] or args.sizes)
        Path(args.out or results / "mismatch_choice.json").write_text(json.dumps(choice, indent=1) + "\n")
        print(json.dumps({"chosen": choice["chosen"], "summary": choice["summary"]}, indent=1))
        return
    assert args.val_seed not in args.seeds, "the validation seed is not reported"
    runs = []
    for n in args.sizes:
        for case, noise in CASES:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    make_set(params, case, noise, n, seed, Path(tmp))
                    x, caps, y = features_of(Path(tmp), params.curate)
                r = {"n": n, "case": case, "noise": noise, "seed": seed, **measure(x, caps, y, params.curate.mismatch)}
                runs.append(r)
                print(json.dumps(r), flush=True)
    summary = []
    for n in args.sizes:
        for case, noise in CASES:
            group = [r for r in runs if r["n"] == n and r["case"] == case and r["noise"] == noise]
            row = {"n": n, "case": case, "noise": noise, "seeds": len(group)}
            for k in ("auroc", "auprc", "precision", "recall", "f1", "f1_at_prevalence", "flagged_share", "score_seconds"):
                vals = [r[k] for r in group if k in r]
                if vals:
                    row[k] = {"mean": round(float(np.mean(vals)), 4), "sd": round(float(np.std(vals, ddof=1)), 4)}
            summary.append(row)
    print(f"\n{'n':>5} {'case':<12}{'noise':>6} | {'AUROC':>13} {'AUPRC':>13} {'P':>6} {'R':>6} {'F1':>13} "
          f"{'F1@prev':>8} | {'flagged':>8}")
    for s in summary:
        def ms(k):
            return f"{s[k]['mean']:.3f}±{s[k]['sd']:.3f}" if k in s else "-"
        print(f"{s['n']:>5} {s['case']:<12}{s['noise']:>6.2f} | {ms('auroc'):>13} {ms('auprc'):>13} "
              f"{s.get('precision', {}).get('mean', float('nan')):>6.3f} {s.get('recall', {}).get('mean', float('nan')):>6.3f} "
              f"{ms('f1'):>13} {s.get('f1_at_prevalence', {}).get('mean', float('nan')):>8.3f} | {ms('flagged_share'):>8}")
    out = {"detector": config.flatten(params.curate.mismatch), "validation_seed": args.val_seed,
           "seeds": args.seeds, "summary": summary, "runs": runs}
    Path(args.out or results / "mismatch.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
