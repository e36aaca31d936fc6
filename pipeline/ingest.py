"""`ingest`: a drifted, labelled batch becomes training data (what the `finetune` DAG runs first).

`python -m pipeline ingest --batch data/incoming/<batch>`:
- the batch's patients are split (seeded) into a training part and a held-out part (`ingest.holdout`);
- the training part is copied, as a new batch, to `<paths.batches>/<batch>/` (its own manifest and
  images; nothing in `paths.raw` or in earlier batches is touched; `curate` reads `paths.raw` and every
  batch folder, which is one of its DVC dependencies), so that DVC records a new version of the data;
- the held-out part is curated (row and image checks) into `<paths.eval>/<batch>/samples.jsonl`;
- the current test split is frozen as `<paths.eval>/<batch>/old_test.jsonl`, and its patients are pinned
  to the test split from now on (`split.pinned_test`), so the old test set stays unseen;
- params.yaml is updated in place (comments kept): the held-out part and the old test set become
  evaluation sets, `promote.improve_on` names the new batch, and `train.peft.method` is `ingest.method`
  (QLoRA). `dvc repro` then re-runs exactly the stages these changes touch;
- in a DVC project, both new folders are `dvc add`ed, so `publish` pushes them with the model.
Ingesting the same batch twice is refused (exit 2), so a re-triggered DAG cannot double the data.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import shutil
from pathlib import Path

from pipeline import checks, config, data as dataio, vcs
from pipeline.errors import InputError


def patient_holdout(patients: list[str], share: float, seed: int) -> set[str]:
    """A seeded, order-free choice of about `share` of the patients (by hash)."""
    if not 0 < share < 1:
        raise InputError(f"ingest.holdout must be in (0, 1), got {share}")
    ranked = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    n = max(1, round(share * len(ranked))) if len(ranked) > 1 else 0
    return set(ranked[:n])


def _write_part(rows: list[dict], src: Path, dst: Path) -> None:
    (dst / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for r in rows:
        image = r.get("image", "").strip()
        path = checks.resolve_inside(src, image) if image else None
        if path is not None and path.is_file():
            rel = f"images/{path.name}"
            shutil.copy2(path, dst / rel)
            out.append({**r, "image": rel})
        else:
            out.append(r)  # kept as is: curate quarantines it with its reason
    cols = list(dict.fromkeys(k for r in rows for k in r if k != dataio.EXTRA))
    with open(dst / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(out)


def drop_training_duplicates(held: list[dict], held_images: list[Path], train_rows: list[dict], src: Path,
                             max_bits: int) -> tuple[list[dict], int]:
    """The held-out samples without those whose image is an exact or near duplicate of a training-part
    image (the same subject photographed twice would leak into the evaluation); and how many went."""
    paths = [checks.resolve_inside(src, r.get("image", "").strip()) for r in train_rows]
    train = checks.image_hashes([p for p in paths if p is not None and p.is_file()], skip_unreadable=True)
    dup = checks.duplicates_of(train, checks.image_hashes(held_images), max_bits)
    return [r for r, d in zip(held, dup) if not d], int(dup.sum())


def freeze_base_captions(params: config.Params, out: Path, eval_dst: Path) -> str | None:
    """The built-in base reads the training split's captions; the split is about to grow with the batch.
    Keep a copy of what the champion's base read, so that `base` rebuilds the same weights and the
    re-fine-tune starts from the champion's base (and champion and challenger stay comparable). Done once:
    a base already reading a frozen copy keeps it."""
    live = Path(params.base.captions)
    if not live.is_file() or live.resolve() != (Path(params.paths.split) / "train.jsonl").resolve():
        return None
    shutil.copy2(live, out / "base_captions.jsonl")
    return str(eval_dst / "base_captions.jsonl")


def update_params(path: Path, batch: str, held_out: str, old_test: str, method: str,
                  base_captions: str | None = None) -> None:
    """Round-trip edit of params.yaml (comments and order kept)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(path.read_text())
    ev = doc.setdefault("evaluate", {})
    if ev.get("sets") is None or not hasattr(ev.get("sets"), "keys"):
        ev["sets"] = {}
    ev["sets"][batch] = held_out
    ev["sets"][f"{batch}_old_test"] = old_test
    doc.setdefault("promote", {})["improve_on"] = [batch]
    doc.setdefault("split", {})
    pinned = list(doc["split"].get("pinned_test") or [])
    doc["split"]["pinned_test"] = pinned + [old_test]
    doc.setdefault("train", {}).setdefault("peft", {})["method"] = method
    if base_captions:
        doc.setdefault("base", {})["captions"] = base_captions
    tmp = path.with_suffix(".yaml.tmp")
    with open(tmp, "w") as fh:
        yaml.dump(doc, fh)
    config.load(tmp)  # the edited file must still be valid
    tmp.replace(path)


