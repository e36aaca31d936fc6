"""`monitor`: is an incoming batch different from what the model was trained on? (docs/design.md §3.6, §8)

`python -m pipeline monitor --batch data/incoming/<batch>`:
1. the batch (a raw dataset, §3.1) goes through curation's row and image checks; rows that fail are
   counted by reason, and a batch that is mostly unreadable is reported as `unreadable`, not as drift;
2. readable images are embedded with a *fixed* encoder: the frozen base model's vision tower (pooled
   soft tokens), so the reference does not move with every re-fine-tune; the training + validation splits
   are the reference (its embeddings are cached under `reports/drift/`);
3. Evidently compares them: `EmbeddingsDrift` with the method and threshold of `monitor.embedding`
   (after seeded subsampling to `monitor.max_rows` and PCA to `monitor.pca_components`), and, where the
   batch has captions, `ValueDrift` of the per-sample alignment score (the champion's matched-pair
   cosine) with `monitor.alignment`;
4. `reports/drift/<batch>/drift.json` and `drift.html` (the Evidently report) are written atomically.
Exit status: 0 no retraining called for, 1 thresholds crossed (`retrain: true`, `reasons` say which),
2 unusable input.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from pipeline import chat, checks, config, data as dataio
from pipeline.errors import DriftFound, InputError

IMAGE_REASONS = ("missing_image", "empty_file", "not_an_image", "unreadable_image", "path_outside_dataset",
                 "image_too_large", "image_too_small", "missing_field:image")
P_VALUE_TESTS = {"ks", "t_test", "mannw", "chisquare", "z", "fisher_exact", "anderson", "cramer_von_mises",
                 "g_test", "epps_singleton", "empirical_mmd", "perc_text_content_drift"}


# ---------------------------------------------------------------------------------------- the batch
def read_batch(batch: Path, params: config.Params) -> tuple[list[dict], list[dict], dict]:
    """(readable rows as records, rows that failed, counts); captions kept where they pass the checks."""
    if not batch.is_dir():
        raise InputError(f"monitor: batch folder {batch} not found")
    try:
        rows = dataio.read_manifest(dataio.find_manifest(batch), required=("id", "image"))
    except FileNotFoundError as e:  # the folder vanished while it was read
        raise InputError(f"monitor: batch {batch} disappeared while it was read ({e})") from None
    readable, failed = [], []
    for i, raw in enumerate(rows):
        row = checks.Row(index=i, raw=raw)
        checks.check_fields(row, has_label=False)
        try:
            checks.check_image(row, batch, params.curate)
        except FileNotFoundError:
            row.reasons.append("missing_image")
        image_reasons = [r for r in row.reasons if r.split(":")[0] in IMAGE_REASONS or r.startswith("missing_field")]
        if image_reasons:
            failed.append({"row": i, "id": raw.get("id", ""), "reasons": image_reasons})
            continue
        caption = raw.get("caption", "").strip()
        captioned = checks.Row(index=i, raw=raw)
        checks.check_caption(captioned, params.curate, params.data)
        rec = {"id": raw.get("id") or f"row{i}", "image": str(row.path), "label": raw.get("label", "").strip() or None,
               "site": raw.get("site", ""), "camera": raw.get("camera", "")}
        if caption and not captioned.reasons:
            rec["messages"] = chat.messages(caption, raw.get("prompt", "").strip() or params.data.prompt,
                                            params.data.system_prompt)
        readable.append(rec)
    reasons: dict[str, int] = {}
    for f in failed:
        for r in f["reasons"]:
            reasons[r] = reasons.get(r, 0) + 1
    counts = {"rows": len(rows), "readable": len(readable), "failed": len(failed), "failed_reasons": reasons,
              "captioned": sum("messages" in r for r in readable)}
    return readable, failed, counts


# ----------------------------------------------------------------------------------- the encoder
class FixedEncoder:
    """The frozen base model's vision tower: image -> mean of its projected soft tokens (H,)."""

    def __init__(self, params: config.Params, batch_size: int = 64):
        import torch

        from pipeline import model as modelmod

        source = modelmod.base_source(params)
        self.model, self.processor = modelmod.load(source, attn_implementation=params.model.attn_implementation)
        self.model.eval()
        self.batch_size, self.torch = batch_size, torch
        self.key = modelmod.weights_sha256(source)  # a re-trained base of the same shape is another encoder

    def __call__(self, images: list) -> np.ndarray:
        from pipeline.collate import open_image

        out = []
        ip = self.processor.image_processor
        for i in range(0, len(images), self.batch_size):
            px = ip([open_image(im) for im in images[i : i + self.batch_size]], return_tensors="pt")["pixel_values"]
            with self.torch.no_grad():
                feats = self.model.model.get_image_features(px, return_dict=True).pooler_output.mean(1)
            out.append(feats.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1))


