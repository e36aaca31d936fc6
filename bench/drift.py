"""Benchmark: does `monitor` flag shifted batches, and leave in-distribution ones alone? How long does a
check take at scale?

Reference: `--ref-n` lesions from hospital A (dermatoscope), as the training split would be. For each
of `--seeds` seeds, three batches of `--batch-n` lesions, drawn with new seeds:
  reference   hospital A, dermatoscope (the same distribution: should not be flagged)
  camera      hospital A's patients photographed with a phone (colour cast, blur, JPEG)
  site        another hospital: lamp lighting and a darker skin-type mix
Each batch is embedded with the fixed encoder (the built-in base's frozen vision tower) and judged by
the drift decision of `monitor` (Evidently's EmbeddingsDrift method and threshold from params.yaml,
after the same subsampling and PCA; the HTML picture is left out of this loop). Then one timed check of
a `--scale`-image batch against a `--scale`-image reference: embedding, and the full Evidently report as
`monitor` runs it. Saves bench/results/drift.json.

    python bench/drift.py [--seeds 20] [--batch-n 200] [--ref-n 600] [--scale 10000]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import config, monitor, synth  # noqa: E402

NO_FAULTS = {"vague": 0.0, "mismatch": 0.0, "exact_duplicate": 0.0, "near_duplicate": 0.0, "corrupt": 0.0,
             "not_image": 0.0, "empty_file": 0.0}
CONDITIONS = {
    "reference": dict(site="hospital_a", camera="dermatoscope"),
    "camera": dict(site="hospital_a", camera="phone"),
    "site": dict(site="hospital_c", camera="lamp", skin_mix={"I": 0.5, "II": 0.5, "III": 1, "IV": 2, "V": 2, "VI": 2}),
}


def images(params: config.Params, out: Path, n: int, seed: int, **kw) -> list[str]:
    cfg = dataclasses.replace(params.synth, n=n, seed=seed, faults=dataclasses.replace(params.synth.faults, **NO_FAULTS),
                              **kw)
    synth.run(cfg, params.data, out)
    return sorted(str(p) for p in (out / "images").iterdir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--batch-n", type=int, default=200)
    ap.add_argument("--ref-n", type=int, default=600)
    ap.add_argument("--scale", type=int, default=10000, help="images per side of the timed check (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "drift.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    params = config.load(ROOT / "params.yaml")
    base = Path(params.paths.models) / "base"
    if not (ROOT / base / "config.json").is_file() and not (base / "config.json").is_file():
        sys.exit(f"drift: the built-in base is missing at {base}: run `make demo` (or `python -m pipeline base`)")
    os.chdir(ROOT)
    encoder = monitor.FixedEncoder(params)
    m = params.monitor
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = encoder(images(params, tmp / "ref", args.ref_n, 0))
        runs = {c: [] for c in CONDITIONS}
        for seed in range(args.seeds):
            for cond, kw in CONDITIONS.items():
                emb = encoder(images(params, tmp / f"{cond}-{seed}", args.batch_n, 2000 + seed, **kw))
                score, drifted = monitor.embedding_drift_score(ref, emb, m)
                runs[cond].append({"seed": seed, "score": score, "drifted": drifted})
            print(f"seed {seed:2d}: " + "  ".join(f"{c} {runs[c][-1]['score']:.3f}{'*' if runs[c][-1]['drifted'] else ''}"
                                                 for c in CONDITIONS), flush=True)
        rates = {c: sum(r["drifted"] for r in v) / len(v) for c, v in runs.items()}
        timing = {}
        if args.scale:
            t0 = time.perf_counter()
            ref_files = images(params, tmp / "scale-ref", args.scale, 50_000)
            cur_files = images(params, tmp / "scale-cur", args.scale, 60_000, **CONDITIONS["camera"])
            t1 = time.perf_counter()
            big_ref, big_cur = encoder(ref_files), encoder(cur_files)
            t2 = time.perf_counter()
            _, score, _ = monitor.evidently_report(big_ref, big_cur, None, None, m)
            t3 = time.perf_counter()
            timing = {"images_per_side": args.scale, "synth_seconds": round(t1 - t0, 1),
                      "embed_seconds": round(t2 - t1, 1), "evidently_seconds": round(t3 - t2, 1),
                      "check_seconds": round(t3 - t1, 1), "score": score}
    result = {"method": m.embedding.method, "threshold": m.embedding.threshold, "max_rows": m.max_rows,
              "pca_components": m.pca_components, "seeds": args.seeds, "batch_n": args.batch_n, "ref_n": args.ref_n,
              "flag_rate": rates, "runs": runs, "timing": timing,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}}
    print(f"\nflag rate ({m.embedding.method} > {m.embedding.threshold}): " +
          ", ".join(f"{c} {r:.0%}" for c, r in rates.items()))
    if timing:
        print(f"{args.scale:,} vs {args.scale:,} images: embedding {timing['embed_seconds']} s + Evidently "
              f"{timing['evidently_seconds']} s = {timing['check_seconds']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
