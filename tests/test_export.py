"""export: the adapter merged into its base is a plain transformers model (no PEFT) whose greedy answers
equal the adapter's; from the registry it is logged and tagged on the version; a missing alias is exit 2."""
import json
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from pipeline import export
from pipeline.errors import InputError

from conftest import ROOT, promoted_project, trained_project


def _encode(processor, records):
    from pipeline.collate import open_image

    prompts = [processor.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"], tokenize=False,
                                             add_generation_prompt=True) for r in records]
    return processor(text=prompts, images=[[open_image(r["image"])] for r in records], return_tensors="pt",
                     padding=True, add_special_tokens=False)


def ev_base(p, enc):
    """The base model alone on the same inputs."""
    from pipeline import model as modelmod

    base, _ = modelmod.load(modelmod.base_source(p), quantize=False, keep_vision_16bit=True, dtype=torch.float32,
                            device=torch.device("cpu"))
    return base.eval()(**enc).logits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_model_answers_as_the_adapter_does(params, tmp_path, base_dir, records, method):
    import dataclasses

    from pipeline import model as modelmod

    p = trained_project(params, tmp_path, base_dir, records,
                        peft=dataclasses.replace(params.train.peft, method=method))
    adapter = tmp_path / "models" / "adapter"
    info = export.main(p, adapter=str(adapter), out=str(tmp_path / "merged"))
    assert info["method"] == method and info["dtype"] == "float32"
    folder = tmp_path / "merged"
    assert not list(folder.glob("adapter_*"))  # a plain model folder: no PEFT files
    merged = Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    sample = (records * 2)[:20]
    # the adapter on its base (QLoRA: on the unquantized base it was merged into), as PEFT runs it
    m = modelmod.load_adapter(adapter, p, full_precision=True)
    assert m.meta["method"] == method
    enc = _encode(processor, sample)
    with torch.no_grad():
        a = m.model(**enc).logits
        b = merged(**enc).logits
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        assert not torch.allclose(a, ev_base(p, enc), atol=1e-3)  # and the fine-tune did change the model
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
        want, got = m.model.generate(**enc, **kw), merged.generate(**enc, **kw)
    assert torch.equal(want, got)  # greedy answers equal, token for token
    assert info["parameters"] == sum(q.numel() for q in merged.parameters())


@pytest.mark.slow
def test_export_from_the_registry_tags_the_version(params, tmp_path, base_dir, records, monkeypatch):
    p, uri, v = promoted_project(params, tmp_path, base_dir, records, monkeypatch)
    out = export.main(p)  # default: the champion
    assert out["version"] == v and (tmp_path / "models" / "export" / f"{p.mlflow.registered_model}-v{v}" / "config.json").is_file()
    tags = MlflowClient(uri).get_model_version(p.mlflow.registered_model, v).tags
    assert tags["export_uri"] == out["export_uri"] and tags["export_run_id"]
    with pytest.raises(InputError, match="has no version 99"):
        export.main(p, version="99")
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    r = subprocess.run([sys.executable, "-m", "pipeline", "export", "--alias", "nobody", "--params",
                        str(ROOT / "params.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "no alias 'nobody'" in r.stderr
    json.loads(json.dumps(out))  # the summary is plain JSON
