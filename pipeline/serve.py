"""The served model: every registry version is an MLflow pyfunc model that takes an image and answers.

`promote` saves it beside the adapter (`save`): the adapter, the params in force, the built-in base's
weights (a hub base is loaded by its id) and this package's code, with no pickled object (MLflow's
models-from-code: `serve_entry.py` builds the model). `mlflow models serve -m models:/<name>@champion`
then answers HTTP requests:

    POST /invocations  {"dataframe_records": [{"image": "<base64 PNG/JPEG>", "prompt": "optional"}]}
    -> {"predictions": [{"answer": "...", "label": "..."}]}

The answer is the one `evaluate` computes (greedy, the same chat format and processor); `label` is the
label parsed from it with `data.label_pattern` (null when the answer states none). A malformed row (no
image, not base64, an image that does not decode, larger than `curate.max_pixels` / `curate.max_side` or
smaller than `curate.min_side`) is refused with HTTP 400 naming the row and the problem; the server stays up.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from pathlib import Path

import mlflow.pyfunc

from pipeline import config

ENTRY = Path(__file__).with_name("serve_entry.py")


def _refuse(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(value, row: int, cfg: config.Curate):
    """A request cell -> RGB image, or an MlflowException (HTTP 400) naming the row and the problem."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.checks import own_pixel_limit

    if not isinstance(value, str) or not value.strip():
        raise _refuse(f"row {row}: no image (column 'image' must hold a base64-encoded PNG or JPEG)")
    limit = 4 * cfg.max_pixels + (1 << 20)  # no image file of allowed size is larger than its raw RGBA pixels
    if len(value) * 3 // 4 > limit:
        raise _refuse(f"row {row}: the image is about {len(value) * 3 // 4} bytes, more than the limit of {limit}")
    try:
        payload = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(f"row {row}: column 'image' is not valid base64") from None
    try:
        with own_pixel_limit(), Image.open(io.BytesIO(payload)) as img:
            w, h = img.size
            if w * h > cfg.max_pixels or max(w, h) > cfg.max_side:
                raise _refuse(f"row {row}: the image is {w}x{h} pixels, larger than the limit "
                              f"(curate.max_pixels {cfg.max_pixels}, curate.max_side {cfg.max_side})")
            if min(w, h) < cfg.min_side:
                raise _refuse(f"row {row}: the image is {w}x{h} pixels, smaller than curate.min_side {cfg.min_side}")
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Warning) as e:
        raise _refuse(f"row {row}: the image does not decode ({type(e).__name__}: {e})") from None


class AdapterModel(mlflow.pyfunc.PythonModel):
    """image (+ prompt) -> answer and parsed label, with the adapter on its base."""

    def load_context(self, context):
        from pipeline import scoring

        art = context.artifacts
        raw = json.loads(Path(art["params"]).read_text())
        if "base" in art:  # the built-in base travels with the model: paths.models is the folder holding it
            raw["paths"]["models"] = str(Path(art["base"]).parent)
        self.params = config.build(config.Params, raw)
        self.evaluator = scoring.Evaluator.load(Path(art["adapter"]), self.params, who="serve")

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from pipeline import chat

        if "image" not in getattr(model_input, "columns", ()):
            raise _refuse("the request has no column 'image' (a base64-encoded PNG or JPEG per row)")
        d = self.params.data
        rows = model_input.to_dict(orient="records")
        images = [decode_image(r.get("image"), i, self.params.curate) for i, r in enumerate(rows)]
        records = []
        for i, r in enumerate(rows):
            prompt = r.get("prompt")
            prompt = prompt if isinstance(prompt, str) and prompt.strip() else d.prompt
            records.append({"id": f"request-{i}", "messages": chat.messages("", prompt, d.system_prompt)})
        answers = self.evaluator.generate(records, images) if records else []
        labels = [chat.parse_label(a, self.evaluator.label_pattern, self.evaluator.labels) for a in answers]
        return pd.DataFrame({"answer": answers, "label": labels})


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image"), ColSpec("string", "prompt", required=False)]),
                          outputs=Schema([ColSpec("string", "answer"), ColSpec("string", "label", required=False)]))


def requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "torchvision", "transformers", "peft", "accelerate", "safetensors", "pillow", "numpy",
                "pandas", "pyyaml", "mlflow", "bitsandbytes"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return out


def save(path: Path, adapter: Path, params: config.Params) -> Path:
    """Write the pyfunc model for `adapter` (trained under `params`) to `path`."""
    import dataclasses

    from pipeline import model as modelmod

    import shutil
    import tempfile

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)  # real copies: MLflow refuses artifacts reached through symbolic links
        params_file = stage / "serve_params.json"
        params_file.write_text(json.dumps(dataclasses.asdict(params), indent=1))
        shutil.copytree(Path(adapter).resolve(), stage / "adapter")
        artifacts = {"adapter": str(stage / "adapter"), "params": str(params_file)}
        if params.model.base == modelmod.BUILTIN:
            shutil.copytree(Path(modelmod.base_source(params)).resolve(), stage / "base")
            artifacts["base"] = str(stage / "base")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(str(path), python_model=str(ENTRY), artifacts=artifacts,
                                     code_paths=[str(Path(__file__).parent)], signature=signature(),
                                     pip_requirements=requirements())
    return path

