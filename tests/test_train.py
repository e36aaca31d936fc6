"""train: the loop learns, touches only what it should, resumes after a kill, logs every term."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import config, model as modelmod, train
from pipeline.errors import CheckFailed, InputError

from conftest import ROOT, kill_after_checkpoint, with_base


def _lr(p, vision, text):
    return dataclasses.replace(p, train=dataclasses.replace(p.train, lr=config.Lr(vision=vision, text=text)))


def test_short_run_learns_and_touches_only_trainable_parameters(params, tmp_path, base_dir, records):
    p = _lr(with_base(params, tmp_path, base_dir, epochs=3, max_steps=0), 3e-3, 3e-3)
    state = train.setup(p, records[:32], records[32:])
    before = {n: t.detach().clone() for n, t in state.model.named_parameters()}
    fixed = records[:8]
    start = train.validation_loss(state, fixed, 8)
    for epoch in range(3):
        batches = train.micro_batches(state, epoch, 0, 4)
        for b in batches:
            row = train.train_step(state, [b], p.train)
            assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    end = train.validation_loss(state, fixed, 8)
    for term in ("ce", "contrastive", "mse", "total"):
        assert end[f"val/{term}"] < start[f"val/{term}"], (term, start, end)
    changed = {n for n, t in state.model.named_parameters() if not torch.equal(t, before[n])}
    trainable = {n for n, t in state.model.named_parameters() if t.requires_grad}
    assert changed and changed <= trainable  # frozen base parameters unchanged
    assert all("lora_" in n for n in trainable)
    assert any("vision_tower" in n for n in changed) and any("language_model" in n for n in changed)


def test_every_parameter_is_in_exactly_one_group_with_its_learning_rate(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir)
    state = train.setup(p, records[:8], [])
    groups = {g["name"]: g for g in state.optimizer.param_groups}
    lr = params.train.lr
    assert groups["vision"]["initial_lr"] == lr.vision and groups["text"]["initial_lr"] == lr.text
    assert lr.vision != lr.text
    ids = [id(q) for g in groups.values() for q in g["params"]]
    assert len(ids) == len(set(ids))
    trainable = [q for q in state.model.parameters() if q.requires_grad] + list(state.heads.parameters())
    assert {id(q) for q in trainable} == set(ids)
    names = {id(q): n for n, q in state.model.named_parameters()}
    for q in groups["vision"]["params"]:
        assert id(q) not in names or "vision_tower" in names[id(q)] or "multi_modal_projector" in names[id(q)]
    for q in groups["text"]["params"]:
        assert id(q) not in names or "language_model" in names[id(q)]
    assert all(id(q) in ids for q in state.heads.image.parameters())


def test_qlora_quantises_the_language_model_and_keeps_vision_16bit(params, tmp_path, base_dir, records):
    import bitsandbytes as bnb

    p = with_base(params, tmp_path, base_dir)
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, peft=dataclasses.replace(p.train.peft, method="qlora")))
    state = train.setup(p, records[:8], [])
    base = modelmod.backbone(state.model)
    lm = [m for n, m in base.model.language_model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    vis = [m for n, m in base.model.vision_tower.named_modules() if n.endswith(("q_proj", "fc1"))]
    assert lm and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lm)
    assert vis and not any(isinstance(getattr(m, "base_layer", m), bnb.nn.Linear4bit) for m in vis)
    w = lm[0].base_layer.weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # NF4 + double quantisation
    before = {n: t.detach().clone() for n, t in state.model.named_parameters() if t.requires_grad}
    row = train.train_step(state, [records[:4]], p.train)
    assert torch.isfinite(torch.tensor(row["loss/total"]))
    assert any(not torch.equal(t, before[n]) for n, t in state.model.named_parameters() if t.requires_grad)


def test_patch_embedding_is_adapted_only_when_asked_and_merges(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir)
    plain = train.setup(p, records[:8], [])
    assert not any("patch_embedding" in n for n, t in plain.model.named_parameters() if t.requires_grad)
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, peft=dataclasses.replace(p.train.peft, adapt_patch_embedding=True)))
    state = train.setup(p, records[:8], [])
    conv = {n: t.detach().clone() for n, t in state.model.named_parameters() if "patch_embedding.lora_" in n}
    assert conv and all(t.requires_grad for n, t in state.model.named_parameters() if n in conv)
    vision = {id(q) for g in state.optimizer.param_groups if g["name"] == "vision" for q in g["params"]}
    assert all(id(t) in vision for n, t in state.model.named_parameters() if n in conv)
    before = next(m for n, m in state.model.named_modules() if n.endswith("patch_embedding.base_layer")).weight.clone()
    for _ in range(2):
        train.train_step(state, [records[:4]], p.train)
    after = dict(state.model.named_parameters())
    assert any(not torch.equal(after[n], t) for n, t in conv.items())  # the LoRA of the convolution learnt
    merged = next(m for n, m in state.model.merge_and_unload().named_modules() if n.endswith("patch_embedding"))
    assert isinstance(merged, torch.nn.Conv2d) and not torch.allclose(merged.weight, before)


def _peft(p, **kw):
    return dataclasses.replace(p, train=dataclasses.replace(p.train, peft=dataclasses.replace(p.train.peft, **kw)))


def test_full_vision_trains_the_tower_in_full_saves_loads_and_merges(params, tmp_path, base_dir, records):
    p = _peft(with_base(params, tmp_path, base_dir), full_vision=True)
    state = train.setup(p, records[:8], records[8:12])
    trainable = {n for n, t in state.model.named_parameters() if t.requires_grad}
    vision = {n for n in trainable if "vision_tower" in n or "multi_modal_projector" in n}
    assert vision and all(".modules_to_save.default." in n for n in vision)  # full copies, no LoRA on vision
    assert {n for n in trainable - vision} and all("lora_" in n and "language_model" in n for n in trainable - vision)
    tower = sum(t.numel() for t in modelmod.backbone(state.model).model.vision_tower.original_module.parameters())
    assert sum(t.numel() for n, t in state.model.named_parameters() if n in vision) > tower  # every weight + projector
    in_vision_group = {id(q) for g in state.optimizer.param_groups if g["name"] == "vision" for q in g["params"]}
    assert all(id(t) in in_vision_group for n, t in state.model.named_parameters() if n in vision)
    frozen = {n: t.detach().clone() for n, t in state.model.named_parameters() if "original_module" in n}
    for _ in range(2):
        train.train_step(state, [records[:4]], p.train)
    assert all(torch.equal(t, frozen[n]) for n, t in state.model.named_parameters() if n in frozen)  # the base's own
    out = tmp_path / "adapter"
    out.mkdir()
    train.save_adapter(state, out, p)
    saved = load_file(out / "adapter_model.safetensors")
    assert any("vision_tower" in k and "patch_embedding" in k for k in saved)  # the whole tower travels
    loaded = modelmod.load_adapter(out, p)
    pv = state.collator(records[:2])["pixel_values"]
    state.model.eval()
    with torch.no_grad():
        trained = modelmod.backbone(state.model).model.get_image_features(pv, return_dict=True).pooler_output
        again = modelmod.backbone(loaded.model).model.get_image_features(pv, return_dict=True).pooler_output
        with loaded.model.disable_adapter():  # what the monitor's fixed encoder reads: the base
            base_feats = modelmod.backbone(loaded.model).model.get_image_features(pv, return_dict=True).pooler_output
        merged = loaded.model.merge_and_unload().model.get_image_features(pv, return_dict=True).pooler_output
    assert torch.allclose(trained, again, atol=1e-5) and torch.allclose(merged, trained, atol=1e-5)
    assert not torch.allclose(base_feats, trained, atol=1e-3)


def test_full_vision_on_qlora_trains_the_16bit_tower_copy(params, tmp_path, base_dir, records):
    """The nightly re-fine-tune is QLoRA (`ingest.method`): full_vision must train there too."""
    p = _peft(with_base(params, tmp_path, base_dir), full_vision=True, method="qlora")
    state = train.setup(p, records[:8], [])
    copies = {n: t.detach().clone() for n, t in state.model.named_parameters() if ".modules_to_save." in n}
    assert copies and all(t.dtype == torch.float32 for t in copies.values())
    row = train.train_step(state, [records[:4]], p.train)
    assert torch.isfinite(torch.tensor(row["loss/total"]))
    after = dict(state.model.named_parameters())
    assert any(not torch.equal(after[n], t) for n, t in copies.items())


def test_full_vision_refuses_a_4bit_tower(params, tmp_path, base_dir, records):
    p = _peft(with_base(params, tmp_path, base_dir), full_vision=True, method="qlora", keep_vision_16bit=False)
    with pytest.raises(InputError, match="full_vision needs train.peft.keep_vision_16bit"):
        train.setup(p, records[:4], [])


def test_bad_peft_settings_fail_before_any_work(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir)
    bad = dataclasses.replace(p, train=dataclasses.replace(p.train, peft=dataclasses.replace(p.train.peft, target_modules=("nope_proj",))))
    with pytest.raises(InputError, match="nope_proj"):
        train.setup(bad, records[:4], [])
    missing = dataclasses.replace(p, paths=dataclasses.replace(p.paths, models=str(tmp_path / "none")))
    with pytest.raises(InputError, match="run `python -m pipeline base`"):
        train.setup(missing, records[:4], [])


def test_non_finite_loss_stops_with_step_and_term(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir)
    state = train.setup(p, records[:8], [])
    with torch.no_grad():
        state.heads.image.weight.fill_(float("nan"))  # the image embedding goes bad, the LM does not
    with pytest.raises(CheckFailed, match=r"step 1: loss/contrastive = nan"):
        train.train_step(state, [records[:4]], p.train)


def _write_params(p, path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = dataclasses.asdict(p.paths)
    raw["train"].update(epochs=p.train.epochs, max_steps=p.train.max_steps, batch_size=p.train.batch_size,
                        checkpoint_every=p.train.checkpoint_every, warmup_steps=p.train.warmup_steps,
                        augment=dataclasses.asdict(p.train.augment), select=dataclasses.asdict(p.train.select),
                        ema=p.train.ema)
    path.write_text(yaml.safe_dump(raw))


def _prepare(params, root, base_dir, records, augment=config.Augment(), select=config.Select(), ema=0.0):
    from pipeline import data as dataio

    p = with_base(params, root, base_dir, max_steps=10, checkpoint_every=2, epochs=2)
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, augment=augment, select=select, ema=ema))
    (root / "split").mkdir()
    dataio.write_jsonl(root / "split" / "train.jsonl", records[:32])
    dataio.write_jsonl(root / "split" / "val.jsonl", records[32:36])
    _write_params(p, root / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    return env


def _train_cmd(root):
    return [sys.executable, "-m", "pipeline", "train", "--params", str(root / "params.yaml")]


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint_and_ends_the_same(params, tmp_path, base_dir, records):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        root.mkdir()
    # with every augmentation on: its random draws must come back with the checkpoint too; with the
    # best validation epoch kept (checks after epoch 0, at step 8, and at step 10): the best weights too;
    # and with the weights averaged (train.ema): the average too
    aug = config.Augment(shift=0.1, brightness=0.1, contrast=0.1, hflip=True, vflip=True)
    sel = config.Select(metric="f1_macro", every=1)
    env_a, env_b = (_prepare(params, root, base_dir, records, aug, sel, ema=0.8) for root in (a, b))
    r = subprocess.run(_train_cmd(a), cwd=a, env=env_a, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(_train_cmd(b), cwd=b, env=env_b, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = b / "models" / "checkpoints" / "last.pt"
    kill_after_checkpoint(proc, ckpt, 4, lambda: proc.send_signal(signal.SIGKILL))
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 4 <= killed_at < 10 and not (b / "models" / "adapter").exists()
    r = subprocess.run(_train_cmd(b), cwd=b, env=env_b, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    wa = load_file(a / "models" / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "models" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k  # stated tolerance: 1e-6 absolute
    sa, sb = (json.loads((r / "models" / "train_metrics.json").read_text())["selection"] for r in (a, b))
    assert [c["step"] for c in sb["checks"]] == [8, 10] and (sa["epoch"], sa["f1_macro"]) == (sb["epoch"], sb["f1_macro"])
    import csv

    rows_a = list(csv.DictReader(open(a / "models" / "train_steps.csv")))
    rows_b = list(csv.DictReader(open(b / "models" / "train_steps.csv")))
    assert len(rows_b) == 10 and [r["step"] for r in rows_b] == [str(i) for i in range(1, 11)]
    for ra, rb in zip(rows_a, rows_b):
        for k in ra:
            assert abs(float(ra[k]) - float(rb[k])) <= 1e-5 * max(1.0, abs(float(ra[k]))), (k, ra, rb)
    # the resumed run continued the same MLflow run, which holds every per-step metric
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env_b["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(params.mlflow.experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    for key in ("loss/contrastive", "loss/ce", "loss/mse", "loss/total", "lr/vision", "lr/text"):
        steps = {m.step for m in client.get_metric_history(run.info.run_id, key)}
        assert steps == set(range(1, 11)), key
    assert run.data.params["train.lr.vision"] == str(params.train.lr.vision)
    assert run.data.params["train.peft.method"] == "lora"
    arts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"preflight.json", "adapter", "train_steps.csv"} <= arts


def test_augment_shifts_flips_and_jitters_each_image_on_its_own():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 48, 48) * 2 - 1  # (B, 3, S, S) in SigLIP's [-1, 1]
    assert torch.equal(train.augment(x, config.Augment()), x)  # all off: untouched
    shifted = train.augment(x, config.Augment(shift=0.125))  # up to 6 px each way
    offsets = []
    for k in range(len(x)):  # each image is a translated copy of itself (compared away from the edges)
        hits = [(i, j) for i in range(-6, 7) for j in range(-6, 7)
                if torch.equal(shifted[k, :, 8:40, 8:40], x[k, :, 8 - i : 40 - i, 8 - j : 40 - j])]
        assert len(hits) == 1, k
        offsets.append(hits[0])
    assert len(set(offsets)) > 10  # drawn per image, not once per batch
    flipped = train.augment(x, config.Augment(vflip=True))
    same = [torch.equal(flipped[k], x[k]) for k in range(len(x))]
    mirrored = [torch.equal(flipped[k], x[k].flip(1)) for k in range(len(x))]
    assert all(a != b for a, b in zip(same, mirrored)) and 5 < sum(mirrored) < 27  # top-bottom only, about half
    jittered = train.augment(x, config.Augment(brightness=0.2, contrast=0.3), lo=-1.0, hi=1.0)
    assert jittered.min() >= -1 and jittered.max() <= 1  # kept inside the pixel range
    means = (jittered - x).mean(dim=(1, 2, 3))
    assert means.std() > 0.05  # a brightness of its own per image


def test_augment_runs_in_training_only(params, tmp_path, base_dir, records, monkeypatch):
    aug = config.Augment(shift=0.1, brightness=0.1, contrast=0.1, vflip=True)
    p = with_base(params, tmp_path, base_dir, epochs=1, max_steps=0)
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, augment=aug))
    state = train.setup(p, records[:16], records[16:24])
    seen = []
    real = train.augment
    monkeypatch.setattr(train, "augment", lambda px, cfg, lo, hi: seen.append((cfg, lo, hi)) or real(px, cfg, lo, hi))
    row = train.train_step(state, [records[:4]], p.train)
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    assert seen == [(aug, -1.0, 1.0)]  # the processor's normalisation: pixels 0..1 are -1..1
    train.validation_loss(state, records[16:24], 4)
    assert len(seen) == 1  # validation reads the images as they are


class _Payload:
    """A pickled object that runs a command when it is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_not_run(params, tmp_path, base_dir, records):
    env = _prepare(params, tmp_path, base_dir, records)
    ckpt = tmp_path / "models" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"fingerprint": "x", "step": 3, "model": {}, "payload": _Payload(marker)}, ckpt)
    r = subprocess.run(_train_cmd(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"checkpoint {ckpt}: refused" in r.stderr
    assert not marker.exists() and not (tmp_path / "models" / "adapter").exists()


def test_checkpoint_rng_states_round_trip_as_tensors():
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.normal()  # a cached Gaussian in numpy's state
    saved = train.rng_state()
    expect = (random.random(), float(np.random.normal()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    train.set_rng_state(saved)
    assert (random.random(), float(np.random.normal()), float(torch.rand(1))) == expect


@pytest.mark.slow
def test_adapter_loads_with_peft_and_switches_by_task(params, tmp_path, base_dir, records):
    from peft import PeftModel
    from transformers import Gemma3ForConditionalGeneration

    outs = {}
    for task in ("lesions", "borders"):
        root = tmp_path / task
        root.mkdir()
        p = with_base(params, root, base_dir, max_steps=2)
        p = dataclasses.replace(p, train=dataclasses.replace(p.train, peft=dataclasses.replace(p.train.peft, method="adapter", adapter_name=task)))
        train.run(p, records[:16] if task == "lesions" else records[16:32], [])
        outs[task] = root / "models" / "adapter"
        meta = json.loads((outs[task] / "pipeline_meta.json").read_text())
        assert meta["adapter_name"] == task and (outs[task] / "alignment_heads.safetensors").is_file()
    base = Gemma3ForConditionalGeneration.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, outs["lesions"] / "lesions", adapter_name="lesions")
    model.load_adapter(outs["borders"] / "borders", adapter_name="borders")
    batch = train.Collator(__import__("transformers").AutoProcessor.from_pretrained(base_dir))(records[:2])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    model.eval()
    with torch.no_grad():
        model.set_adapter("lesions")
        a = model(**inputs).logits
        model.set_adapter("borders")
        b = model(**inputs).logits
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_dora_trains(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir)
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, peft=dataclasses.replace(p.train.peft, method="dora")))
    state = train.setup(p, records[:8], [])
    assert any("lora_magnitude_vector" in n for n, _ in state.model.named_parameters())
    row = train.train_step(state, [records[:4]], p.train)
    assert torch.isfinite(torch.tensor(row["loss/total"]))


def test_a_run_capped_by_max_steps_stops_there_and_validates_once(params, tmp_path, base_dir, records, monkeypatch):
    import mlflow

    from pipeline.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    p = with_base(params, tmp_path, base_dir, epochs=50, max_steps=3)  # 24 rows, batch 4: 6 steps an epoch
    calls = []
    real = train.validation_loss
    monkeypatch.setattr(train, "validation_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    metrics = train.run(p, records[:24], records[24:32], Tracker(p))
    assert metrics["steps"] == 3
    assert len(calls) == 2  # the epoch that reached max_steps, and the final figure; not one per epoch left
    client = mlflow.MlflowClient()
    history = client.get_metric_history(metrics["mlflow_run_id"], "val/total")
    assert [m.step for m in history] == [3]


def _ema(p, decay):
    return dataclasses.replace(p, train=dataclasses.replace(p.train, ema=decay))


def test_ema_matches_torchs_averaged_model_and_is_what_validation_and_saving_use(params, tmp_path, base_dir,
                                                                               records, monkeypatch):
    """`train.ema`: the average follows torch's EMA (`get_ema_multi_avg_fn`, AveragedModel's first step a
    copy) over every trainable tensor; validation runs on it and the live weights come back after."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    p = _ema(_lr(with_base(params, tmp_path, base_dir, epochs=2, max_steps=0,
                           peft=dataclasses.replace(params.train.peft, full_vision=True)), 3e-3, 3e-3), 0.7)
    state = train.setup(p, records[:16], records[24:32])
    named = train.trainable(state)
    assert {n for n, _ in named} == set(state.ema) and any("modules_to_save" in n for n in state.ema)
    assert any(n.startswith("heads.") for n in state.ema)
    ref, avg = None, get_ema_multi_avg_fn(0.7)
    for b in train.micro_batches(state, 0, 0, 4):
        train.train_step(state, [b], p.train)
        live = [q.detach().float().clone() for _, q in named]
        if ref is None:
            ref = [t.clone() for t in live]
        else:
            avg(ref, live, torch.tensor(state.step - 1))
    assert state.step == 4
    for (n, q), r in zip(named, ref):
        assert torch.allclose(state.ema[n], r, atol=1e-7), n
    moved = [n for n, q in named if not torch.allclose(q.detach().float(), state.ema[n])]
    assert moved  # the average lags the live weights
    live = {n: q.detach().clone() for n, q in named}
    seen = {}
    real = train.validation_loss
    monkeypatch.setattr(train, "validation_loss", lambda st, *a: seen.update(
        {n: q.detach().clone() for n, q in train.trainable(st)}) or real(st, *a))
    with train.averaged(state):
        train.validation_loss(state, records[24:32], 4)
    assert all(torch.equal(seen[n], state.ema[n].to(seen[n].dtype)) for n in seen)
    assert all(torch.equal(q, live[n]) for n, q in train.trainable(state))  # the live weights are back


def test_ema_run_saves_the_average_not_the_last_step(params, tmp_path, base_dir, records, monkeypatch):
    p = _ema(_lr(with_base(params, tmp_path, base_dir, epochs=2, max_steps=0), 3e-3, 3e-3), 0.7)
    kept, real = {}, train.update_ema
    monkeypatch.setattr(train, "update_ema", lambda st, d: (real(st, d), kept.update(
        state=st, live={n: q.detach().clone() for n, q in st.model.named_parameters() if "lora_" in n})))
    train.run(p, records[:16], records[24:32])
    state = kept["state"]
    saved = load_file(tmp_path / "models" / "adapter" / "adapter_model.safetensors")
    average = {n[len("model."):].replace(".default", ""): v for n, v in state.ema.items()
               if n.startswith("model.") and "lora_" in n}
    assert saved.keys() == average.keys()
    assert all(torch.equal(saved[k], average[k].to(saved[k].dtype)) for k in saved)
    last = {n.replace(".default", ""): v for n, v in kept["live"].items()}
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # the last step's weights are not what was saved
    with pytest.raises(InputError, match="train.ema must be in"):
        train.run(_ema(p, 1.0), records[:16], records[24:32])


def _select(p, metric="f1_macro", every=1, **evaluate):
    return dataclasses.replace(p, train=dataclasses.replace(p.train, select=config.Select(metric=metric, every=every)),
                               evaluate=dataclasses.replace(p.evaluate, **evaluate))


def test_select_saves_the_best_validation_epoch_and_records_every_check(params, tmp_path, base_dir, records,
                                                                         monkeypatch):
    """Checks after epochs 1, 3 and the last (4); the saved adapter holds the chosen epoch's tensors, a tie
    keeps the earlier epoch, and the final validation loss is the chosen weights'."""
    p = _select(_lr(with_base(params, tmp_path, base_dir, epochs=5, max_steps=0), 3e-3, 3e-3), every=2)
    scores, seen = {1: 0.5, 3: 0.7, 4: 0.7}, {}

    def scripted(state, params_):
        epoch = state.step // state.steps_per_epoch - 1
        seen[epoch] = {k: v.clone() for k, v in train.adapter_tensors(state)[0].items()}
        return scores[epoch]

    monkeypatch.setattr(train, "validation_f1", scripted)
    metrics = train.run(p, records[:24], records[24:32])  # batch 4: 6 steps an epoch
    assert sorted(seen) == [1, 3, 4]
    sel = metrics["selection"]
    assert (sel["epoch"], sel["step"], sel["f1_macro"], sel["last_f1_macro"]) == (3, 24, 0.7, 0.7)
    assert [(c["epoch"], c["step"], c["f1_macro"]) for c in sel["checks"]] == [(1, 12, 0.5), (3, 24, 0.7), (4, 30, 0.7)]
    saved = load_file(tmp_path / "models" / "adapter" / "adapter_model.safetensors")
    chosen = {k.replace(".default", ""): v for k, v in seen[3].items()}
    assert saved.keys() == chosen.keys()
    assert all(torch.equal(saved[k], chosen[k]) for k in saved)
    last = {k.replace(".default", ""): v for k, v in seen[4].items()}
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # training went on after the chosen epoch
    assert json.loads((tmp_path / "models" / "train_metrics.json").read_text())["selection"] == sel


def test_select_scores_validation_as_evaluate_does(params, tmp_path, base_dir, records, monkeypatch):
    """The in-training check generates what the saved adapter generates when `evaluate` loads it, and
    scores it with scikit-learn's macro-F1."""
    from sklearn.metrics import f1_score

    from pipeline import chat, scoring

    p = _select(_lr(with_base(params, tmp_path, base_dir, epochs=2, max_steps=0), 3e-3, 3e-3), max_new_tokens=24)
    answers, real = [], scoring.Evaluator.generate
    monkeypatch.setattr(scoring.Evaluator, "generate", lambda self, *a, **k: answers.append(real(self, *a, **k)) or answers[-1])
    val = records[24:32]
    metrics = train.run(p, records[:16], val)
    sel = metrics["selection"]
    assert [c["epoch"] for c in sel["checks"]] == [0, 1] and len(answers) == 2
    ev = scoring.Evaluator.load(tmp_path / "models" / "adapter", p)
    assert real(ev, val) == answers[sel["epoch"]]
    pred = [chat.parse_label(a, p.data.label_pattern, p.data.labels) or "none" for a in answers[sel["epoch"]]]
    assert sel["f1_macro"] == pytest.approx(f1_score([r["label"] for r in val], pred, labels=list(p.data.labels),
                                                     average="macro", zero_division=0))


def test_select_refuses_bad_settings_before_any_work(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir)
    with pytest.raises(InputError, match="train.select.every must be at least 1"):
        train.run(_select(p, every=0), records[:8], records[8:12])
    with pytest.raises(InputError, match="validation split is empty"):
        train.run(_select(p), records[:8], [])
    bad = [dict(records[8], label="keloid")]
    with pytest.raises(InputError, match="keloid"):
        train.run(_select(p), records[:8], bad)
    with pytest.raises(InputError, match="select.metric must be one of"):
        config.load(ROOT / "params.yaml", ["train.select.metric=accuracy"])


@pytest.mark.parametrize("full_vision", [False, True])
def test_select_changes_which_epoch_is_kept_not_what_is_trained(params, tmp_path, base_dir, records, monkeypatch,
                                                                full_vision):
    """The checks draw nothing from the RNGs that training uses (LoRA dropout, augmentation) and leave the
    model as they found it: with the checks on, the last epoch's weights are those of a run without them."""
    aug = config.Augment(shift=0.1, brightness=0.1)
    kw = dict(epochs=3, max_steps=0, peft=dataclasses.replace(params.train.peft, full_vision=full_vision))
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
    a = _lr(with_base(params, tmp_path / "a", base_dir, **kw), 3e-3, 3e-3)
    a = dataclasses.replace(a, train=dataclasses.replace(a.train, augment=aug))
    train.run(a, records[:16], records[24:32])
    plain = load_file(tmp_path / "a" / "models" / "adapter" / "adapter_model.safetensors")
    b = _select(_lr(with_base(params, tmp_path / "b", base_dir, **kw), 3e-3, 3e-3), max_new_tokens=24)
    b = dataclasses.replace(b, train=dataclasses.replace(b.train, augment=aug))
    real = train.validation_f1

    def spy(state, params_):  # the real check runs; its score is replaced by one that keeps the last epoch
        real(state, params_)
        return float(state.step)

    monkeypatch.setattr(train, "validation_f1", spy)
    metrics = train.run(b, records[:16], records[24:32])
    assert [c["epoch"] for c in metrics["selection"]["checks"]] == [0, 1, 2] and metrics["selection"]["epoch"] == 2
    kept = load_file(tmp_path / "b" / "models" / "adapter" / "adapter_model.safetensors")
    assert plain.keys() == kept.keys()
    assert all(torch.equal(plain[k], kept[k]) for k in plain), [k for k in plain if not torch.equal(plain[k], kept[k])][:5]
    # ... and every file of the adapter folder, the processor's tokenizer (whose padding the generation sets)
    # included; the files that name the base's path name each run's own
    fa, fb = (sorted(p.name for p in (tmp_path / r / "models" / "adapter").iterdir()) for r in "ab")
    assert fa == fb
    for name in fa:
        text_a = (tmp_path / "a" / "models" / "adapter" / name).read_bytes()
        text_b = (tmp_path / "b" / "models" / "adapter" / name).read_bytes()
        assert text_a.replace(str(tmp_path / "a").encode(), str(tmp_path / "b").encode()) == text_b, name
