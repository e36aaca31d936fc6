"""Near-duplicate search at scale: multi-index hashing (`checks.near_pairs`) against the exhaustive scan.

Hashes are real 256-bit pHashes of generated images (`synth`, 2,000 at 48 px), grown to N by drawing one
and flipping 40 random bits (a distinct picture of the same kind: far beyond the 26-bit threshold, but
sharing most of its structure, which is what makes the buckets of a pHash index large), and 1 % of them
replaced by near duplicates of another (0-20 bits off). Both searches
run on the same hashes and must return the same pairs; the exhaustive one is timed in full up to 30,000
hashes and extrapolated (quadratic) beyond. Saves bench/results/near_duplicates.json.

    python bench/near_duplicates.py [--sizes 10000,30000,100000] [--bits 26]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import checks, config, synth

ROOT = Path(__file__).resolve().parents[1]


def exhaustive(h: np.ndarray, max_bits: int) -> int:
    return int(sum(int((np.bitwise_count(h[i + 1 :] ^ h[i]).sum(1) <= max_bits).sum()) for i in range(len(h))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--bits", type=int, default=26)
    ap.add_argument("--exhaustive-up-to", type=int, default=30000)
    args = ap.parse_args()
    params = config.load(ROOT / "params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        clean = dataclasses.replace(params.synth.faults, vague=0.0, mismatch=0.0, exact_duplicate=0.0, near_duplicate=0.0,
                                    corrupt=0.0, not_image=0.0, empty_file=0.0)
        cfg = dataclasses.replace(params.synth, n=2000, image_size=48, seed=11, faults=clean)
        synth.run(cfg, params.data, Path(tmp))
        seeds = np.stack([checks.phash(Image.open(p).convert("RGB")) for p in sorted(Path(tmp, "images").iterdir())])
    rng = np.random.default_rng(0)
    rows = []
    for n in map(int, args.sizes.split(",")):
        bits = np.unpackbits(seeds[rng.integers(0, len(seeds), n)].view(np.uint8), axis=1)
        for row in bits:
            row[rng.choice(256, 40, replace=False)] ^= 1
        plant = rng.choice(n, n // 100, replace=False)  # 1 %: near duplicates of another row (0-20 bits off)
        for k in plant:
            bits[k] = bits[rng.integers(0, n)]
            bits[k, rng.choice(256, int(rng.integers(0, 21)), replace=False)] ^= 1
        h = np.packbits(bits, axis=1).view(np.uint64)
        t = time.perf_counter()
        pairs = checks.near_pairs(h, args.bits)
        mih = time.perf_counter() - t
        row = {"n": n, "pairs": len(pairs), "multi_index_s": round(mih, 2)}
        if n <= args.exhaustive_up_to:
            t = time.perf_counter()
            row["exhaustive_pairs"] = exhaustive(h, args.bits)
            row["exhaustive_s"] = round(time.perf_counter() - t, 2)
            assert row["exhaustive_pairs"] == len(pairs), row
        else:
            last = next(r for r in reversed(rows) if "exhaustive_s" in r)
            row["exhaustive_s_extrapolated"] = round(last["exhaustive_s"] * (n / last["n"]) ** 2, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"threshold_bits": args.bits,
           "hashes": "pHash-256 of 2,000 synth images, grown by 40-bit flips; 1 % planted near duplicates (0-20 bits)",
           "rows": rows}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "near_duplicates.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
