"""Config: the committed params load; mistakes fail loudly, naming the key."""
import dataclasses

import pytest

from pipeline import config
from pipeline.errors import InputError

from conftest import ROOT


def test_committed_params_load_and_are_frozen(params):
    assert params.data.labels == ("benign", "suspicious", "melanoma")
    assert params.split.fractions == {"train": 0.6, "val": 0.15, "test": 0.25}
    assert isinstance(params.curate.mismatch.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.split.seed = 3


def test_unknown_key_names_the_key(tmp_path):
    (tmp_path / "p.yaml").write_text("split:\n  seeed: 3\n")
    with pytest.raises(InputError, match=r"split\.seeed"):
        config.load(tmp_path / "p.yaml")


def test_unknown_nested_key_names_the_full_path(tmp_path):
    (tmp_path / "p.yaml").write_text("curate:\n  mismatch:\n    treshold: 1\n")
    with pytest.raises(InputError, match=r"curate\.mismatch\.treshold"):
        config.load(tmp_path / "p.yaml")


def test_wrong_type_names_the_key(tmp_path):
    (tmp_path / "p.yaml").write_text("split:\n  seed: three\n")
    with pytest.raises(InputError, match=r"split\.seed must be int"):
        config.load(tmp_path / "p.yaml")


def test_literal_choices_are_enforced(tmp_path):
    (tmp_path / "p.yaml").write_text("curate:\n  mismatch:\n    score: euclid\n")
    with pytest.raises(InputError, match="one of"):
        config.load(tmp_path / "p.yaml")


def test_set_overrides_are_typed_and_validated():
    p = config.load(ROOT / "params.yaml", ["split.seed=7", "curate.mismatch.lr=1e-3", "data.labels=[a, b]"])
    assert p.split.seed == 7 and p.curate.mismatch.lr == 1e-3 and p.data.labels == ("a", "b")
    with pytest.raises(InputError, match="split.nope"):
        config.load(ROOT / "params.yaml", ["split.nope=1"])
    with pytest.raises(InputError, match="section.key=value"):
        config.load(ROOT / "params.yaml", ["split.seed"])


def test_flatten_gives_dotted_names(params):
    flat = config.flatten(params)
    assert flat["curate.mismatch.threshold"] == params.curate.mismatch.threshold
    assert flat["paths.raw"] == "data/raw"