def main(params: config.Params, batch: str, params_file: str = "params.yaml") -> dict:
    src = Path(batch)
    if not src.is_dir():
        raise InputError(f"ingest: batch folder {src} not found")
    name = src.name
    raw_dst = Path(params.paths.batches) / name
    eval_dst = Path(params.paths.eval) / name
    if raw_dst.exists() or eval_dst.exists():
        raise InputError(f"ingest: batch {name!r} was already ingested ({raw_dst} or {eval_dst} exists)")
    rows = dataio.read_manifest(dataio.find_manifest(src))
    if not rows:
        raise InputError(f"ingest: batch {src} has no rows")
    missing = [i for i, r in enumerate(rows) if not r.get("label", "").strip() or not r.get("caption", "").strip()]
    if len(missing) == len(rows):
        raise InputError(f"ingest: batch {src} is not labelled (no row has both a label and a caption)")
    test = Path(params.paths.split) / "test.jsonl"
    if not test.is_file():
        raise InputError(f"ingest: {test} not found (the current test split is frozen as the old test set)")
    patient = [r.get("patient_id", "").strip() or r.get("id", f"row{i}") for i, r in enumerate(rows)]
    held = patient_holdout(patient, params.ingest.holdout, params.ingest.seed)
    train_rows = [r for r, p in zip(rows, patient) if p not in held]
    held_rows = [r for r, p in zip(rows, patient) if p in held]
    with dataio.atomic_dir(eval_dst) as out:
        _write_part(held_rows, src, out)
        cfg = dataclasses.replace(params.curate, mismatch=dataclasses.replace(
            params.curate.mismatch, enabled=False))
        result = checks.curate_rows(dataio.read_manifest(out / "manifest.csv"), out, cfg, params.data,
                                    image_prefix=str(eval_dst))
        # (the accepted images are referenced at eval_dst, where they land once this folder is complete)
        held_images = [out / Path(r["image"]).relative_to(eval_dst) for r in result.accepted]
        kept, dropped = drop_training_duplicates(result.accepted, held_images, train_rows, src,
                                                 params.curate.near_duplicate_bits)
        dataio.write_jsonl(out / "samples.jsonl", kept)
        dataio.write_jsonl(out / "quarantine.jsonl", result.quarantined)
        shutil.copy2(test, out / "old_test.jsonl")
        base_captions = freeze_base_captions(params, out, eval_dst)
    with dataio.atomic_dir(raw_dst) as out:
        _write_part(train_rows, src, out)
    vcs.track([raw_dst, eval_dst])  # in a DVC project: both become DVC-tracked data (pushed by `publish`)
    update_params(Path(params_file), name, str(eval_dst / "samples.jsonl"), str(eval_dst / "old_test.jsonl"),
                  params.ingest.method, base_captions)
    return {"batch": name, "train_rows": len(train_rows), "held_out_rows": len(held_rows),
            "held_out_accepted": len(kept), "held_out_quarantined": len(result.quarantined),
            "held_out_duplicates_of_training": dropped,
            "raw": str(raw_dst), "eval": str(eval_dst), "params_updated": params_file,
            "base_captions_frozen": base_captions,
            "unlabelled_rows": len(missing)}
