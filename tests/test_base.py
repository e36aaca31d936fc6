"""base: the built-in base reads generic scenes and the training split's captions only: the benchmark's
generator settings and the validation and test captions do not change a single weight."""
import dataclasses

import pytest

from pipeline import base, data as dataio, model as modelmod

from conftest import tiny


def _caption(record: dict, text: str) -> dict:
    msgs = [m if m["role"] != "assistant" else {**m, "content": [{"type": "text", "text": text}]}
            for m in record["messages"]]
    return {**record, "messages": msgs}


def _base(params, root, records, val_test_caption: str, **synth):
    p = tiny(params, root)
    p = dataclasses.replace(p, synth=dataclasses.replace(p.synth, **synth))
    split = root / "split"
    split.mkdir(parents=True)
    dataio.write_jsonl(split / "train.jsonl", records[:24])
    for name, rows in (("val", records[24:32]), ("test", records[32:])):
        dataio.write_jsonl(split / f"{name}.jsonl", [_caption(r, val_test_caption) for r in rows])
    summary = base.main(p)
    return summary, root / "models" / "base"


@pytest.mark.slow
def test_base_weights_depend_on_neither_the_generator_nor_val_and_test(params, tmp_path, records):
    a, folder_a = _base(params, tmp_path / "a", records, "Zebra stripes, a quasar and a violin.", n=10, seed=1)
    b, folder_b = _base(params, tmp_path / "b", records, "Kettle, harbour, tram: nothing alike.", n=999, seed=7,
                        class_mix={"benign": 1.0}, attributes="uniform")
    assert a["domain_captions"] == b["domain_captions"] > 0  # it did read the training captions
    assert a["weights_sha256"] == b["weights_sha256"] == modelmod.weights_sha256(str(folder_a))
    vocab = (folder_a / "tokenizer.json").read_text()
    assert "Zebra" not in vocab and "quasar" not in vocab  # no val/test word in the tokenizer
    assert (folder_a / "tokenizer.json").read_bytes() == (folder_b / "tokenizer.json").read_bytes()
