"""Benchmark: the whole `curate` stage's throughput (images/s) and peak memory on generated images.

Generates --n images of the default benchmark (with its default fault mix; in parallel chunks, one per
core, each its own sites so that ids stay unique), then times `curate.run` end to end in a fresh process:
manifest rows, image checks and features in the worker processes (`curate.workers`), exact and
near-duplicate search, the mismatch detector (`curate.mismatch`, scored for real, no cache). Peak RSS is
reported for the stage's main process and for its largest worker. Saves bench/results/curate_throughput.json.

    python bench/curate_throughput.py [--n 100000] [--set curate.workers=2]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import config, synth  # noqa: E402


def _generate(args: tuple[list[str], int, int, str]) -> str:
    overrides, n, seed, folder = args
    params = config.load(ROOT / "params.yaml", overrides)
    sites = f"site{seed}a,site{seed}b"
    synth.run(dataclasses.replace(params.synth, n=n, seed=seed, site=sites, camera="dermatoscope,phone"),
              params.data, Path(folder))
    return folder


def generate(overrides: list[str], n: int, out: Path, parts: int) -> int:
    """`parts` synthetic chunks in parallel, merged into one dataset folder; returns its row count."""
    sizes = [n // parts + (i < n % parts) for i in range(parts)]
    folders = [str(out / f"part{i}") for i in range(parts)]
    with ProcessPoolExecutor(parts) as ex:
        list(ex.map(_generate, [(overrides, s, 100 + i, f) for i, (s, f) in enumerate(zip(sizes, folders))]))
    rows = []
    for f in folders:
        for r in csv.DictReader(open(Path(f) / "manifest.csv")):
            r["image"] = f"{Path(f).name}/{r['image']}"
            rows.append(r)
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def measure(folder: Path, overrides: list[str]) -> dict:
    """In this (fresh) process: curate the folder, return times and peak memory."""
    import torch

    from pipeline import curate, data as dataio

    torch.set_num_threads(os.cpu_count() or 1)
    params = config.load(ROOT / "params.yaml", overrides)
    os.environ["PIPELINE_CACHE"] = tempfile.mkdtemp()  # scored for real
    t0 = time.perf_counter()
    rows = dataio.read_manifest(dataio.find_manifest(folder))
    result = curate.run(rows, folder, params.curate, params.data)
    seconds = time.perf_counter() - t0
    m = result.report["mismatch"]
    return {"rows": result.report["rows_in"], "seconds": round(seconds, 1),
            "images_per_s": round(result.report["rows_in"] / seconds, 1),
            "peak_rss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_rss_worker_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "accepted": result.report["accepted"], "reasons": result.report["reasons"],
            "mismatch_scored": m.get("scored"), "mismatch_flagged": m.get("flagged")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: curate this folder, print JSON
    ap.add_argument("--out", default=str(ROOT / "bench/results/curate_throughput.json"))
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure), args.overrides)))
        return
    params = config.load(ROOT / "params.yaml", args.overrides)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rows = generate(args.overrides, args.n, Path(tmp), cores)
        gen_seconds = time.perf_counter() - t0
        print(f"generated {rows} rows in {gen_seconds:.0f} s", flush=True)
        cmd = [sys.executable, __file__, "--measure", tmp] + [f"--set={o}" for o in args.overrides]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    figures = {"cores": cores, "n": args.n, "image_size": params.synth.image_size,
               "generate_seconds": round(gen_seconds, 1), **json.loads(out),
               "workers": params.curate.workers or cores, "detector": config.flatten(params.curate.mismatch)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
