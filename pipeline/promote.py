"""`promote`: the MLflow registry step (docs/design.md §7).

The trained adapter (whose metrics `evaluate` wrote) becomes a version of the registered model, tagged
with the git commit, the DVC hashes of its data and model, and its MLflow runs. If any gate failed the
command exits 1 listing the gates and moves no alias. Otherwise the version gets alias `challenger`;
the current `champion` (if any) is evaluated on the same sets, and the challenger takes `champion` only
if it beats it on the primary metric on `promote.improve_on` and falls by no more than
`promote.max_drop` on every other set. The former champion keeps alias `previous`;
`promote --rollback` gives `champion` back to it.

With `promote.approval: required` a challenger that earns `champion` waits instead (decision "awaiting
approval", the champion it was judged against recorded); `promote --approve N --by NAME` moves the alias
(refused if the champion changed meanwhile), `promote --reject N --by NAME` tags the version rejected by a
person and moves nothing. The `finetune` DAG asks through Airflow's human-in-the-loop approval.
Every version is a servable MLflow pyfunc model (`pipeline.serve`); `lineage` prints the chain from data
to a version.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline import config, data as dataio, model as modelmod, scoring, serve, tracking, vcs
from pipeline.errors import CheckFailed, InputError

MODEL_PATH = "model"  # the registered pyfunc model, in the train run's artifacts
HISTORY_TAG = "champion_history"
AWAITING = "awaiting approval"  # decision of a better challenger under `promote.approval: required`
AWAITING_TAG = "awaiting_over"   # the champion version it was judged against ("none": the first)  # registered-model tag: comma-separated champion versions, oldest first


def history(c, name: str) -> list[str]:
    tags = c.get_registered_model(name).tags or {}
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


def set_history(c, name: str, versions: list[str]) -> None:
    c.set_registered_model_tag(name, HISTORY_TAG, ",".join(versions))


def register(c, name: str, adapter: Path, metrics: dict, params: config.Params):
    """The version for this adapter (reused if the same adapter bytes were registered before)."""
    import mlflow

    sha = metrics["adapter_sha256"]
    found = c.search_model_versions(f"name = '{name}' and tag.adapter_sha256 = '{sha}'")
    if found:
        return found[0]
    run_id = metrics.get("train_run_id")
    if not run_id or not _has_run(c, run_id):
        tracking.use_experiment(params.mlflow.experiment)
        with mlflow.start_run(run_name="register") as run:
            run_id = run.info.run_id
    # the version is a servable pyfunc model holding the adapter (pipeline.serve), logged to the train run
    with tempfile.TemporaryDirectory() as tmp:
        c.log_artifacts(run_id, str(serve.save(Path(tmp) / "model", adapter, params)), artifact_path=MODEL_PATH)
    source = f"{c.get_run(run_id).info.artifact_uri}/{MODEL_PATH}"
    meta = json.loads((adapter / "pipeline_meta.json").read_text()) if (adapter / "pipeline_meta.json").is_file() else {}
    tags = {"adapter_sha256": sha, "git_commit": str(vcs.git_commit()), "train_run_id": str(run_id),
            "seen_ids_sha256": str(meta.get("seen_ids_sha256")), "base_weights_sha256": str(meta.get("base_weights_sha256")),
            "eval_run_id": str(metrics.get("eval_run_id")), "base": params.model.base,
            "f1_macro": f"{metrics['f1_macro']:.4f}", "gates_passed": str(metrics["passed"]), **vcs.dvc_hashes()}
    return c.create_model_version(name, source=source, run_id=run_id, tags=tags)


def _has_run(c, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
        return True
    except MlflowException:
        return False


def compare(challenger: dict, champion: dict, cfg: config.Promote) -> tuple[bool, list[str]]:
    """Does the challenger beat the champion? (per-set primary metric; reasons either way). A set whose
    entry carries `n_unseen` was scored on the samples neither model saw, and the reason says how many."""
    key, reasons, better = cfg.primary_metric, [], True
    for name, ch in challenger["sets"].items():
        if name not in champion["sets"]:
            continue
        a, b = ch[key], champion["sets"][name][key]
        on = f" on {ch['n_unseen']} samples neither saw" if "n_unseen" in ch else ""
        if name in cfg.improve_on:
            ok = a > b + cfg.min_improvement
            reasons.append(f"{name}: {key} {a:.4f} vs champion {b:.4f}{on} ({'improves' if ok else 'does not improve'})")
        else:
            ok = a >= b - cfg.max_drop
            reasons.append(f"{name}: {key} {a:.4f} vs champion {b:.4f}{on} "
                           f"({'within' if ok else 'drops more than'} the {cfg.max_drop} tolerance)")
        better &= ok
    missing = [n for n in cfg.improve_on if n not in challenger["sets"]]
    if missing:
        raise InputError(f"promote.improve_on: no evaluation set named {missing} (sets: {sorted(challenger['sets'])})")
    return better, reasons


def evaluate_champion(c, version, params: config.Params) -> tuple[dict, dict[str, list[dict]], set[str]] | None:
    """The champion's metrics and per-sample predictions on today's evaluation sets, and the ids it
    trained and validated on; None only when it was trained on another `model.base` (the one case where
    a challenger may replace it without a comparison). Any other failure to evaluate it stops the decision
    (CheckFailed, exit 1): a model is never promoted by default."""
    if version.tags.get("base", params.model.base) != params.model.base:
        return None
    sets, mismatch = scoring.load_sets(params)
    with tempfile.TemporaryDirectory() as tmp:
        local = tracking.download_adapter(c, version, Path(tmp))
        seen = modelmod.seen_ids(local)
        if seen is None:
            raise CheckFailed(f"promote: champion v{version.version} records no seen ids ({modelmod.SEEN_IDS}): "
                              "it cannot be compared on samples it has not seen, and no alias moves")
        try:
            metrics, predictions = scoring.evaluate_adapter(local, sets, mismatch, params)
        except InputError as e:
            raise CheckFailed(f"promote: champion v{version.version} could not be evaluated, so nothing is "
                              f"compared and no alias moves: {e}") from None
    return metrics, predictions, seen


def challenger_predictions(params: config.Params, names) -> dict[str, list[dict]]:
    """The per-sample predictions `evaluate` wrote for the challenger, per evaluation set."""
    folder = Path(params.paths.reports) / "eval"
    out = {}
    for name in names:
        path = folder / ("predictions.jsonl" if name == "test" else f"predictions_{name}.jsonl")
        if not path.is_file():
            raise InputError(f"promote: {path} not found (run evaluate again)")
        out[name] = dataio.read_jsonl(path)
    return out


def unseen_sets(challenger: dict[str, list[dict]], champion: dict[str, list[dict]], seen: set[str],
                params: config.Params) -> tuple[dict, dict]:
    """Both models' primary metric per set, on the samples that neither trained nor validated on
    (`seen`: the union of their ids). A set left with fewer than `promote.min_samples` stops the decision."""
    key, labels = params.promote.primary_metric, tuple(params.data.labels)
    ch, cp, short = {}, {}, []
    for name in challenger:
        if name not in champion:
            continue
        keep = {r["id"] for r in challenger[name]} - seen
        rows_a = [r for r in challenger[name] if r["id"] in keep]
        rows_b = {r["id"]: r for r in champion[name] if r["id"] in keep}
        if len(rows_a) < params.promote.min_samples:
            short.append(f"{name}: {len(rows_a)} of {len(challenger[name])} samples unseen by both "
                         f"(promote.min_samples {params.promote.min_samples})")
            continue
        for out, rows in ((ch, rows_a), (cp, [rows_b[r["id"]] for r in rows_a])):
            m = scoring.classification([r["label"] for r in rows], [r["prediction"] for r in rows], labels)
            out[name] = {key: m[key], "n_unseen": len(rows)}
    if short:
        raise CheckFailed("promote: too few samples that neither champion nor challenger has seen, so nothing "
                          "is compared and no alias moves:\n  " + "\n  ".join(short))
    return {"sets": ch}, {"sets": cp}


def promote(params: config.Params) -> dict:
    name = params.mlflow.registered_model
    adapter = Path(params.paths.models) / "adapter"
    metrics_path = Path(params.paths.reports) / "metrics.json"
    if not adapter.is_dir():
        raise InputError(f"promote: no adapter at {adapter} (run train first)")
    if not metrics_path.is_file():
        raise InputError(f"promote: {metrics_path} not found (run evaluate first)")
    metrics = json.loads(metrics_path.read_text())
    if metrics.get("adapter_sha256") != dataio.dir_sha256(adapter):
        raise InputError(f"promote: {metrics_path} was written for another adapter than {adapter} (run evaluate again)")
    if params.promote.primary_metric not in next(iter(metrics["sets"].values())):
        raise InputError(f"promote.primary_metric: {params.promote.primary_metric!r} is not a per-set metric "
                         f"({sorted(next(iter(metrics['sets'].values())))})")
    c = tracking.client()
    tracking.ensure_model(c, name)
    version = register(c, name, adapter, metrics, params)
    v = str(version.version)
    failed = scoring.failed_gates(metrics["gates"])
    if failed:
        c.set_model_version_tag(name, v, "decision", "rejected: gates failed")
        raise CheckFailed(f"promote: version {v} not promoted; failing gates:\n  " + "\n  ".join(failed))
    champion = tracking.alias_version(c, name, "champion")
    if champion is not None and str(champion.version) == v:
        c.set_registered_model_alias(name, "challenger", v)
        return {"version": v, "decision": "already champion", "champion": v}
    # the champion is scored before any alias moves: a failure there leaves every alias where it was
    champ = evaluate_champion(c, champion, params) if champion is not None else None
    if champ is not None:
        seen_challenger = modelmod.seen_ids(adapter)
        if seen_challenger is None:
            raise InputError(f"promote: {adapter} records no seen ids ({modelmod.SEEN_IDS}): train it again")
        _, champ_predictions, seen_champion = champ
        compared = unseen_sets(challenger_predictions(params, champ_predictions), champ_predictions,
                               seen_challenger | seen_champion, params)
    c.set_registered_model_alias(name, "challenger", v)
    reasons: list[str] = []
    if champion is None:
        better, reasons = True, ["no champion yet: the first version that passes every gate becomes champion"]
    else:
        if champ is None:
            better, reasons = True, [f"champion v{champion.version} was trained on model.base "
                                     f"{champion.tags.get('base')!r}, today's is {params.model.base!r}: the "
                                     "challenger replaces it without a comparison"]
        else:
            better, reasons = compare(*compared, params.promote)
    if not better:
        c.set_model_version_tag(name, v, "decision", "kept champion: " + "; ".join(reasons))
        return {"version": v, "decision": "not promoted", "champion": str(champion.version), "reasons": reasons}
    if params.promote.approval == "required":
        held = str(champion.version) if champion is not None else "none"
        c.set_model_version_tag(name, v, AWAITING_TAG, held)
        c.set_model_version_tag(name, v, "decision", AWAITING + ": " + "; ".join(reasons))
        return {"version": v, "decision": AWAITING, "champion": None if champion is None else held,
                "reasons": reasons, "links": links(c, name, v, metrics)}
    return take_over(c, name, v, champion, reasons, "promoted")


def take_over(c, name: str, v: str, champion, reasons: list[str], how: str) -> dict:
    """`champion` to version `v`; the former champion keeps `previous` and the history grows."""
    past = history(c, name)
    if champion is not None:
        c.set_registered_model_alias(name, "previous", str(champion.version))
        if not past or past[-1] != str(champion.version):
            past.append(str(champion.version))
    c.set_registered_model_alias(name, "champion", v)
    set_history(c, name, past + [v])
    c.set_model_version_tag(name, v, "decision", f"{how}: " + "; ".join(reasons))
    return {"version": v, "decision": "promoted", "champion": v,
            "previous": str(champion.version) if champion else None, "reasons": reasons}


def links(c, name: str, v: str, metrics: dict) -> dict:
    """Where a person reviewing the decision looks: the model version, the train and evaluate runs."""
    uri = c.tracking_uri
    out = {"model": f"models:/{name}/{v}", "tracking_uri": uri}
    for key in ("train_run_id", "eval_run_id"):
        run_id = metrics.get(key)
        if not run_id:
            continue
        out[key] = run_id
        if uri.startswith(("http://", "https://")):
            exp = c.get_run(run_id).info.experiment_id
            out[key.replace("_id", "_url")] = f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return out


def _awaiting(c, name: str, version: str, who: str):
    mv = tracking.find_version(c, name, version, None, f"promote {who}")
    decision = mv.tags.get("decision", "")
    if not decision.startswith(AWAITING):
        raise InputError(f"promote {who}: version {version} is not awaiting approval (decision: {decision or 'none'!r})")
    return mv, [r for r in decision[len(AWAITING) + 2:].split("; ") if r]


def approve(params: config.Params, version: str, by: str = "a person") -> dict:
    """A person approved version `version`'s promotion: it takes `champion`, unless the champion changed
    since the decision was made (then nothing moves: decide again)."""
    name, c = params.mlflow.registered_model, tracking.client()
    mv, reasons = _awaiting(c, name, version, "--approve")
    champion = tracking.alias_version(c, name, "champion")
    now, then = str(champion.version) if champion is not None else "none", mv.tags.get(AWAITING_TAG, "none")
    if now != then:
        raise CheckFailed(f"promote --approve: the champion changed since version {version} was judged "
                          f"(then v{then}, now v{now}); nothing moves: run promote again")
    c.set_model_version_tag(name, str(version), "approved_by", by)
    return {**take_over(c, name, str(version), champion, reasons, f"promoted (approved by {by})"), "approved_by": by}


def reject(params: config.Params, version: str, by: str = "a person") -> dict:
    """A person rejected version `version`'s promotion: the version is tagged so, no alias moves."""
    name, c = params.mlflow.registered_model, tracking.client()
    _, reasons = _awaiting(c, name, version, "--reject")
    c.set_model_version_tag(name, str(version), "rejected_by", by)
    c.set_model_version_tag(name, str(version), "decision", f"rejected by a person ({by}): " + "; ".join(reasons))
    champion = tracking.alias_version(c, name, "champion")
    return {"version": str(version), "decision": "rejected by a person", "rejected_by": by,
            "champion": str(champion.version) if champion is not None else None}


