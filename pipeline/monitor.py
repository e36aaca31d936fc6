"""`monitor`: is an incoming batch different from what the model was trained on, how, and does it hurt?
(docs/design.md §3.6, §8)

`python -m pipeline monitor --batch data/incoming/<batch>`:
1. the batch (a raw dataset, §3.1) goes through curation's row and image checks; rows that fail are
   counted by reason, and a batch that is mostly unreadable is reported as `unreadable`, not as drift;
2. every row gets its features: the image embedded by a *fixed* encoder (the frozen base model's vision
   tower), the caption as TF-IDF features, and, with the champion's alignment heads, each pair's InfoNCE
   loss against a fixed set of training captions (and its matched-pair cosine); the reference is the
   training + validation splits (the validation split alone for the champion's scores: it has fit the
   training captions);
3. five kinds of shift are tested, each by a permutation test (`pipeline.drift`) at `monitor.alpha`, the
   p-values Holm-adjusted across them: `covariate` (image embeddings, within label x subgroup strata),
   `prevalence` (label mix; the champion's predicted mix where the batch has no labels), `subgroup` (the
   mix of `data.subgroups` values, within labels), `text` (caption features, within strata) and
   `alignment` (the per-sample contrastive loss, within strata);
4. harm: the champion's macro-F1 on the batch (labelled) or its estimate from the answers' confidence
   (Average Thresholded Confidence, calibrated on val), against its F1 on val;
5. the decision: `retrain` when a kind of `monitor.retrain_on` drifted and the F1 fell by more than
   `monitor.max_f1_drop`; any other drift is an `alert`;
6. `reports/drift/<batch>/drift.json` and `drift.html` (the Evidently report, with the permutation tests
   and their null distributions added) are written atomically.
Exit status: 0 no retraining called for (`ok` or `alert`), 1 retraining called for, 2 unusable input.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import chat, checks, config, data as dataio, drift as tests
from pipeline.errors import DriftFound, InputError

IMAGE_REASONS = ("missing_image", "empty_file", "not_an_image", "unreadable_image", "path_outside_dataset",
                 "image_too_large", "image_too_small", "missing_field:image")
KINDS = ("covariate", "prevalence", "subgroup", "text", "alignment")


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
    no_detector = dataclasses.replace(params.curate, mismatch=dataclasses.replace(params.curate.mismatch, enabled=False))
    for i, raw in enumerate(rows):
        row = checks.Row(index=i, raw=raw)
        checks.check_fields(row, has_label=False)
        try:
            checks.check_image(row, batch, no_detector)  # the image checks alone: no detector features
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
               "subgroups": {g: raw.get(g, "").strip() or "unknown" for g in params.data.subgroups},
               "site": raw.get("site", ""), "camera": raw.get("camera", "")}
        if params.monitor.cluster_column:
            rec[params.monitor.cluster_column] = raw.get(params.monitor.cluster_column, "").strip() or None
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
PROPERTIES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "contrast", "sharpness", "dark_share",
              "ramp_left_right", "ramp_top_bottom", "blockiness")


def image_properties(img) -> np.ndarray:
    """Acquisition statistics of one image (what a camera, a lamp or a codec changes): channel means and
    spreads, contrast, sharpness (variance of the edge response), share of near-black pixels, lighting ramps
    across and down, and JPEG blockiness (differences across 8-pixel block edges over those inside)."""
    from PIL import ImageFilter

    img = img.convert("RGB")
    if max(img.size) > 512:
        img = img.copy()
        img.thumbnail((512, 512))
    a = np.asarray(img, np.float32) / 255
    lum = a.mean(2)
    edges = np.asarray(img.convert("L").filter(ImageFilter.FIND_EDGES), np.float32) / 255
    hw, hh = lum.shape[1] // 2, lum.shape[0] // 2
    dx = np.abs(np.diff(lum, axis=1))
    at_edge = (np.arange(dx.shape[1]) % 8) == 7
    block = float(dx[:, at_edge].mean() / (dx[:, ~at_edge].mean() + 1e-6)) if at_edge.any() and (~at_edge).any() else 1.0
    flat = a.reshape(-1, 3)
    return np.r_[flat.mean(0), flat.std(0), lum.std(), edges.var(), (lum < 0.05).mean(),
                 lum[:, hw:].mean() - lum[:, :hw].mean(), lum[hh:].mean() - lum[:hh].mean(), block].astype(np.float32)


class FixedEncoder:
    """The frozen base model's vision tower: image -> mean of its projected soft tokens (H,), followed by
    the image's acquisition statistics (`PROPERTIES`): one row of H + len(PROPERTIES) features per image."""

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
            opened = [open_image(im) for im in images[i : i + self.batch_size]]
            px = ip(opened, return_tensors="pt")["pixel_values"]
            with self.torch.no_grad():
                feats = self.model.model.get_image_features(px, return_dict=True).pooler_output.mean(1)
            out.append(np.hstack([feats.float().numpy(), np.stack([image_properties(im) for im in opened])]))
        return np.concatenate(out) if out else np.zeros((0, 1 + len(PROPERTIES)))