def reference_embeddings(encoder: FixedEncoder, records: list[dict], cache_dir: Path) -> np.ndarray:
    """Embeddings of the reference records, cached by encoder and record ids/hashes."""
    h = hashlib.sha256(encoder.key.encode())
    for r in records:
        h.update(r["id"].encode())
        h.update(r.get("image_sha256", str(r["image"])).encode())
    path = cache_dir / f"reference-{h.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    emb = encoder([r["image"] for r in records])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return emb


# -------------------------------------------------------------------------------------- the tests
def sample_rows(n_ref: int, n_cur: int, cfg: config.Monitor) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each side: all of them, or a seeded sample of `cfg.max_rows` (sorted)."""
    rng = np.random.default_rng(cfg.seed)
    pick = lambda n: np.arange(n) if n <= cfg.max_rows else np.sort(rng.choice(n, cfg.max_rows, replace=False))  # noqa: E731
    return pick(n_ref), pick(n_cur)


def reduce(ref: np.ndarray, cur: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA fit on the reference, applied to both (only when the embeddings are wider than `components`)."""
    from sklearn.decomposition import PCA

    k = min(components, ref.shape[1], len(ref) - 1)
    if ref.shape[1] <= components or k < 1:
        return ref, cur
    pca = PCA(n_components=k, random_state=0).fit(ref)
    return pca.transform(ref), pca.transform(cur)


def drift_method(test: config.DriftTest):
    """Evidently's embedding drift method object for `monitor.embedding`."""
    from evidently.legacy.metrics.data_drift import embedding_drift_methods as m

    makers = {"model": m.model, "mmd": m.mmd, "ratio": m.ratio, "distance": m.distance}
    if test.method not in makers:
        raise InputError(f"monitor.embedding.method: {test.method!r} is not one of {sorted(makers)}")
    return makers[test.method](threshold=test.threshold)


def _frame(emb: np.ndarray, score: np.ndarray | None):
    import pandas as pd

    df = pd.DataFrame(emb, columns=[f"e{i}" for i in range(emb.shape[1])])
    if score is not None:
        df["alignment"] = score
    return df


def embedding_drift_score(ref: np.ndarray, cur: np.ndarray, cfg: config.Monitor) -> tuple[float, bool]:
    """The decision EmbeddingsDrift makes, without its report (t-SNE picture): (score, drifted)."""
    ri, ci = sample_rows(len(ref), len(cur), cfg)
    r, c = reduce(ref[ri], cur[ci], cfg.pca_components)
    score, drifted, _ = drift_method(cfg.embedding)(_frame(c, None), _frame(r, None))
    return float(score), bool(drifted)


