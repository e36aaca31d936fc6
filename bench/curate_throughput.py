"""Benchmark: curation throughput (images/s) on generated images.

Times `curate.run` on a synthetic set of --n images (default 5,000, with the default fault mix):
the per-row checks plus duplicate search alone, and the whole stage with the cross-fitted
mismatch detector. Prints the figures and saves bench/results/curate_throughput.json.

    python bench/curate_throughput.py [--n 5000] [--detector-n 5000] [--set curate.mismatch.epochs=10]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import config, curate, data as dataio, synth  # noqa: E402


def timed_curate(folder: Path, params: config.Params, detector: bool) -> tuple[float, dict]:
    cfg = params.curate
    cfg = dataclasses.replace(cfg, mismatch=dataclasses.replace(cfg.mismatch, enabled=detector))
    t0 = time.perf_counter()
    rows = dataio.read_manifest(dataio.find_manifest(folder))
    result = curate.run(rows, folder, cfg, params.data)
    return time.perf_counter() - t0, result.report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--detector-n", type=int, default=5000, help="images for the run with the detector (0: skip)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench/results/curate_throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = config.load(ROOT / "params.yaml", args.overrides)
    figures = {"cores": os.cpu_count(), "image_size": params.synth.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "raw"
        t0 = time.perf_counter()
        summary = synth.run(dataclasses.replace(params.synth, n=args.n), params.data, folder)
        figures["synth_images_per_s"] = round(summary["rows"] / (time.perf_counter() - t0), 1)
        seconds, report = timed_curate(folder, params, detector=False)
        figures.update(rows=report["rows_in"], checks_seconds=round(seconds, 1),
                       checks_images_per_s=round(report["rows_in"] / seconds, 1))
        print(f"checks + duplicates: {report['rows_in']} rows in {seconds:.1f} s = {report['rows_in'] / seconds:.0f} images/s")
        if args.detector_n:
            sub = Path(tmp) / "sub"
            synth.run(dataclasses.replace(params.synth, n=args.detector_n), params.data, sub)
            seconds, report = timed_curate(sub, params, detector=True)
            figures.update(detector_rows=report["rows_in"], full_seconds=round(seconds, 1),
                           full_images_per_s=round(report["rows_in"] / seconds, 2),
                           detector=config.flatten(params.curate.mismatch))
            print(f"with mismatch detector: {report['rows_in']} rows in {seconds:.1f} s = {report['rows_in'] / seconds:.1f} images/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
