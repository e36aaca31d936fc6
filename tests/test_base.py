"""base: the built-in base reads generic scenes and the training split's captions only: the benchmark's
generator settings and the validation and test captions do not change a single weight."""
import dataclasses

import pytest

from pipeline import base, config, data as dataio, model as modelmod

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


def test_base_knows_nothing_of_any_benchmark():
    """The base's module never names the generator, and its palette and words are its own."""
    import re
    from pathlib import Path

    import numpy as np

    from pipeline import synth

    source = Path(base.__file__).read_text()
    assert not re.search(r"synth", source, flags=re.I)
    assert not set(base.PALETTE.values()) & set(synth.COLOURS.values())  # no colour value shared
    rng = np.random.default_rng(0)
    captions = [base.draw_scene(rng, 32)[1] for _ in range(300)]
    text = " ".join(captions)
    for word in ("dotted", "striped", "mottled", "speckled", "blurred", "sharp", "irregular blob", "symmetric blob",
                 "marks scattered"):
        assert word in text, word
    for vague in synth.VAGUE_CAPTIONS:  # nothing of the lesion generator's text
        assert vague not in text
    assert not {"melanoma", "lesion", "dermoscopy", "benign"} & set(text.lower().replace(".", " ").split())


def test_scene_caption_follows_the_plan_not_the_image_size():
    import numpy as np

    a = [base.draw_scene(np.random.default_rng(3), size)[1] for size in (8, 96)]
    assert a[0] == a[1]
    img, caption = base.draw_scene(np.random.default_rng(3), 96)
    assert img.size == (96, 96) and caption.endswith(".")
    # the caption says what the pixels show: a scene with a "large" thing covers more of the image than
    # one with only small things (a coarse check of the drawing, over many scenes)
    rng = np.random.default_rng(5)
    cover = {"large": [], "small": []}
    for _ in range(1500):
        plan = base.plan_scene(rng)
        if len(plan[2]) == 1 and plan[2][0].shape in ("circle", "square", "blob") and not plan[3]:
            g = np.asarray(base.render_scene(np.random.default_rng(0), plan, 64), float)
            ground = np.median(g.reshape(-1, 3), 0)
            frac = float((np.abs(g - ground).sum(-1) > 60).mean())
            if plan[2][0].size in cover:
                cover[plan[2][0].size].append(frac)
    assert cover["large"] and cover["small"]
    assert np.mean(cover["large"]) > 2 * np.mean(cover["small"])


def test_lines_are_strokes_their_captions_say_thin_or_thick_and_the_default_scenes_hold_none():
    import numpy as np

    from pipeline.errors import InputError

    rng = np.random.default_rng(1)
    assert not any(t.shape in base.LINES for _ in range(200) for t in base.plan_scene(rng)[2])  # default: shapes only
    rng = np.random.default_rng(2)
    area = {True: [], False: []}
    seen = set()
    for _ in range(400):
        plan = base.plan_scene(rng, base.LINES)
        t = plan[2][0]
        assert t.texture == "plain" and not t.blurred
        seen.add(t.shape)
        caption = base.describe(*plan)
        assert f"a {t.size} {'thick' if t.thick else 'thin'} {t.colour} {t.shape} at the {t.place}" in caption
        mask = np.asarray(base._shape_mask(np.random.default_rng(0), t, 96)) > 127
        disc = base._shape_mask(np.random.default_rng(0), base.Thing("circle", t.colour, t.size, t.place, "plain",
                                                                     False, True), 96)
        assert 0 < mask.sum() < 0.5 * (np.asarray(disc) > 127).sum()  # a stroke, not a filled shape
        area[t.thick].append(mask.sum())
    assert seen == set(base.LINES)
    assert config.Base().shapes == base.SHAPES  # the params' default is the eight filled shapes
    assert np.mean(area[True]) > 1.8 * np.mean(area[False])  # thick lines are drawn thicker
    with pytest.raises(InputError, match="base.shapes: unknown \\['hexagon'\\]"):
        base.check_shapes(("circle", "hexagon"))


@pytest.mark.parametrize("vision_lr", [0.0, 1e-3, 2e-3])
def test_vision_lr_moves_the_tower_at_its_own_rate(params, vision_lr):
    """`base.vision_lr` is the vision tower's own rate: 0 leaves every tower weight at its initialisation
    while the projector and the language model learn; a positive rate moves the tower too."""
    import torch

    cfg = dataclasses.replace(params.base, steps=3, batch_size=4, lr=2e-3, vision_lr=vision_lr)
    torch.manual_seed(0)
    model, processor = modelmod.build_builtin(params.model, ["a red circle on a grey ground."] * 20, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = base.tower_groups(model, cfg)
    assert [g["lr"] for g in groups] == ([cfg.lr, vision_lr] if vision_lr not in (0, cfg.lr) else [cfg.lr])
    assert sum(len(g["params"]) for g in groups) == len(before) - (len([n for n in before if n.startswith(base.TOWER)])
                                                                    if vision_lr == 0 else 0)
    samples = base.generic_samples(8, 0, params.model.image_size, params.data.system_prompt)
    base.pretrain(model, processor, samples, cfg)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    tower = {n for n in before if n.startswith(base.TOWER)}
    assert tower and moved - tower  # the tower exists, and the projector / LM learned
    assert any("multi_modal_projector" in n for n in moved)
    assert (moved & tower == set()) == (vision_lr == 0)
