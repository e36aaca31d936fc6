"""Power of the bias gates: the smallest gap between two subgroups that the test split can detect.

For each grouping of the subgroup values (each value alone, and `evaluate.bias.groups` from the params),
at the test split's own group sizes: the minimal detectable difference (MDD) of a proportion between the
two smallest groups, two-sided at `--alpha` with Bonferroni over the pairs of groups, at `--power`:

    MDD = (z[1 - alpha / (2 m)] + z[power]) * sqrt(p (1 - p) (1 / n1 + 1 / n2)),   m = pairs of groups

for macro-F1 (p = `--f1`, n = the groups' sizes; F1 treated as a proportion of samples, an approximation)
and for recall of `data.positive_label` (p = `--recall`, n = the groups' positive counts). A gate whose
threshold lies under the MDD cannot tell a real gap from the noise of small groups. The planning values
are inputs, not test figures (defaults: the gates' own targets). Also simulated: the bootstrap upper bound
the evaluate stage would report when there is *no* gap (every group at the planning value), mean over
`--sims` simulated test sets. Prints and saves bench/results/bias_power.json.

    python bench/bias_power.py [--params params.yaml] [--split data/split] [--out bias_power.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import config, data as dataio, scoring  # noqa: E402


def mdd(p: float, n1: int, n2: int, alpha: float, power: float, pairs: int) -> float | None:
    if min(n1, n2) == 0:
        return None
    z = norm.ppf(1 - alpha / (2 * max(pairs, 1))) + norm.ppf(power)
    return float(z * np.sqrt(p * (1 - p) * (1 / n1 + 1 / n2)))


def null_upper_bound(sizes: dict[str, tuple[int, int]], labels: list[str], positive: str, acc: float,
                     cfg: config.Bias, sims: int, seed: int) -> dict:
    """Mean (and 90th percentile) of the bootstrap upper bounds of the F1 and recall gaps when every group
    is classified equally well (each sample right with probability `acc`, else another label)."""
    rng = np.random.default_rng(seed)
    f1_ub, rec_ub = [], []
    for s in range(sims):
        y, p, g = [], [], []
        for name, (n, n_pos) in sizes.items():
            others = [lab for lab in labels if lab != positive]
            truth = [positive] * n_pos + [others[i % len(others)] for i in range(n - n_pos)]
            for t in truth:
                right = rng.random() < acc
                y.append(t)
                p.append(t if right else str(rng.choice([lab for lab in labels if lab != t])))
                g.append(name)
        b = scoring.bias(y, p, g, positive, cfg, seed=s)
        if b["max_gap_ci"]:
            f1_ub.append(b["max_gap_ci"][1])
        if b.get("max_gap_recall_ci"):
            rec_ub.append(b["max_gap_recall_ci"][1])

    def summary(v: list[float]) -> dict | None:
        return {"mean": float(np.mean(v)), "p90": float(np.quantile(v, 0.9))} if v else None

    return {"f1_gap_upper_bound": summary(f1_ub), "recall_gap_upper_bound": summary(rec_ub)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--split", default=None, help="default: paths.split of the params")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--power", type=float, default=0.8)
    ap.add_argument("--f1", type=float, default=None, help="planning macro-F1 (default: evaluate.gates.min_f1_macro)")
    ap.add_argument("--recall", type=float, default=0.8, help="planning recall of the positive label")
    ap.add_argument("--sims", type=int, default=200)
    ap.add_argument("--out", default="bias_power.json")
    a = ap.parse_args()
    params = config.load(a.params)
    split = Path(a.split or params.paths.split)
    test = dataio.read_jsonl(split / "test.jsonl")
    key, positive = params.data.subgroups[0], params.data.positive_label
    f1 = a.f1 if a.f1 is not None else params.evaluate.gates.min_f1_macro
    groupings = {"each value": {}}
    if params.evaluate.bias.groups:
        groupings["evaluate.bias.groups"] = params.evaluate.bias.groups
    cfg = params.evaluate.bias
    out = {"params": a.params, "split": str(split), "subgroup": key, "positive_label": positive, "n_test": len(test),
           "alpha": a.alpha, "power": a.power, "planning_f1": f1, "planning_recall": a.recall, "groupings": {}}
    for gname, mapping in groupings.items():
        sizes: dict[str, list[int]] = {}
        for r in test:
            v = str((r.get("subgroups") or {}).get(key, "unknown"))
            grp = mapping.get(v, v)
            sizes.setdefault(grp, [0, 0])
            sizes[grp][0] += 1
            sizes[grp][1] += int(r["label"] == positive)
        judged = {k: v for k, v in sizes.items() if v[0] >= cfg.min_group_size}
        pairs = len(judged) * (len(judged) - 1) // 2
        by_n = sorted(judged.values())
        by_pos = sorted(v[1] for v in judged.values())
        row = {"groups": {k: {"n": v[0], "n_positive": v[1]} for k, v in sorted(sizes.items())},
               "pairs": pairs,
               "mdd_f1_smallest_pair": mdd(f1, by_n[0][0], by_n[1][0], a.alpha, a.power, pairs) if len(by_n) > 1 else None,
               "mdd_recall_smallest_pair": mdd(a.recall, by_pos[0], by_pos[1], a.alpha, a.power, pairs) if len(by_pos) > 1 else None}
        row.update(null_upper_bound({k: tuple(v) for k, v in judged.items()}, list(params.data.labels), positive, f1,
                                    cfg, a.sims, seed=0))
        out["groupings"][gname] = row
        print(f"{gname}: groups {row['groups']}")
        print(f"  smallest detectable gap (alpha {a.alpha}, Bonferroni over {pairs} pairs, power {a.power}): "
              f"macro-F1 {row['mdd_f1_smallest_pair']}, recall of {positive} {row['mdd_recall_smallest_pair']}")
        print(f"  with no gap at all, the bootstrap upper bound: F1 {row['f1_gap_upper_bound']}, "
              f"recall {row['recall_gap_upper_bound']}")
    path = ROOT / "bench" / "results" / a.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
