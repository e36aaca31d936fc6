"""`split`: leakage-free (grouped by patient), stratified on label x subgroup (docs/design.md §3.3).

Patients are assigned whole to a split. A greedy pass places the largest patients first, then a seeded
local search moves and swaps patients to bring every stratum's count in every split to its target
(fraction x stratum size). Strata smaller than `min_stratum` are merged into `<label>|*` (and, if still
too small, into `*|*`); the report records every merge and every stratum's share per split.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import chat, data as dataio
from pipeline.config import Data, Params, Split
from pipeline.errors import InputError

SHARE_TOLERANCE = 0.02  # 2 percentage points
SMALL_STRATUM = 50  # strata under this may instead be off by at most one sample


@dataclass
class Result:
    splits: dict[str, list[dict]]
    val_mismatch: list[dict]
    report: dict


def stratum_of(record: dict, subgroups: tuple[str, ...]) -> str:
    """'melanoma|V' for label melanoma, subgroup fitzpatrick=V."""
    values = [str(record.get("subgroups", {}).get(g, "unknown")) for g in subgroups]
    return "|".join([str(record.get("label"))] + values)


def merge_small(strata: list[str], min_size: int) -> tuple[list[str], dict[str, str]]:
    """Map strata under `min_size` to '<label>|*', then to '*' if the pool is still too small."""
    counts = Counter(strata)
    merges = {s: s.split("|")[0] + "|*" for s, c in counts.items() if c < min_size}
    pooled = Counter(merges.get(s, s) for s in strata)
    merges.update({s: "*" for s, m in merges.items() if pooled[m] < min_size})
    return [merges.get(s, s) for s in strata], merges


def _objective(counts: np.ndarray, targets: np.ndarray, sizes_target: np.ndarray) -> float:
    """Squared share deviations: counts, targets (n_splits, n_strata); sizes_target (n_splits,)."""
    dev = (counts - targets) / sizes_target[:, None]
    size_dev = (counts.sum(1) - sizes_target) / sizes_target
    return float((dev**2).sum() + 4 * (size_dev**2).sum())


def assign_groups(group_counts: np.ndarray, fractions: np.ndarray, seed: int, iters: int) -> np.ndarray:
    """Split index per group; group_counts (n_groups, n_strata) -> (n_groups,)."""
    rng = random.Random(seed)
    n_groups = len(group_counts)
    targets = fractions[:, None] * group_counts.sum(0)[None, :]  # (n_splits, n_strata)
    sizes_target = fractions * group_counts.sum()
    counts = np.zeros_like(targets)
    assign = np.empty(n_groups, int)
    order = sorted(range(n_groups), key=lambda g: (-group_counts[g].sum(), rng.random()))
    for g in order:  # greedy: the split whose objective grows least
        costs = []
        for s in range(len(fractions)):
            counts[s] += group_counts[g]
            costs.append(_objective(counts, targets, sizes_target))
            counts[s] -= group_counts[g]
        assign[g] = int(np.argmin(costs))
        counts[assign[g]] += group_counts[g]
    best = _objective(counts, targets, sizes_target)
    for _ in range(iters):  # local search: move one group, or swap two
        a = rng.randrange(n_groups)
        if rng.random() < 0.5:
            b, moves = None, [(a, rng.choice([s for s in range(len(fractions)) if s != assign[a]]))]
        else:
            b = rng.randrange(n_groups)
            if assign[a] == assign[b]:
                continue
            moves = [(a, assign[b]), (b, assign[a])]
        old = {g: assign[g] for g, _ in moves}
        for g, s in moves:
            counts[assign[g]] -= group_counts[g]
            counts[s] += group_counts[g]
            assign[g] = s
        cost = _objective(counts, targets, sizes_target)
        if cost < best - 1e-12:
            best = cost
            continue
        for g, s in old.items():  # undo
            counts[assign[g]] -= group_counts[g]
            counts[s] += group_counts[g]
            assign[g] = s
    return assign


def stratum_table(strata: list[str], split_of: list[str], names: list[str]) -> list[dict]:
    """Share of every stratum in every split against the full set, with the tolerance verdict."""
    total, n = Counter(strata), len(strata)
    per_split = {s: Counter(k for k, sp in zip(strata, split_of) if sp == s) for s in names}
    sizes = Counter(split_of)
    rows = []
    for k in sorted(total):
        for s in names:
            c, n_s = per_split[s][k], sizes[s]
            share, full = (c / n_s if n_s else 0.0), total[k] / n
            expected = total[k] * n_s / n
            ok = abs(share - full) <= SHARE_TOLERANCE + 1e-9 or (total[k] < SMALL_STRATUM and abs(c - expected) <= 1 + 1e-9)
            rows.append({"stratum": k, "split": s, "count": c, "expected": round(expected, 3),
                         "share": round(share, 5), "share_full": round(full, 5),
                         "diff_pp": round(100 * (share - full), 3), "within_tolerance": bool(ok)})
    return rows


def make_val_mismatch(val: list[dict], pool: list[dict], fraction: float, seed: int) -> list[dict]:
    """Val pairs (mismatched: false) plus copies of a `fraction` of them whose caption is swapped for
    one of a different label (mismatched: true)."""
    rng = random.Random(seed + 7)
    out = [{**r, "mismatched": False} for r in val]
    chosen = rng.sample(range(len(val)), int(round(fraction * len(val)))) if val else []
    for i in sorted(chosen):
        r = val[i]
        donors = [d for d in (val if any(d["label"] != r["label"] for d in val) else pool) if d["label"] != r["label"]]
        if not donors:
            continue
        d = donors[rng.randrange(len(donors))]
        swapped = chat.with_answer(r["messages"], chat.answer(d["messages"]))
        out.append({**r, "id": f"{r['id']}#mismatch", "messages": swapped, "mismatched": True,
                    "caption_source": d["id"], "caption_label": d["label"]})
    return out


def search(records, strata, group_counts, p_index, names, fractions, cfg: Split) -> list[str]:
    """Seeded restarts of the assignment until every stratum is within tolerance (else the best)."""
    best, best_bad = None, None
    for restart in range(cfg.restarts):
        assign = assign_groups(group_counts, fractions, cfg.seed * 1000 + restart, cfg.search_iters)
        split_of = [names[assign[p_index[r["patient_id"]]]] for r in records]
        bad = sum(not row["within_tolerance"] for row in stratum_table(strata, split_of, names))
        if best_bad is None or bad < best_bad:
            best, best_bad = split_of, bad
        if bad == 0:
            break
    return best


def run(records: list[dict], cfg: Split, data: Data, pinned: frozenset[str] = frozenset()) -> Result:
    """Split curated records; pure function of (records, cfg, pinned). Patients in `pinned` (those of
    an earlier test set) are put in test after the search, so that an old test set stays unseen."""
    if not records:
        raise InputError("split: no curated samples to split")
    names = list(cfg.fractions)
    fractions = np.array([cfg.fractions[s] for s in names], float)
    if (fractions <= 0).any() or abs(fractions.sum() - 1) > 1e-6:
        raise InputError(f"split.fractions must be positive and sum to 1, got {cfg.fractions}")
    if "val" not in names:
        raise InputError("split.fractions needs a 'val' split (val_mismatch is built from it)")
    records = sorted(records, key=lambda r: r["id"])
    fine = [stratum_of(r, data.subgroups) for r in records]
    strata, merges = merge_small(fine, cfg.min_stratum)
    keys = sorted(set(strata))
    patients = sorted({r["patient_id"] for r in records})
    p_index, k_index = {p: i for i, p in enumerate(patients)}, {k: i for i, k in enumerate(keys)}
    group_counts = np.zeros((len(patients), len(keys)))
    for r, k in zip(records, strata):
        group_counts[p_index[r["patient_id"]], k_index[k]] += 1
    split_of = search(records, strata, group_counts, p_index, names, fractions, cfg)
    if pinned:
        if "test" not in names:
            raise InputError("split.pinned_test needs a 'test' split")
        split_of = ["test" if r["patient_id"] in pinned else s for r, s in zip(records, split_of)]
    splits = {s: [r for r, sp in zip(records, split_of) if sp == s] for s in names}
    val_mm = make_val_mismatch(splits["val"], splits.get("train", records), cfg.mismatch_fraction, cfg.seed)
    return Result(splits, val_mm, _report(records, splits, strata, split_of, names, merges, cfg, fine))


def _report(records, splits, strata, split_of, names, merges, cfg, fine) -> dict:
    table = stratum_table(strata, split_of, names)
    by_patient = defaultdict(set)
    by_image = defaultdict(set)
    for r, s in zip(records, split_of):
        by_patient[r["patient_id"]].add(s)
        by_image[r.get("image_sha256", r["id"])].add(s)
    return {
        "seed": cfg.seed, "fractions": cfg.fractions,
        "sizes": {s: len(v) for s, v in splits.items()},
        "patients": {s: len({r["patient_id"] for r in v}) for s, v in splits.items()},
        "patient_overlap": sum(1 for v in by_patient.values() if len(v) > 1),
        "image_overlap": sum(1 for v in by_image.values() if len(v) > 1),
        "merges": dict(sorted(merges.items())),
        "strata": table,
        "fine_strata": stratum_table(fine, split_of, names),
        "all_within_tolerance": all(row["within_tolerance"] for row in table),
    }



def main(params: Params) -> dict:
    """Read `paths.curated/samples.jsonl`, write `paths.split` atomically."""
    src = Path(params.paths.curated) / "samples.jsonl"
    if not src.is_file():
        raise InputError(f"split: {src} not found (run curate first)")
    pinned = set()
    for f in params.split.pinned_test:
        if not Path(f).is_file():
            raise InputError(f"split.pinned_test: {f} not found")
        pinned |= {r["patient_id"] for r in dataio.read_jsonl(Path(f))}
    result = run(dataio.read_jsonl(src), params.split, params.data, frozenset(pinned))
    with dataio.atomic_dir(Path(params.paths.split)) as out:
        for name, recs in result.splits.items():
            dataio.write_jsonl(out / f"{name}.jsonl", recs)
        dataio.write_jsonl(out / "val_mismatch.jsonl", result.val_mismatch)
        dataio.write_json(out / "report.json", result.report)
    return {k: result.report[k] for k in ("sizes", "patient_overlap", "all_within_tolerance", "merges")}
