"""Benchmark: the drift monitor as a power study. How often does it fire on same-distribution batches
(the false-alarm rate, against `monitor.alpha`), how often on shifted ones (power), does it name the kind
of shift, and how long does a 10,000-image check take?

Set-up (per domain: the default lesion benchmark, and `examples/parts`): a reference dataset (the
training + validation splits of a project), the built-in base pre-trained on it (`base`, committed
params) and a champion fine-tuned on its training split (`train`, `--train-steps` steps). Pools of new
images, one image per patient (so that a batch of n holds n independent units), drawn from the
reference distribution with other seeds; every pool row is embedded once by the fixed encoder and scored
once by the champion (per-pair InfoNCE loss, matched-pair cosine). A batch is a seeded draw from a pool,
and `monitor.judge` tests it exactly as `monitor` does (committed `monitor` params, the monitor seed
varied per batch so that the reference subsample and the permutations differ too):

  reference   same distribution                    (>= 100 seeds a size: the false-alarm rate)
  cast        colour cast                          severities 1-3 (channel gains up to 1.12 / 0.85)
  blur        Gaussian blur                        radius 0.4 / 0.8 / 1.2 px
  jpeg        JPEG compression                     quality 85 / 60 / 35
  camera      cast + blur + JPEG together          the same three severities
  lighting    a warm light ramp across the image   depth 10 / 20 / 30 %
  subgroup    the subgroup mix only                the later half of the subgroup values x 2 / 4 / 8
  prevalence  the label mix only                   `data.positive_label` x 2 / 4 / 8
  caption     the captions' wording only           25 / 50 / 100 % of the captions restyled
  mismatch    more mismatched pairs                5 / 15 / 30 % of the captions swapped

For each: the detection rate (any kind drifted), the rate at which the expected kind is named, and the
rate at which `covariate` is named; with Wilson 95 % intervals. Then one timed `monitor` check of a
`--scale`-image batch against a `--scale`-image reference (cold: reference embeddings computed; warm:
cached). Saves bench/results/drift.json and bench/results/drift_power.png.

    python bench/drift.py [--domains lesions,parts] [--null-seeds 100] [--seeds 20] [--sizes 50,200,1000]
                          [--scale 10000]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "parts"))
from pipeline import chat, config, data as dataio, monitor, synth  # noqa: E402

SEVERITIES = (1, 2, 3)
IMAGE_SHIFTS = ("cast", "blur", "jpeg", "camera", "lighting")
SHIFTS = IMAGE_SHIFTS + ("subgroup", "prevalence", "caption", "mismatch")
EXPECTED = {"cast": "covariate", "blur": "covariate", "jpeg": "covariate", "camera": "covariate",
            "lighting": "covariate", "subgroup": "subgroup", "prevalence": "prevalence", "caption": "text",
            "mismatch": "alignment"}


# ------------------------------------------------------------------------------------------ datasets
def generate(domain: str, params: config.Params, out: Path, n: int, seed: int, one_per_patient: bool) -> Path:
    """A clean raw dataset of the domain (no injected faults)."""
    if domain == "lesions":
        clean = {k: 0.0 for k in ("vague", "mismatch", "exact_duplicate", "near_duplicate", "corrupt", "not_image",
                                  "empty_file")}
        cfg = dataclasses.replace(params.synth, n=n, seed=seed, faults=dataclasses.replace(params.synth.faults, **clean),
                                  images_per_patient=(1, 1) if one_per_patient else params.synth.images_per_patient)
        synth.run(cfg, params.data, out)
    else:
        import generate as parts  # examples/parts/generate.py

        parts.main(["--out", str(out), "--n", str(n), "--seed", str(seed), "--prefix", f"s{seed}-", "--vague", "0",
                    "--mismatch", "0", "--duplicates", "0", "--corrupt", "0"])
    return out


def records_of(folder: Path, params: config.Params) -> list[dict]:
    rows = dataio.read_manifest(dataio.find_manifest(folder))
    return [{"id": r["id"], "image": str(folder / r["image"]), "label": r["label"], "patient_id": r["patient_id"],
             "subgroups": {g: r.get(g, "unknown") for g in params.data.subgroups},
             "messages": chat.messages(r["caption"], params.data.prompt, params.data.system_prompt)} for r in rows]


def project(domain: str, work: Path, ref_n: int, train_steps: int,
            base_steps: int | None = None) -> tuple[config.Params, list[dict], list[dict]]:
    """Reference dataset split by patient (75 / 25), base pre-trained on the training captions, champion
    (all kept under `work` and reused by a later run with the same settings)."""
    from pipeline import base, train

    params = config.load(ROOT / ("params.yaml" if domain == "lesions" else "examples/parts/params.yaml"))
    paths = dataclasses.replace(params.paths, split=str(work / "split"), models=str(work / "models"),
                                reports=str(work / "reports"))
    params = dataclasses.replace(params, paths=paths,
                                 base=dataclasses.replace(params.base, captions=str(work / "split" / "train.jsonl"),
                                                          steps=base_steps or params.base.steps),
                                 train=dataclasses.replace(params.train, max_steps=train_steps, checkpoint_every=10**6),
                                 monitor=dataclasses.replace(params.monitor, adapter="local"))
    settings = {"ref_n": ref_n, "train_steps": train_steps, "base_steps": params.base.steps}
    stamp = work / "settings.json"
    if not stamp.is_file() or json.loads(stamp.read_text()) != settings:
        shutil.rmtree(work, ignore_errors=True)
        recs = records_of(generate(domain, params, work / "ref", ref_n, 0, False), params)
        patients = sorted({r["patient_id"] for r in recs})
        val_p = set(np.random.default_rng(0).permutation(patients)[: len(patients) // 4])
        (work / "split").mkdir(parents=True, exist_ok=True)
        dataio.write_jsonl(work / "split" / "train.jsonl", [r for r in recs if r["patient_id"] not in val_p])
        dataio.write_jsonl(work / "split" / "val.jsonl", [r for r in recs if r["patient_id"] in val_p])
        stamp.write_text(json.dumps(settings))
    tr, va = dataio.read_jsonl(work / "split" / "train.jsonl"), dataio.read_jsonl(work / "split" / "val.jsonl")
    if not (work / "models" / "base" / "config.json").is_file():
        t = time.time()
        base.main(params)
        print(f"[{domain}] base pre-trained in {time.time() - t:.0f} s", flush=True)
    if not (work / "models" / "adapter" / "pipeline_meta.json").is_file():
        t = time.time()
        train.run(params, tr, va)
        print(f"[{domain}] champion trained ({train_steps} steps) in {time.time() - t:.0f} s", flush=True)
    return params, tr, va


# ------------------------------------------------------------------------------------------ shifts
def transform(img: Image.Image, shift: str, s: int, rng: np.random.Generator) -> Image.Image:
    """An acquisition change of severity s (1-3)."""
    if shift in ("cast", "camera"):
        a = np.asarray(img, np.float32) * np.array([1 + 0.04 * s, 1.0, 1 - 0.05 * s], np.float32)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if shift in ("blur", "camera"):
        img = img.filter(ImageFilter.GaussianBlur(radius=0.4 * s))
    if shift in ("jpeg", "camera"):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=(85, 60, 35)[s - 1])
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if shift == "lighting":
        a = np.asarray(img, np.float32)
        side = rng.integers(2)
        ramp = np.linspace(1 - 0.1 * s, 1.0, a.shape[1], dtype=np.float32)[:: 1 if side else -1]
        a = a * ramp[None, :, None] * np.array([1 + 0.02 * s, 1.0, 1 - 0.06 * s], np.float32)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return img


def restyle(caption: str) -> str:
    """The same facts in another house style: a header, the sentences in reverse order but the last."""
    sentences = [x.strip() for x in caption.replace("\n", " ").split(". ") if x.strip()]
    if len(sentences) > 2:
        sentences = sentences[-2::-1] + sentences[-1:]
    body = ". ".join(sentences)
    return "Report (second reader): " + body[0].lower() + body[1:]


# ------------------------------------------------------------------------------------------ features
@dataclasses.dataclass
class Pool:
    recs: list[dict]
    emb: np.ndarray
    loss: np.ndarray
    cos: np.ndarray


def featurise(recs: list[dict], encoder, champion, images: list | None = None) -> Pool:
    imgs = images if images is not None else [r["image"] for r in recs]
    emb = encoder(imgs)
    scored = [{**r, "image": im} for r, im in zip(recs, imgs)]
    loss, cos = champion.score(scored)
    return Pool(recs, emb, loss, cos)


def side(pool: Pool, rows: np.ndarray, params: config.Params, loss=None, cos=None, captions=None) -> monitor.Side:
    recs = [pool.recs[i] for i in rows]
    sd = monitor.side_of(recs, pool.emb[rows], params.data.subgroups, params.monitor.cluster_column)
    sd.loss = pool.loss[rows] if loss is None else loss
    sd.cosine = pool.cos[rows] if cos is None else cos
    if captions is not None:
        sd.captions = captions
    return sd


def wilson(k: int, n: int) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p, z = k / n, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def rate(flags: list[bool]) -> dict:
    return {"rate": float(np.mean(flags)) if flags else None, "n": len(flags), "ci95": wilson(int(sum(flags)), len(flags))}


# ------------------------------------------------------------------------------------------ the study
def study(domain: str, work: Path, args) -> dict:
    params, tr, va = project(domain, work, args.ref_n, args.train_steps, args.base_steps)
    encoder = monitor.FixedEncoder(params)
    champion = monitor.Champion(Path(params.paths.models) / "adapter", params, tr)
    reference = tr + va
    t = time.time()
    ref_pool = featurise(reference, encoder, champion)
    ref_pool.loss[: len(tr)] = np.nan  # the champion's scores of its own training pairs are not the reference
    ref_pool.cos[: len(tr)] = np.nan
    pool_n = max(args.sizes) + 1000
    recs = records_of(generate(domain, params, work / "pool", pool_n, 101, True), params)
    base_pool = featurise(recs, encoder, champion)
    opened = [Image.open(r["image"]).convert("RGB") for r in recs]
    shifted = {}
    for shift in IMAGE_SHIFTS:
        for s in SEVERITIES:
            rng = np.random.default_rng([7, s])
            shifted[(shift, s)] = featurise(recs, encoder, champion, [transform(im, shift, s, rng) for im in opened])
    captions = [chat.answer(r["messages"]) for r in recs]
    # caption shifts, scored once per pool row: each caption restyled, and each row paired with the caption of
    # another (a fixed derangement of the pool); a batch takes either version row by row
    restyled = [restyle(c) for c in captions]
    other = np.roll(np.random.default_rng(5).permutation(len(recs)), 1)
    partner = np.empty(len(recs), int)
    partner[np.random.default_rng(5).permutation(len(recs))] = other
    swapped = [captions[j] for j in partner]
    alt = {}
    for name, caps in (("caption", restyled), ("mismatch", swapped)):
        loss, cos = champion.score([{**r, "messages": chat.with_answer(r["messages"], c)} for r, c in zip(recs, caps)])
        alt[name] = (caps, loss, cos)
    print(f"[{domain}] features of {len(reference)} reference and {len(recs)} x {3 + len(shifted)} pool rows in "
          f"{time.time() - t:.0f} s", flush=True)
    data, m0 = params.data, params.monitor
    labels = np.array([r["label"] for r in recs])
    groups = np.array(["|".join(r["subgroups"].values()) for r in recs])
    later = sorted(set(groups))[len(set(groups)) // 2:]
    positive = data.positive_label or data.labels[-1]

    def judge(cur: monitor.Side, seed: int) -> dict:
        m = dataclasses.replace(m0, seed=seed)
        ref = monitor.Side(ref_pool.emb, [r["label"] for r in reference],
                           ["|".join(r["subgroups"].values()) for r in reference],
                           [chat.answer(r["messages"]) for r in reference], ref_pool.loss, ref_pool.cos,
                           clusters=[r["patient_id"] for r in reference])
        kinds = monitor.judge(ref, cur, m, data)
        return {"drifted": [k for k in monitor.KINDS if kinds[k]["drifted"]],
                "p": {k: kinds[k].get("p_adjusted") for k in monitor.KINDS}}

    def batch(shift: str, s: int, n: int, seed: int) -> monitor.Side:
        rng = np.random.default_rng([seed, n, s, SHIFTS.index(shift) if shift in SHIFTS else 99])
        w = np.ones(len(recs))
        if shift == "prevalence":
            w[labels == positive] = 2.0 ** s
        if shift == "subgroup":
            w[np.isin(groups, later)] = 2.0 ** s
        rows = np.sort(rng.choice(len(recs), n, replace=False, p=w / w.sum()))
        pool = shifted.get((shift, s), base_pool)
        if shift in ("caption", "mismatch"):
            share = {"caption": (0.25, 0.5, 1.0), "mismatch": (0.05, 0.15, 0.30)}[shift][s - 1]
            changed = rng.random(n) < share
            caps_alt, loss_alt, cos_alt = alt[shift]
            caps = [caps_alt[i] if c else captions[i] for i, c in zip(rows, changed)]
            loss = np.where(changed, loss_alt[rows], pool.loss[rows])
            cos = np.where(changed, cos_alt[rows], pool.cos[rows])
            return side(pool, rows, params, loss, cos, caps)
        return side(pool, rows, params)

    out = {"reference_rows": len(reference), "pool_rows": len(recs), "null": {}, "shifts": {}}
    t = time.time()
    for n in args.sizes:
        runs = [judge(batch("reference", 1, n, 10_000 + seed), seed) for seed in range(args.null_seeds)]
        flags = [bool(r["drifted"]) for r in runs]
        out["null"][str(n)] = {**rate(flags), "by_kind": {k: rate([k in r["drifted"] for r in runs])["rate"]
                                                          for k in monitor.KINDS}}
        print(f"[{domain}] same distribution, n={n}: false alarms {sum(flags)}/{len(flags)} "
              f"{out['null'][str(n)]['ci95']}  ({time.time() - t:.0f} s)", flush=True)
    for shift in SHIFTS:
        out["shifts"][shift] = {}
        for s in SEVERITIES:
            for n in args.sizes:
                runs = [judge(batch(shift, s, n, seed), 1000 + seed) for seed in range(args.seeds)]
                entry = {"detected": rate([bool(r["drifted"]) for r in runs]),
                         "named": rate([EXPECTED[shift] in r["drifted"] for r in runs]),
                         "named_covariate": rate(["covariate" in r["drifted"] for r in runs])["rate"],
                         "kinds": {k: float(np.mean([k in r["drifted"] for r in runs])) for k in monitor.KINDS}}
                out["shifts"][shift][f"s{s}_n{n}"] = entry
                print(f"[{domain}] {shift:10s} severity {s} n={n:5d}: detected {entry['detected']['rate']:.2f} "
                      f"named {EXPECTED[shift]} {entry['named']['rate']:.2f} covariate {entry['named_covariate']:.2f} "
                      f"({time.time() - t:.0f} s)", flush=True)
    return out


# ------------------------------------------------------------------------------------------ timing
def timed_check(work: Path, args) -> dict:
    """`monitor.check` of a `scale`-image batch (phone camera, captions) against a `scale`-image reference."""
    scale = args.scale
    params, _, _ = project("lesions", work / "lesions", args.ref_n, args.train_steps, args.base_steps)
    big = work / "scale"
    ref_recs = records_of(generate("lesions", params, big / "ref", scale, 11, False), params)
    patients = sorted({r["patient_id"] for r in ref_recs})
    val_p = set(np.random.default_rng(0).permutation(patients)[: len(patients) // 4])
    split = big / "split"
    split.mkdir(parents=True, exist_ok=True)
    dataio.write_jsonl(split / "train.jsonl", [r for r in ref_recs if r["patient_id"] not in val_p])
    dataio.write_jsonl(split / "val.jsonl", [r for r in ref_recs if r["patient_id"] in val_p])
    cfg = dataclasses.replace(params.synth, n=scale, seed=12, camera="phone", site="hospital_b",
                              faults=dataclasses.replace(params.synth.faults, vague=0, mismatch=0, exact_duplicate=0,
                                                         near_duplicate=0, corrupt=0, not_image=0, empty_file=0))
    synth.run(cfg, params.data, big / "batch")
    p = dataclasses.replace(params, paths=dataclasses.replace(params.paths, split=str(split), reports=str(big / "reports")))
    out = {"images_per_side": scale}
    for name in ("cold", "warm"):
        t = time.time()
        result, _ = monitor.check(big / "batch", p)
        out[f"{name}_seconds"] = round(time.time() - t, 1)
        out[f"{name}_status"] = result["status"]
        out[f"{name}_kinds"] = result["drifted_kinds"]
        print(f"{scale}-image check ({name}): {out[f'{name}_seconds']} s, {result['status']}, {result['drifted_kinds']}", flush=True)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(results["domains"])
    fig, axes = plt.subplots(1, len(domains), figsize=(7 * len(domains), 4.5), squeeze=False)
    for ax, d in zip(axes[0], domains):
        r = results["domains"][d]
        sizes = sorted(int(n) for n in r["null"])
        ax.plot(sizes, [r["null"][str(n)]["rate"] for n in sizes], "k--", marker="o", label="same distribution")
        for shift in SHIFTS:
            ax.plot(sizes, [r["shifts"][shift][f"s2_n{n}"]["detected"]["rate"] for n in sizes], marker=".", label=shift)
        ax.axhline(results["alpha"], color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("batch size (images)")
        ax.set_ylabel("detection rate (severity 2)")
        ax.set_title(d)
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domains", default="lesions,parts")
    ap.add_argument("--null-seeds", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--sizes", default="50,200,1000")
    ap.add_argument("--ref-n", type=int, default=1200)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--base-steps", type=int, default=None, help="default: params.yaml's base.steps")
    ap.add_argument("--scale", type=int, default=10000, help="images per side of the timed check (0: skip)")
    ap.add_argument("--work", default=str(ROOT / "bench" / ".drift-work"), help="kept between runs (base, champion)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "drift.json"))
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.work)
    params = config.load(ROOT / "params.yaml")
    results = {"alpha": params.monitor.alpha, "permutations": params.monitor.permutations,
               "correction": params.monitor.correction, "sizes": args.sizes, "null_seeds": args.null_seeds,
               "seeds": args.seeds, "severities": list(SEVERITIES), "expected_kind": EXPECTED, "domains": {},
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "threads": 2}}
    t0 = time.time()
    for d in args.domains.split(","):
        results["domains"][d] = study(d, work / d, args)
        results["domains"][d]["seconds"] = round(time.time() - t0, 1)
    if args.scale:
        shutil.rmtree(work / "scale", ignore_errors=True)
        results["timing"] = timed_check(work, args)
        shutil.rmtree(work / "scale", ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_name("drift_power.png"))
    print(f"saved {out} and {out.with_name('drift_power.png')}")


if __name__ == "__main__":
    main()