def split_features(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(vision-tower embeddings, acquisition statistics) of FixedEncoder rows."""
    return x[:, : -len(PROPERTIES)], x[:, -len(PROPERTIES):]


def reference_embeddings(encoder: FixedEncoder, records: list[dict], cache_dir: Path) -> np.ndarray:
    """Embeddings of the reference records, cached by encoder and record ids/hashes."""
    h = hashlib.sha256(encoder.key.encode() + b"|properties-v1")
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


# ------------------------------------------------------------------------------------ per-row features
@dataclass
class Side:
    """What the tests read of one side (reference or batch), one entry per row."""

    emb: np.ndarray                       # (N, D) fixed-encoder image embeddings
    labels: list                          # label or None
    subgroups: list[str]                  # the row's `data.subgroups` values joined ('V', 'I|hospital_b', ...)
    captions: list                        # caption text or None
    loss: np.ndarray | None = None        # per-pair InfoNCE loss (NaN: no caption or not scored)
    cosine: np.ndarray | None = None      # matched-pair cosine (NaN likewise)
    predicted: list | None = None         # the champion's predicted label (None: not answered)
    clusters: list | None = None          # rows with one value are not independent (a patient's images)


def side_of(records: list[dict], emb: np.ndarray, subgroups: tuple[str, ...], cluster_column: str = "") -> Side:
    return Side(emb=emb, labels=[r.get("label") for r in records],
                subgroups=["|".join(str(r.get("subgroups", {}).get(g, "unknown")) for g in subgroups) for r in records],
                captions=[chat.answer(r["messages"]) if "messages" in r else None for r in records],
                clusters=[str(r.get(cluster_column) or f"row:{r.get('id', i)}") if cluster_column else f"row:{i}"
                          for i, r in enumerate(records)])


def pair_losses(v: np.ndarray, t: np.ndarray, negatives: np.ndarray, tau: float) -> np.ndarray:
    """Each pair's InfoNCE loss: -log softmax of its own caption among itself + the fixed captions."""
    pos = (v * t).sum(1, keepdims=True) / tau
    logits = np.concatenate([pos, v @ negatives.T / tau], 1)
    mx = logits.max(1, keepdims=True)
    return (np.log(np.exp(logits - mx).sum(1)) + mx[:, 0]) - pos[:, 0]


class Champion:
    """The champion's alignment heads and answers, for the alignment and harm statistics."""

    def __init__(self, adapter: Path, params: config.Params, train_records: list[dict]):
        from pipeline.scoring import Evaluator

        self.ev = Evaluator.load(adapter, params, who="monitor")
        self.tau = float(self.ev.meta.get("tau", params.train.loss.tau))
        pick = np.random.default_rng(params.monitor.seed).permutation(len(train_records))[: params.monitor.reference_captions]
        _, self.negatives, _ = self.ev.embed([train_records[i] for i in sorted(pick)], likelihood=False)

    def score(self, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(InfoNCE loss, matched-pair cosine) of each captioned record."""
        if not records:
            return np.zeros(0), np.zeros(0)
        v, t, _ = self.ev.embed(records, likelihood=False)
        return pair_losses(v, t, self.negatives, self.tau), (v * t).sum(1)

    def answer(self, records: list[dict], params: config.Params) -> tuple[list, np.ndarray]:
        """(predicted labels, answer confidences) of records, asked with the dataset's prompt."""
        if not records:
            return [], np.zeros(0)
        asked = [{**r, "messages": r.get("messages") or chat.messages("", params.data.prompt, params.data.system_prompt)}
                 for r in records]
        answers, conf = self.ev.generate_scored(asked)
        return [chat.parse_label(a, self.ev.label_pattern, self.ev.labels) for a in answers], conf


def scores_into(side: Side, rows: list[int], loss: np.ndarray, cosine: np.ndarray) -> None:
    side.loss = np.full(len(side.labels), np.nan)
    side.cosine = np.full(len(side.labels), np.nan)
    side.loss[rows], side.cosine[rows] = loss, cosine


# ---------------------------------------------------------------------------------------- the tests
def sample_rows(n_ref: int, n_cur: int, cfg: config.Monitor) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of each side: all of them, or a seeded sample of `cfg.max_rows` (sorted)."""
    rng = np.random.default_rng(cfg.seed)
    pick = lambda n: np.arange(n) if n <= cfg.max_rows else np.sort(rng.choice(n, cfg.max_rows, replace=False))  # noqa: E731
    return pick(n_ref), pick(n_cur)


def one_per_cluster(rows, clusters: list | None, cap: int, rng: np.random.Generator) -> np.ndarray:
    """One seeded row of each cluster among `rows` (all rows if there are no clusters), at most `cap`, sorted.
    A permutation test assumes exchangeable rows; a patient's images share skin, camera and often label."""
    rows = np.asarray(rows, dtype=int)
    if clusters is not None and len(rows):
        rows = rng.permutation(rows)
        _, first = np.unique(np.asarray(clusters, dtype=object)[rows].astype(str), return_index=True)
        rows = rows[first]
    if len(rows) > cap:
        rows = rng.choice(rows, cap, replace=False)
    return np.sort(rows)


def reduce(ref: np.ndarray, cur: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA fit on both sides together (only when the embeddings are wider than `components`). Fit on the
    reference alone, the components would carry that sample's own noise: the batch would look narrower
    than the reference in them, and a large same-distribution batch would read as drift."""
    from sklearn.decomposition import PCA

    pooled = np.concatenate([ref, cur])
    k = min(components, ref.shape[1], len(pooled) - 1)
    if ref.shape[1] <= components or k < 1:
        return ref, cur
    pca = PCA(n_components=k, random_state=0).fit(pooled)
    return pca.transform(ref), pca.transform(cur)


def caption_features(ref: list[str], cur: list[str], max_features: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised TF-IDF of words and word pairs, fit on both sides together: a word that only the batch
    uses counts (and a fit that ignores which side a row came from keeps the permutation test exact)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=max_features).fit(ref + cur)
    return vec.transform(ref).toarray(), vec.transform(cur).toarray()


def strata_of(side: Side, rows: np.ndarray, keys: tuple[str, ...], labels: tuple[str, ...]) -> np.ndarray | None:
    """Each row's stratum from `monitor.condition_on` ('label', 'subgroups'); None if nothing conditions."""
    parts = []
    if "label" in keys:
        lab = [side.labels[i] if side.labels[i] in labels else "?" for i in rows]
        if any(v != "?" for v in lab):
            parts.append(lab)
    if "subgroups" in keys and any(side.subgroups[i] for i in rows):
        parts.append([side.subgroups[i] for i in rows])
    if not parts:
        return None
    return np.array(["/".join(t) for t in zip(*parts)])


def _entry(kind: str, statistic: str, r: tests.TestResult | None, note: str = "", **extra) -> dict:
    if r is None:
        return {"kind": kind, "statistic": statistic, "value": None, "p_value": None, "note": note, **extra}
    return {"kind": kind, "statistic": statistic, "value": r.statistic, **r.summary(), **extra}


def judge(ref: Side, cur: Side, m: config.Monitor, data: config.Data) -> dict:
    """The five tests -> {kind: entry}, each entry with `p_value`, `p_adjusted`, `drifted`, `reason`."""
    labels, out = tuple(data.labels), {}
    rng = np.random.default_rng(m.seed)
    ri = one_per_cluster(np.arange(len(ref.labels)), ref.clusters, m.max_rows, rng)
    ci = one_per_cluster(np.arange(len(cur.labels)), cur.clusters, m.max_rows, rng)
    strata = lambda side, rows: strata_of(side, rows, m.condition_on, labels)  # noqa: E731
    sr, sc = strata(ref, ri), strata(cur, ci)
    both = sr is not None and sc is not None
    # covariate: image embeddings and acquisition statistics within strata (Bonferroni over the two)
    out["covariate"] = covariate_entry(ref, cur, ri, ci, sr if both else None, sc if both else None, m)
    # prevalence: the label mix (given labels), else the champion's predicted mix
    known = [cur.labels[i] for i in ci if cur.labels[i] in labels]
    unknown = {}
    for v in cur.labels:
        if v is not None and v not in labels:
            unknown[v] = unknown.get(v, 0) + 1
    ref_known = [ref.labels[i] for i in ri if ref.labels[i] in labels]
    if len(known) >= m.min_rows and ref_known:
        res = tests.two_sample(np.array(ref_known), np.array(known), "chi2", m.permutations, m.seed + 1)
        out["prevalence"] = _entry("prevalence", "chi2", res, source="labels", unknown_labels=unknown,
                                   reference_mix=_mix(ref_known, labels), current_mix=_mix(known, labels))
    elif ref.predicted is not None and cur.predicted is not None and len(cur.predicted) >= m.min_rows:
        rp = [v or "none" for v in ref.predicted]
        cp = [v or "none" for v in cur.predicted]
        res = tests.two_sample(np.array(rp), np.array(cp), "chi2", m.permutations, m.seed + 1)
        out["prevalence"] = _entry("prevalence", "chi2", res, source="predicted by the champion",
                                   unknown_labels=unknown, reference_mix=_mix(rp, labels + ("none",)),
                                   current_mix=_mix(cp, labels + ("none",)))
    else:
        out["prevalence"] = _entry("prevalence", "chi2", None, f"{len(known)} rows with one of data.labels "
                                   f"(< monitor.min_rows = {m.min_rows}) and no champion answers", unknown_labels=unknown)
    # subgroup: the mix of data.subgroups values, within labels
    if data.subgroups and any(v and v != "|".join(["unknown"] * len(data.subgroups)) for v in cur.subgroups):
        lr, lc = strata_of(ref, ri, ("label",), labels), strata_of(cur, ci, ("label",), labels)
        lab_ok = lr is not None and lc is not None
        res = tests.two_sample(np.array(ref.subgroups)[ri], np.array(cur.subgroups)[ci], "chi2", m.permutations,
                               m.seed + 2, lr if lab_ok else None, lc if lab_ok else None)
        out["subgroup"] = _entry("subgroup", "chi2", res, columns=list(data.subgroups),
                                 conditioned_on=["label"] if lab_ok else [])
    else:
        out["subgroup"] = _entry("subgroup", "chi2", None, "the batch has no data.subgroups values")
    # text and alignment: captioned rows only
    rc = [i for i in ri if ref.captions[i]]
    cc = [i for i in ci if cur.captions[i]]
    if len(cc) < m.min_captions or not rc:
        why = f"{len(cc)} captioned rows (< monitor.min_captions = {m.min_captions}): no text or alignment test"
        out["text"] = _entry("text", "linear_mmd", None, why)
        out["alignment"] = _entry("alignment", m.alignment, None, why)
    else:
        srt, sct = strata(ref, np.array(rc)), strata(cur, np.array(cc))
        ok = srt is not None and sct is not None
        a, b = caption_features([ref.captions[i] for i in rc], [cur.captions[i] for i in cc], m.text_features)
        res = tests.two_sample(a, b, "linear_mmd", m.permutations, m.seed + 3, srt if ok else None, sct if ok else None)
        out["text"] = _entry("text", "linear_mmd", res, features="caption TF-IDF (words, word pairs)",
                             conditioned_on=list(m.condition_on) if ok else [])
        out["alignment"] = alignment_entry(ref, cur, m, labels)
    family = {k: v["p_value"] for k, v in out.items() if v.get("p_value") is not None}
    adjusted = tests.adjust(family, m.correction)
    for k, v in out.items():
        v["p_adjusted"] = adjusted.get(k)
        v["drifted"] = bool(adjusted.get(k) is not None and adjusted[k] < m.alpha)
        v["reason"] = reason_of(k, v, m)
    return out


def covariate_entry(ref: Side, cur: Side, ri, ci, sr, sc, m: config.Monitor) -> dict:
    """Two views of the images, one kind: the fixed encoder's embeddings (PCA) with `monitor.embedding`, and
    the acquisition statistics (standardised on the reference) with MMD; p = min(1, 2 x the smaller)."""
    (er, pr), (ec, pc) = split_features(ref.emb[ri]), split_features(cur.emb[ci])
    r, c = reduce(er, ec, m.pca_components)
    emb = tests.two_sample(r, c, m.embedding, m.permutations, m.seed, sr, sc)
    both = np.concatenate([pr, pc])  # standardised on both sides together (as the PCA: the test stays exact)
    mu, sd = both.mean(0), both.std(0) + 1e-6
    props = tests.two_sample((pr - mu) / sd, (pc - mu) / sd, "mmd", m.permutations, m.seed + 6, sr, sc)
    main = emb if emb.p_value <= props.p_value else props
    combined = tests.TestResult(main.statistic, min(1.0, 2 * min(emb.p_value, props.p_value)), main.permutations,
                                main.null)
    return _entry("covariate", m.embedding if main is emb else "mmd", combined,
                  view="embeddings" if main is emb else "acquisition statistics",
                  embeddings={"statistic": m.embedding, "value": emb.statistic, "p_value": emb.p_value},
                  acquisition={"statistic": "mmd", "value": props.statistic, "p_value": props.p_value,
                               "features": list(PROPERTIES),
                               "reference_mean": dict(zip(PROPERTIES, np.round(pr.mean(0), 4).tolist())),
                               "current_mean": dict(zip(PROPERTIES, np.round(pc.mean(0), 4).tolist()))},
                  conditioned_on=list(m.condition_on) if sr is not None else [],
                  reference_rows=len(ri), current_rows=len(ci))


def alignment_entry(ref: Side, cur: Side, m: config.Monitor, labels: tuple[str, ...]) -> dict:
    """The per-pair contrastive loss of the batch against val's (the champion's), within strata; the
    matched-pair cosine as a second statistic (reported, not part of the decision)."""
    if ref.loss is None or cur.loss is None:
        return _entry("alignment", m.alignment, None, "no champion adapter (run train)")
    rr = np.flatnonzero(~np.isnan(ref.loss))
    cr = np.flatnonzero(~np.isnan(cur.loss))
    if len(cr) < m.min_captions or len(rr) < 2 or len(set(ref.clusters[i] for i in rr)) < 2:
        return _entry("alignment", m.alignment, None,
                      f"{len(cr)} scored batch pairs and {len(rr)} validation pairs: too few")
    rng = np.random.default_rng(m.seed + 7)
    rr, cr = one_per_cluster(rr, ref.clusters, m.max_rows, rng), one_per_cluster(cr, cur.clusters, m.max_rows, rng)
    sr, sc = strata_of(ref, rr, m.condition_on, labels), strata_of(cur, cr, m.condition_on, labels)
    ok = sr is not None and sc is not None
    res = tests.two_sample(ref.loss[rr], cur.loss[cr], m.alignment, m.permutations, m.seed + 4,
                           sr if ok else None, sc if ok else None)
    cos = tests.two_sample(ref.cosine[rr], cur.cosine[cr], m.alignment, m.permutations, m.seed + 5,
                           sr if ok else None, sc if ok else None)
    return _entry("alignment", m.alignment, res, statistic_of="per-pair InfoNCE loss", reference="val split",
                  reference_mean=float(ref.loss[rr].mean()), current_mean=float(cur.loss[cr].mean()),
                  conditioned_on=list(m.condition_on) if ok else [],
                  cosine={"value": cos.statistic, "p_value": cos.p_value,
                          "reference_mean": float(ref.cosine[rr].mean()), "current_mean": float(cur.cosine[cr].mean())})


def _mix(values: list, labels: tuple[str, ...]) -> dict:
    n = max(len(values), 1)
    return {k: round(sum(v == k for v in values) / n, 4) for k in labels}


def reason_of(kind: str, e: dict, m: config.Monitor) -> str:
    if e.get("p_value") is None:
        return f"{kind}: not tested ({e.get('note', '')})"
    verdict = "drift" if e["drifted"] else "no drift"
    within = " within " + " x ".join(e["conditioned_on"]) if e.get("conditioned_on") else ""
    what = {"covariate": f"the images ({e.get('view', '')}{within})",
            "prevalence": f"the label mix ({e.get('source', '')}: {e.get('current_mix')} vs {e.get('reference_mix')})",
            "subgroup": "the subgroup mix (" + ", ".join(e.get("columns", [])) + ")",
            "text": "the captions' wording (TF-IDF)",
            "alignment": "the per-pair contrastive loss (mean "
                         f"{e.get('current_mean', float('nan')):.3f} vs val {e.get('reference_mean', float('nan')):.3f})"}[kind]
    return (f"{kind}: {verdict} in {what}; {e['statistic']} {e['value']:.4g}, p {e['p_value']:.4f}, "
            f"{m.correction}-adjusted {e['p_adjusted']:.4f} vs alpha {m.alpha}")


# ------------------------------------------------------------------------------------------ harm
def harm(champion: Champion | None, ref_records: list[dict], cur_records: list[dict], params: config.Params,
         ref: Side, cur: Side) -> dict:
    """The champion's macro-F1 on the batch (labelled rows) or its ATC estimate, against its F1 on val.
    Fills `ref.predicted` / `cur.predicted` for the prevalence test of unlabelled batches."""
    from pipeline.scoring import f1_macro

    m, labels = params.monitor, tuple(params.data.labels)
    if champion is None or m.harm_rows <= 0:
        return {"measured": None, "note": "no champion adapter" if champion is None else "monitor.harm_rows = 0"}
    rng = np.random.default_rng(m.seed)
    val = [i for i, r in enumerate(ref_records) if r.get("label") in labels and r.get("_val")]
    val = sorted(rng.choice(val, min(len(val), m.harm_rows), replace=False).tolist()) if val else []
    if not val:
        return {"measured": None, "note": "no labelled validation rows to compare with"}
    rows = sorted(rng.choice(len(cur_records), min(len(cur_records), m.harm_rows), replace=False).tolist())
    vp, vc = champion.answer([ref_records[i] for i in val], params)
    bp, bc = champion.answer([cur_records[i] for i in rows], params)
    ref.predicted, cur.predicted = list(vp), list(bp)  # the two mixes the prevalence test compares without labels
    y_val = [ref_records[i]["label"] for i in val]
    f1_val = f1_macro(y_val, vp, labels)
    out = {"reference_f1": f1_val, "reference_rows": len(val), "rows": len(rows)}
    labelled = [k for k, i in enumerate(rows) if cur_records[i].get("label") in labels]
    if len(labelled) >= m.min_rows:
        y = [cur_records[rows[k]]["label"] for k in labelled]
        p = [bp[k] for k in labelled]
        f1 = f1_macro(y, p, labels)
        ci = tests.bootstrap_interval(lambda ix: f1_macro([y[j] for j in ix], [p[j] for j in ix], labels),
                                      len(y), m.bootstrap, m.seed)
        out.update(measured=True, f1=f1, interval=ci, labelled_rows=len(y),
                   method="macro-F1 of the champion's answers on the batch's labelled rows, 95 % bootstrap interval")
    else:
        t = tests.atc_threshold(vc, f1_val)
        est = float(np.mean(bc > t))
        ci = tests.bootstrap_interval(lambda ix: float(np.mean(bc[ix] > t)), len(bc), m.bootstrap, m.seed)
        out.update(measured=False, f1=est, interval=ci, threshold=t,
                   method="Average Thresholded Confidence: the share of answers more confident than the validation "
                          "threshold at which that share equals the validation macro-F1")
    out["drop"] = f1_val - out["f1"]
    return out


def decide(kinds: dict, h: dict, m: config.Monitor) -> tuple[str, bool, list[str]]:
    """(status, retrain, reasons) from the drifted kinds and the harm figures."""
    drifted = [k for k in KINDS if kinds[k]["drifted"]]
    if not drifted:
        return "ok", False, []
    reasons = [kinds[k]["reason"] for k in drifted]
    heavy = [k for k in drifted if k in m.retrain_on]
    if heavy and m.max_f1_drop is None:
        return "drift", True, reasons
    if heavy and h.get("measured") is None:
        return "drift", True, reasons + [f"the F1 drop could not be measured ({h.get('note')}): drift alone decides"]
    if heavy and h["drop"] > m.max_f1_drop:
        how = "measured" if h["measured"] else "estimated"
        return "drift", True, reasons + [f"F1 {how} {h['f1']:.3f} vs {h['reference_f1']:.3f} on val: a drop of "
                                         f"{h['drop']:.3f} > monitor.max_f1_drop {m.max_f1_drop}"]
    if heavy:
        reasons.append(f"F1 {h['f1']:.3f} vs {h['reference_f1']:.3f} on val: a drop of {h['drop']:.3f} <= "
                       f"monitor.max_f1_drop {m.max_f1_drop}: alert only")
    else:
        reasons.append(f"none of {list(m.retrain_on)} (monitor.retrain_on) drifted: alert only")
    return "alert", False, reasons


# ---------------------------------------------------------------------------------------- the report
def evidently_report(ref: np.ndarray, cur: np.ndarray, ref_score: np.ndarray | None, cur_score: np.ndarray | None,
                     cfg: config.Monitor):
    """The Evidently report: embedding drift, plus drift of the per-pair contrastive loss when both sides have
    one. One row per image; `*_score` (NaN where a row has no score) is the `alignment_loss` column. Both sides
    are subsampled (seeded) to `max_rows` and PCA-reduced first. Evidently's own verdicts (its default
    thresholds) are drawn, not used: the decision is the permutation tests'."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.metrics.data_drift import embedding_drift_methods as em
    from evidently.metrics import EmbeddingsDrift, ValueDrift

    ri, ci = sample_rows(len(ref), len(cur), cfg)
    r, c = reduce(ref[ri], cur[ci], cfg.pca_components)
    with_scores = (ref_score is not None and cur_score is not None and not np.isnan(ref_score[ri]).all()
                   and not np.isnan(cur_score[ci]).all())
    cols = [f"e{i}" for i in range(r.shape[1])]
    definition = DataDefinition(numerical_columns=cols + (["alignment_loss"] if with_scores else []),
                                embeddings={"image": cols})
    ref_df, cur_df = _frame(r, ref_score[ri] if with_scores else None), _frame(c, cur_score[ci] if with_scores else None)
    method = {"mmd": em.mmd, "model": em.model}[cfg.embedding]()
    metrics = [EmbeddingsDrift(embeddings_name="image", drift_method=method)]
    if with_scores:
        metrics.append(ValueDrift(column="alignment_loss", method="ks"))
    snapshot = Report(metrics).run(current_data=Dataset.from_pandas(cur_df, data_definition=definition),
                                   reference_data=Dataset.from_pandas(ref_df, data_definition=definition))
    values = [m["value"] for m in snapshot.dict()["metrics"]]
    return snapshot, float(values[0])


def _frame(emb: np.ndarray, score: np.ndarray | None):
    import pandas as pd

    df = pd.DataFrame(emb, columns=[f"e{i}" for i in range(emb.shape[1])])
    if score is not None:
        df["alignment_loss"] = score
    return df


def tests_html(result: dict) -> str:
    """The permutation tests as an HTML section (added to Evidently's report): one row per kind, and each
    null distribution as a small histogram with the observed statistic marked."""
    import html

    rows, charts = [], []
    for kind in KINDS:
        e = result["kinds"][kind]
        p = e.get("p_value")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
            kind, e["statistic"], "-" if e.get("value") is None else f"{e['value']:.4g}",
            "-" if p is None else f"{p:.4f}", "-" if e.get("p_adjusted") is None else f"{e['p_adjusted']:.4f}",
            "DRIFT" if e["drifted"] else "no", e["reason"])) + "</tr>")
        if e.get("null"):
            charts.append(f"<div><b>{kind}</b>: null distribution ({e['permutations']} permutations), observed "
                          f"in red{_histogram_svg(e['null'], e['value'])}</div>")
    h = result.get("harm", {})
    harm_line = html.escape(f"F1 {h.get('f1'):.3f} (interval {h.get('interval')}) vs {h.get('reference_f1'):.3f} on val"
                            if h.get("measured") is not None else str(h.get("note", "")))
    return ("<section style='font-family:sans-serif;margin:2em'><h2>Permutation tests (the decision)</h2>"
            f"<p>status <b>{html.escape(result['status'])}</b>, retrain <b>{result['retrain']}</b>; alpha "
            f"{result['alpha']}, {html.escape(result['correction'])} correction. Evidently's verdicts above use its "
            "default thresholds and are not the decision.</p><table border=1 cellpadding=4><tr><th>kind</th>"
            "<th>statistic</th><th>value</th><th>p</th><th>adjusted p</th><th>drift</th><th>reason</th></tr>"
            + "".join(rows) + f"</table><p>harm: {harm_line}</p>" + "".join(charts) + "</section>")


def _histogram_svg(null: list[float], observed: float, width: int = 320, height: int = 80) -> str:
    counts, edges = np.histogram(null + [observed], bins=30)
    top = max(counts.max(), 1)
    w = width / len(counts)
    bars = "".join(f"<rect x='{i * w:.1f}' y='{height - c / top * height:.1f}' width='{w - 1:.1f}' "
                   f"height='{c / top * height:.1f}' fill='#888'/>" for i, c in enumerate(counts))
    x = (observed - edges[0]) / max(edges[-1] - edges[0], 1e-12) * width
    return (f"<svg width='{width}' height='{height}'>{bars}<line x1='{x:.1f}' x2='{x:.1f}' y1='0' y2='{height}' "
            "stroke='red' stroke-width='2'/></svg>")


# ------------------------------------------------------------------------------------------- main
def check_params(params: config.Params) -> None:
    """Params that cannot work here fail before anything is computed (exit 2, naming the key)."""
    m = params.monitor
    bad = [k for k in m.retrain_on if k not in KINDS]
    if bad:
        raise InputError(f"monitor.retrain_on: {bad} are not kinds of shift (known: {list(KINDS)})")
    bad = [k for k in m.condition_on if k not in ("label", "subgroups")]
    if bad:
        raise InputError(f"monitor.condition_on: {bad} (known: label, subgroups)")
    if not 0 < m.alpha < 1 or m.permutations < 1:
        raise InputError(f"monitor.alpha must be in (0, 1) and monitor.permutations >= 1 (got {m.alpha}, {m.permutations})")
    worst = 2 * len(KINDS)  # the covariate kind's two views, then up to five kinds in the correction
    if worst / (m.permutations + 1) >= m.alpha:
        raise InputError(f"monitor.permutations = {m.permutations}: the smallest adjusted p-value, {worst}/"
                         f"{m.permutations + 1}, is not below monitor.alpha = {m.alpha}, so no test could ever fire; "
                         f"use at least {int(np.ceil(worst / m.alpha))} permutations")


def check(batch: Path, params: config.Params) -> tuple[dict, object]:
    """The whole check of one batch -> the drift.json content (and the snapshot, if one was made)."""
    m = params.monitor
    split = Path(params.paths.split)
    check_params(params)
    readable, failed, counts = read_batch(batch, params)
    result = {"batch": batch.name, "path": str(batch), "counts": counts, "failed_rows": failed[:100],
              "alpha": m.alpha, "correction": m.correction, "kinds": {}, "drifted_kinds": [], "harm": {},
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
    if not (split / "train.jsonl").is_file():
        raise InputError(f"monitor: the reference {split / 'train.jsonl'} is missing (run split first)")
    train_recs = dataio.read_jsonl(split / "train.jsonl")
    held_out = dataio.read_jsonl(split / "val.jsonl") if (split / "val.jsonl").is_file() else []
    reference = train_recs + [{**r, "_val": True} for r in held_out]
    if len(reference) < max(m.min_rows, 2 * len(params.data.labels)):
        raise InputError(f"monitor: the reference holds {len(reference)} rows (train + val under {split}); the "
                         f"tests need at least {max(m.min_rows, 2 * len(params.data.labels))} (monitor.min_rows)")
    encoder = FixedEncoder(params)
    ref_emb = reference_embeddings(encoder, reference, Path(params.paths.reports) / "drift")
    ref = side_of(reference, ref_emb, params.data.subgroups, m.cluster_column)
    # the tests read one row per patient and at most max_rows: only those are embedded and scored, so a
    # check costs the same for 1,000 and for 100,000 images (the row and image checks above read them all)
    clusters = side_of(readable, np.zeros((len(readable), 0)), (), m.cluster_column).clusters
    chosen = [readable[i] for i in one_per_cluster(np.arange(len(readable)), clusters, m.max_rows,
                                                   np.random.default_rng(m.seed))]
    cur = side_of(chosen, encoder([r["image"] for r in chosen]), params.data.subgroups, m.cluster_column)
    adapter, source = alignment_adapter(params)
    champion = Champion(adapter, params, train_recs) if adapter is not None else None
    if champion is not None:
        val_rows = one_per_cluster(np.arange(len(train_recs), len(reference)), ref.clusters, m.max_rows,
                                   np.random.default_rng(m.seed + 8)).tolist()
        cap_rows = [i for i, r in enumerate(chosen) if "messages" in r]
        loss, cos = champion.score([reference[i] for i in val_rows])
        scores_into(ref, val_rows, loss, cos)
        loss, cos = champion.score([chosen[i] for i in cap_rows])
        scores_into(cur, cap_rows, loss, cos)
    h = harm(champion, reference, chosen, params, ref, cur)
    kinds = judge(ref, cur, m, params.data)
    if champion is None and kinds["alignment"].get("p_value") is None and counts["captioned"] >= m.min_captions:
        kinds["alignment"]["note"] = source
        kinds["alignment"]["reason"] = f"alignment: not tested ({source})"
    status, retrain, reasons = decide(kinds, h, m)
    snapshot, evidently_value = evidently_report(split_features(ref.emb)[0], split_features(cur.emb)[0], ref.loss,
                                                 cur.loss, m)
    cov, al = kinds["covariate"], kinds["alignment"]
    result.update(kinds=kinds, drifted_kinds=[k for k in KINDS if kinds[k]["drifted"]], harm=h, status=status,
                  retrain=retrain, reasons=reasons, champion=source)
    result["embedding_drift"] = {"method": f"{m.embedding} permutation test", "score": cov["value"],
                                 "p_value": cov["p_value"], "p_adjusted": cov["p_adjusted"], "threshold": m.alpha,
                                 "drifted": cov["drifted"], "encoder": "frozen base vision tower",
                                 "evidently_score": evidently_value, "reference_rows": len(ref.labels),
                                 "current_rows": len(cur.labels), "batch_rows": len(readable)}
    result["loss_drift"] = {"method": f"{m.alignment} permutation test", "score": al.get("value"),
                            "p_value": al.get("p_value"), "p_adjusted": al.get("p_adjusted"), "threshold": m.alpha,
                            "drifted": al["drifted"], "statistic": "per-pair InfoNCE loss of " + source,
                            "reference": "val split", **({"note": al["note"]} if al.get("note") else {})}
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
            page = (out / "drift.html").read_text()
            cut = page.rfind("</body>")
            section = tests_html(result)
            (out / "drift.html").write_text(page[:cut] + section + page[cut:] if cut >= 0 else page + section)
    summary = {k: result[k] for k in ("batch", "status", "retrain", "reasons", "drifted_kinds")}
    summary["report"] = str(Path(params.paths.reports) / "drift" / batch_dir.name / "drift.json")
    if result["retrain"]:
        raise DriftFound(json.dumps(summary, indent=2, sort_keys=True))
    return summary
