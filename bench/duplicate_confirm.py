"""Choosing `curate.near_duplicate_confirm` on a generator seed outside the benchmarks' (seeds 0-2).

For each domain's data (the lesion generator, `synth`; the parts, `examples/parts/generate.py`), every
pair of readable images within `curate.near_duplicate_bits` of each other (256-bit pHash) is scored by
`checks.aligned_difference`, and the generator's truth says which pairs are planted copies (a near copy and
its source, an exact copy) and which are two distinct pictures. Per candidate threshold: the planted
near copies caught and the distinct pairs taken for copies (what the pHash alone takes: threshold none).
Saves bench/results/duplicate_confirm.json.

    python bench/duplicate_confirm.py [--seed 5] [--thresholds 0.03,0.04,0.05,0.06,0.07,0.08,0.1]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import checks, config, synth  # noqa: E402


def make(domain: str, seed: int, out: Path) -> tuple[list[dict], dict[str, dict]]:
    if domain == "parts":
        subprocess.run([sys.executable, str(ROOT / "examples/parts/generate.py"), "--out", str(out), "--seed", str(seed)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    else:
        params = config.load(ROOT / "params.yaml", [f"synth.seed={seed}"])
        synth.run(params.synth, params.data, out)
    truth = {t["id"]: {"fault": t["fault"], "source": t["source_id"]} for t in csv.DictReader(open(out / "truth.csv"))}
    return list(csv.DictReader(open(out / "manifest.csv"))), truth


def score(rows: list[dict], truth: dict, root: Path, bits: int) -> tuple[dict, list[float], list[float]]:
    """The pairs' summary, then the aligned differences of the copy pairs and of the distinct pairs."""
    ids, hashes, thumbs = [], [], []
    for r in rows:
        try:
            path = root / r["image"]
            with Image.open(path) as img:
                hashes.append(checks.phash(img.convert("RGB")))
            thumbs.append(checks.thumbnail(path))
            ids.append(r["id"])
        except Exception:  # corrupt and empty files: curate quarantines them before this check
            continue
    pairs = checks.near_pairs(np.stack(hashes), bits)
    same, distinct = [], []
    for i, j in pairs:
        a, b = ids[int(i)], ids[int(j)]
        ta, tb = truth.get(a, {}), truth.get(b, {})
        copy = ta.get("source") == b or tb.get("source") == a or (ta.get("source") and ta.get("source") == tb.get("source")
                                                                  and "duplicate" in (ta.get("fault", "") + tb.get("fault", "")))
        (same if copy else distinct).append(checks.aligned_difference(thumbs[int(i)], thumbs[int(j)]))
    planted = sum(1 for t in truth.values() if t["fault"] == "near_duplicate")
    return {"images": len(ids), "candidate_pairs": len(pairs), "planted_near_copies": planted,
            "copy_pairs": np.round(sorted(same), 4).tolist(), "distinct_pairs": len(distinct),
            "distinct_differences": np.round(np.percentile(distinct, [0, 1, 5, 50]), 4).tolist() if distinct else []}, same, distinct


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--thresholds", default="0.03,0.04,0.05,0.06,0.07,0.08,0.1")  # the saved run's
    args = ap.parse_args()
    bits = config.load(ROOT / "params.yaml").curate.near_duplicate_bits
    out = {"command": "python bench/duplicate_confirm.py " + " ".join(sys.argv[1:]), "seed": args.seed,
           "near_duplicate_bits": bits, "domains": {}}
    for domain in ("lesions", "parts"):
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw"
            rows, truth = make(domain, args.seed, raw)
            info, same, distinct = score(rows, truth, raw, bits)
        table = [{"threshold": None, "copies_kept_as_copies": len(same), "distinct_taken_for_copies": len(distinct)}]
        for t in map(float, args.thresholds.split(",")):
            table.append({"threshold": t, "copies_kept_as_copies": int(sum(d <= t for d in same)),
                          "distinct_taken_for_copies": int(sum(d <= t for d in distinct))})
        out["domains"][domain] = {**info, "by_threshold": table}
        print(domain, json.dumps(table), flush=True)
    path = ROOT / "bench/results/duplicate_confirm.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
