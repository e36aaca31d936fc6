"""`export`: the fine-tune as one standalone model, for serving engines that drop parts of an adapter.

Serving engines load LoRA on the language model only (vLLM ignores vision-tower LoRA and
`modules_to_save`), so an adapter trained with `train.peft.adapt_vision` would be served half-applied.
`export` merges the adapter into its base (`merge_and_unload`; a QLoRA adapter into an unquantized copy of
the base: 16-bit on a GPU, 32-bit on the CPU) and writes a plain model folder that
`Gemma3ForConditionalGeneration` / `AutoModelForImageTextToText` + `AutoProcessor` load with no PEFT.
The adapter comes from the registry (`--alias`, default `champion`, or `--version N`) or from a folder
(`--adapter`); a registry version gets the merged folder as artifacts of an `export` run and the tags
`export_run_id` / `export_uri`.

    python -m pipeline export [--alias champion | --version N | --adapter models/adapter] [--out DIR]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline import config, data as dataio, model as modelmod, tracking
from pipeline.errors import InputError


def merge(adapter: Path, params: config.Params, out: Path) -> dict:
    """Merge `adapter` into its base and save model + processor to `out` (atomically)."""
    loaded = modelmod.load_adapter(adapter, params, who="export", full_precision=True)
    merged = loaded.model.merge_and_unload()
    with dataio.atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        loaded.processor.save_pretrained(tmp)
        info = {"adapter_sha256": dataio.dir_sha256(adapter), "base": params.model.base,
                "base_weights_sha256": loaded.meta.get("base_weights_sha256"), "method": loaded.meta.get("method"),
                "labels": loaded.meta.get("labels"), "dtype": str(next(merged.parameters()).dtype).replace("torch.", ""),
                "parameters": sum(p.numel() for p in merged.parameters())}
        dataio.write_json(tmp / "export_meta.json", info)
    return info


def registry_adapter(params: config.Params, version: str | None, alias: str | None, tmp: Path):
    """(local copy of the version's adapter, the version) for `--version` or `--alias`."""
    c = tracking.client()
    mv = tracking.find_version(c, params.mlflow.registered_model, version, alias, "export")
    return tracking.download_adapter(c, mv, tmp), mv


def main(params: config.Params, version: str | None = None, alias: str | None = None,
         adapter: str | None = None, out: str | None = None) -> dict:
    if adapter and (version or alias):
        raise InputError("export: give --adapter, or --version / --alias, not both")
    if adapter:
        folder = Path(adapter)
        if not folder.is_dir():
            raise InputError(f"export: no adapter folder at {folder}")
        target = Path(out or Path(params.paths.models) / "export" / "local")
        return {"out": str(target), **merge(folder, params, target)}
    with tempfile.TemporaryDirectory() as tmp:
        folder, mv = registry_adapter(params, version, alias or (None if version else "champion"), Path(tmp))
        name = params.mlflow.registered_model
        target = Path(out or Path(params.paths.models) / "export" / f"{name}-v{mv.version}")
        info = merge(folder, params, target)
    import mlflow

    tracking.use_experiment(params.mlflow.experiment)
    with mlflow.start_run(run_name=f"export v{mv.version}") as run:
        mlflow.log_artifacts(str(target), artifact_path="merged")
        uri = f"{run.info.artifact_uri}/merged"
    c = tracking.client()
    c.set_model_version_tag(name, str(mv.version), "export_run_id", run.info.run_id)
    c.set_model_version_tag(name, str(mv.version), "export_uri", uri)
    return {"out": str(target), "version": str(mv.version), "export_uri": uri, **info}