def rollback(params: config.Params) -> dict:
    """Give `champion` back to the version before it (alias `previous`); `previous` moves one further back."""
    name = params.mlflow.registered_model
    c = tracking.client()
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        raise InputError(f"promote --rollback: no registered model {name!r}") from None
    champion, previous = tracking.alias_version(c, name, "champion"), tracking.alias_version(c, name, "previous")
    if previous is None:
        raise InputError(f"promote --rollback: {name} has no version with alias 'previous' to roll back to")
    past = history(c, name)
    if champion is not None and past and past[-1] == str(champion.version):
        past.pop()
    if past and past[-1] == str(previous.version):
        past.pop()
    c.set_registered_model_alias(name, "champion", str(previous.version))
    if past:
        c.set_registered_model_alias(name, "previous", past[-1])
    else:
        c.delete_registered_model_alias(name, "previous")
    set_history(c, name, past + [str(previous.version)])
    if champion is not None:
        c.set_model_version_tag(name, str(champion.version), "decision", f"rolled back to v{previous.version}")
    return {"decision": "rolled back", "champion": str(previous.version),
            "demoted": str(champion.version) if champion else None, "previous": past[-1] if past else None}


def lineage(params: config.Params, version: str | None = None, alias: str | None = None) -> dict:
    """From data to version, for `--version N` or `--alias` (default champion): the git commit, the DVC
    hashes of every pipeline output (data, splits, base, adapter, reports) as recorded in dvc.lock when
    the version was registered, the base's weights hash, the train and evaluate runs, and the decision."""
    from mlflow.exceptions import MlflowException

    name, c = params.mlflow.registered_model, tracking.client()
    mv = tracking.find_version(c, name, version, None if version else (alias or "champion"), "lineage")
    t = mv.tags
    dvc = {k[len("dvc."):]: v for k, v in sorted(t.items()) if k.startswith("dvc.")}

    def run_of(run_id: str | None) -> dict | None:
        if not run_id or run_id == "None":
            return None
        try:
            r = c.get_run(run_id)
        except MlflowException:
            return {"run_id": run_id, "found": False}
        return {"run_id": run_id, "name": r.info.run_name, "status": r.info.status,
                "metrics": {k: v for k, v in sorted(r.data.metrics.items()) if "/" not in k}}

    aliases = sorted(a for a in ("champion", "challenger", "previous")
                     if (h := tracking.alias_version(c, name, a)) is not None and str(h.version) == str(mv.version))
    chain = [f"git commit {t.get('git_commit')}"]
    chain += [f"{path}: md5 {md5}" for path, md5 in dvc.items()]
    chain += [f"base {t.get('base')} (weights sha256 {t.get('base_weights_sha256')})",
              f"train run {t.get('train_run_id')} -> adapter sha256 {t.get('adapter_sha256')}",
              f"evaluate run {t.get('eval_run_id')}: f1_macro {t.get('f1_macro')}, gates passed {t.get('gates_passed')}",
              f"{name} v{mv.version} ({', '.join(aliases) or 'no alias'}): {t.get('decision', 'no decision yet')}"]
    return {"registered_model": name, "version": str(mv.version), "aliases": aliases, "source": mv.source,
            "git_commit": t.get("git_commit"), "dvc": dvc, "base": t.get("base"),
            "base_weights_sha256": t.get("base_weights_sha256"), "adapter_sha256": t.get("adapter_sha256"),
            "seen_ids_sha256": t.get("seen_ids_sha256"), "train": run_of(t.get("train_run_id")),
            "evaluate": run_of(t.get("eval_run_id")), "decision": t.get("decision"),
            "export_uri": t.get("export_uri"), "chain": chain}


def main(params: config.Params, rollback_: bool = False, approve_: str | None = None, reject_: str | None = None,
         by: str | None = None) -> dict:
    if sum(bool(x) for x in (rollback_, approve_, reject_)) > 1:
        raise InputError("promote: give at most one of --rollback, --approve, --reject")
    if approve_:
        return approve(params, approve_, by or "a person")
    if reject_:
        return reject(params, reject_, by or "a person")
    return rollback(params) if rollback_ else promote(params)