def evidently_report(ref: np.ndarray, cur: np.ndarray, ref_score: np.ndarray | None, cur_score: np.ndarray | None,
                     cfg: config.Monitor):
    """The Evidently report: embedding drift, plus drift of the alignment score when both sides have one.

    One row per image; `*_score` (same length as the embeddings, NaN where a row has no caption) is the
    `alignment` column. Both sides are subsampled (seeded) to `max_rows` and PCA-reduced first.
    Returns (snapshot, embedding score, alignment score or None).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift

    ri, ci = sample_rows(len(ref), len(cur), cfg)
    r, c = reduce(ref[ri], cur[ci], cfg.pca_components)
    with_scores = ref_score is not None and cur_score is not None
    cols = [f"e{i}" for i in range(r.shape[1])]
    definition = DataDefinition(numerical_columns=cols + (["alignment"] if with_scores else []),
                                embeddings={"image": cols})
    ref_df = _frame(r, ref_score[ri] if with_scores else None)
    cur_df = _frame(c, cur_score[ci] if with_scores else None)
    metrics = [EmbeddingsDrift(embeddings_name="image", drift_method=drift_method(cfg.embedding))]
    if with_scores:
        metrics.append(ValueDrift(column="alignment", method=cfg.alignment.method, threshold=cfg.alignment.threshold))
    snapshot = Report(metrics).run(current_data=Dataset.from_pandas(cur_df, data_definition=definition),
                                   reference_data=Dataset.from_pandas(ref_df, data_definition=definition))
    values = [m["value"] for m in snapshot.dict()["metrics"]]
    return snapshot, float(values[0]), (float(values[1]) if with_scores else None)


def value_drifted(method: str, value: float, threshold: float) -> bool:
    """p-value tests drift below the threshold; distances at or above it."""
    return value < threshold if method in P_VALUE_TESTS else value >= threshold


# ------------------------------------------------------------------------------------ alignment
def alignment_adapter(params: config.Params) -> tuple[Path | None, str]:
    """The adapter whose matched-pair cosine is the alignment score: the registry's champion (downloaded),
    else models/adapter; (None, why) when there is none."""
    local = Path(params.paths.models) / "adapter"
    if params.monitor.adapter == "champion":
        try:
            from pipeline import tracking

            c = tracking.client()
            version = tracking.alias_version(c, params.mlflow.registered_model, "champion")
            if version is not None:
                dst = Path(params.paths.reports) / "drift" / ".champion" / str(version.version)
                found = next(iter(dst.glob("**/pipeline_meta.json")), None) if dst.is_dir() else None
                if found is None:
                    dst.mkdir(parents=True, exist_ok=True)
                    return tracking.download_adapter(c, version, dst), f"champion v{version.version}"
                return found.parent, f"champion v{version.version}"
        except Exception as e:  # noqa: BLE001 - the registry is optional here: fall back, and say so
            print(f"monitor: the registry could not be read ({type(e).__name__}: {e}); using {local}", file=sys.stderr)
    if (local / "pipeline_meta.json").is_file():
        return local, str(local)
    return None, "no adapter (run train)"


def alignment_scores(adapter: Path, groups: list[list[dict]], params: config.Params) -> list[np.ndarray]:
    """The matched-pair cosine of every record, per group of records (the adapter is loaded once)."""
    from pipeline.scoring import Evaluator

    ev = Evaluator.load(adapter, params, who="monitor")
    out = []
    for records in groups:
        v, t, _ = ev.embed(records)
        out.append((v * t).sum(1))
    return out


# ------------------------------------------------------------------------------------------- main
def check(batch: Path, params: config.Params) -> dict:
    """The whole check of one batch -> the drift.json content (and the snapshot, if one was made)."""
    m = params.monitor
    readable, failed, counts = read_batch(batch, params)
    result = {"batch": batch.name, "path": str(batch), "counts": counts, "failed_rows": failed[:100],
              "embedding_drift": None, "loss_drift": None, "retrain": False, "reasons": []}
    if counts["rows"] == 0:
        return {**result, "status": "empty", "reasons": ["the batch has no rows"]}, None
    if counts["failed"] / counts["rows"] > m.max_unreadable:
        return {**result, "status": "unreadable", "reasons": [
            f"{counts['failed']} of {counts['rows']} rows failed the image checks ({counts['failed_reasons']}): "
            "a data-quality problem, not drift"]}, None
    if counts["readable"] < m.min_rows:
        return {**result, "status": "too_small", "reasons": [
            f"only {counts['readable']} readable images (monitor.min_rows = {m.min_rows}): no verdict"]}, None
    split = Path(params.paths.split)
    if not (split / "train.jsonl").is_file():
        raise InputError(f"monitor: the reference {split / 'train.jsonl'} is missing (run split first)")
    held_out = dataio.read_jsonl(split / "val.jsonl") if (split / "val.jsonl").is_file() else []
    reference = dataio.read_jsonl(split / "train.jsonl") + held_out
    encoder = FixedEncoder(params)
    ref = reference_embeddings(encoder, reference, Path(params.paths.reports) / "drift")
    cur = encoder([r["image"] for r in readable])
    ref_score = cur_score = None
    captioned = [i for i, r in enumerate(readable) if "messages" in r]
    adapter, source = alignment_adapter(params)
    loss_note = None
    if len(captioned) < m.min_captions:
        loss_note = f"{len(captioned)} captioned rows (< monitor.min_captions = {m.min_captions}): embedding drift only"
    elif adapter is None:
        loss_note = source
    elif not held_out:
        loss_note = f"no held-out reference ({split / 'val.jsonl'}): embedding drift only"
    else:
        # the model has fit the training captions: its held-out (val) scores are the fair reference
        held_score, batch_score = alignment_scores(adapter, [held_out, [readable[i] for i in captioned]], params)
        ref_score = np.full(len(reference), np.nan)
        ref_score[len(reference) - len(held_out):] = held_score
        cur_score = np.full(len(readable), np.nan)
        cur_score[captioned] = batch_score
    snapshot, emb_value, loss_value = evidently_report(ref, cur, ref_score, cur_score, m)
    emb_drifted = value_drifted(m.embedding.method, emb_value, m.embedding.threshold)
    result["embedding_drift"] = {"method": m.embedding.method, "score": emb_value, "threshold": m.embedding.threshold,
                                 "drifted": emb_drifted, "encoder": "frozen base vision tower",
                                 "reference_rows": len(ref), "current_rows": len(cur)}
    if loss_value is not None:
        drifted = value_drifted(m.alignment.method, loss_value, m.alignment.threshold)
        result["loss_drift"] = {"method": m.alignment.method, "score": loss_value, "threshold": m.alignment.threshold,
                                "drifted": drifted, "statistic": "matched-pair cosine of " + source,
                                "reference": "val split", "reference_mean": float(np.nanmean(ref_score)),
                                "current_mean": float(np.nanmean(cur_score))}
    else:
        result["loss_drift"] = {"method": m.alignment.method, "score": None, "threshold": m.alignment.threshold,
                                "drifted": False, "note": loss_note}
    if emb_drifted:
        result["reasons"].append(f"embedding drift: {m.embedding.method} score {emb_value:.3f} >= {m.embedding.threshold}")
    if result["loss_drift"]["drifted"]:
        result["reasons"].append(f"alignment-score drift: {m.alignment.method} {loss_value:.3f} "
                                 f"{'<' if m.alignment.method in P_VALUE_TESTS else '>='} {m.alignment.threshold}")
    result["retrain"] = bool(result["reasons"])
    result["status"] = "drift" if result["retrain"] else "ok"
    return result, snapshot


def pending(params: config.Params) -> list[str]:
    """The batch folders of `paths.incoming` (absolute paths) without a `drift.json` yet: `main` writes it
    (atomically) only after a finished check, so a failed or interrupted check stays pending."""
    incoming, drift = Path(params.paths.incoming), Path(params.paths.reports) / "drift"
    if not incoming.is_dir():
        return []
    return [str(b.resolve()) for b in sorted(incoming.iterdir())
            if b.is_dir() and not (drift / b.name / "drift.json").is_file()]  # absolute: other tasks read them


def main(params: config.Params, batch: str) -> dict:
    batch_dir = Path(batch)
    result, snapshot = check(batch_dir, params)
    with dataio.atomic_dir(Path(params.paths.reports) / "drift" / batch_dir.name) as out:
        dataio.write_json(out / "drift.json", result)
        if snapshot is not None:
            snapshot.save_html(str(out / "drift.html"))
    summary = {k: result[k] for k in ("batch", "status", "retrain", "reasons")}
    summary["report"] = str(Path(params.paths.reports) / "drift" / batch_dir.name / "drift.json")
    if result["retrain"]:
        raise DriftFound(json.dumps(summary, indent=2, sort_keys=True))
    return summary
