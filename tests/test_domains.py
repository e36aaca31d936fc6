"""Another domain by params alone: the parts benchmark (examples/parts) runs end to end through the
command line with its params file, and a params file that leaves a default of another domain in force
fails at the start of the stage that reads it (exit 2, naming the key and what the data holds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config, data as dataio, scoring
from pipeline.errors import InputError

from conftest import tiny_sizes

ROOT = Path(__file__).resolve().parents[1]
PARTS = ROOT / "examples" / "parts"
LESION_WORDS = ("melanoma", "lesion", "fitzpatrick", "dermo", "benign", "suspicious", "skin")


def _env(tmp: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "OMP_NUM_THREADS": "2"}


def _cli(stage: str, cwd: Path, params: Path, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", stage, "--params", str(params), *[f"--set={s}" for s in sets]],
                          cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=900)


def _tiny_parts_params(tmp: Path) -> Path:
    """examples/parts/params.yaml, shrunk like the lesions' tiny project (sizes only: no domain key)."""
    p = tiny_sizes(yaml.safe_load((PARTS / "params.yaml").read_text()))
    p["evaluate"].update(max_new_tokens=8)
    p["evaluate"]["bias"].update(min_group_size=1)
    out = tmp / "params.yaml"
    out.write_text(yaml.safe_dump(p, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def parts_raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parts")
    subprocess.run([sys.executable, str(PARTS / "generate.py"), "--out", str(root / "work/parts/raw"), "--n", "90",
                    "--size", "64", "--seed", "1"], check=True, capture_output=True)
    return root


def test_parts_generator_differs_from_the_lesions(parts_raw):
    rows = dataio.read_manifest(parts_raw / "work/parts/raw/manifest.csv")
    labels = {r["label"] for r in rows}
    assert labels == {"ok", "scratch", "dent", "crack", "corrosion"}  # five labels, not three
    text = " ".join(r["caption"] for r in rows).lower()
    assert not any(w in text for w in LESION_WORDS)
    assert "material" in rows[0] and "fitzpatrick" not in rows[0]
    p = config.load(PARTS / "params.yaml")
    assert set(p.data.labels) == labels and p.data.subgroups == ("material",)
    blob = (PARTS / "params.yaml").read_text().lower()
    assert not any(w in blob for w in LESION_WORDS)


@pytest.mark.slow
def test_parts_run_end_to_end_by_params_alone(parts_raw):
    """curate -> split -> base -> train -> evaluate on the parts with examples/parts/params.yaml (tiny sizes)."""
    params = _tiny_parts_params(parts_raw)
    for stage in ("curate", "split", "base", "train", "evaluate"):
        r = _cli(stage, parts_raw, params)
        assert r.returncode in ((0, 1) if stage == "evaluate" else (0,)), f"{stage}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    work = parts_raw / "work/parts"
    report = json.loads((work / "curated/report.json").read_text())
    assert report["quarantined"] > 0 and report["accepted"] > 60  # its own faults found, the rest kept
    m = json.loads((work / "reports/metrics.json").read_text())
    assert set(m["f1_per_class"]) == {"ok", "scratch", "dent", "crack", "corrosion"}
    assert m["bias"]["subgroup"] == "material"
    assert set(m["bias"]["groups"]) <= {"steel", "aluminium", "brass"}
    assert "max_gap_recall_crack" in m["bias"] and "max_recall_gap" in m["gates"]
    answers = " ".join(r["answer"] for r in dataio.read_jsonl(work / "reports/eval/predictions.jsonl")).lower()
    vocab = (work / "models/base/tokenizer.json").read_text().lower()
    assert "verdict" in vocab and "melanoma" not in vocab and "dermoscop" not in vocab
    assert not any(w in answers for w in ("melanoma", "lesion", "clinical impression"))


def test_lesion_defaults_on_parts_data_fail_at_curate_naming_the_key(parts_raw, tmp_path):
    """The lesions' params.yaml pointed at the parts data: curate exits 2 before writing anything."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["paths"].update(raw=str(parts_raw / "work/parts/raw"), curated=str(tmp_path / "curated"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    r = _cli("curate", tmp_path, tmp_path / "params.yaml")
    assert r.returncode == 2
    assert "data.subgroups" in r.stderr and "fitzpatrick" in r.stderr and "material" in r.stderr
    assert not (tmp_path / "curated").exists()
    r = _cli("curate", tmp_path, tmp_path / "params.yaml", "data.subgroups=[material]")
    assert r.returncode == 2 and "data.labels" in r.stderr and "corrosion" in r.stderr
    r = _cli("curate", tmp_path, tmp_path / "params.yaml", "data.subgroups=[material]",
             "data.labels=[ok, scratch, dent, crack, corrosion]", "data.positive_label=crack")
    assert r.returncode == 2 and "data.label_pattern" in r.stderr and "Verdict" in r.stderr
    assert not (tmp_path / "curated").exists()


def _split_with(tmp: Path, values: list[str], caption: str) -> Path:
    split = tmp / "split"
    split.mkdir()
    for name in ("train", "val", "test"):
        dataio.write_jsonl(split / f"{name}.jsonl", [
            {"id": f"{name}{i}", "label": "ok", "subgroups": {"material": v},
             "messages": [{"role": "assistant", "content": [{"type": "text", "text": caption}]}]}
            for i, v in enumerate(values)])
    return split


def test_evaluate_refuses_bias_groups_and_attributes_the_data_never_holds(tmp_path):
    split = _split_with(tmp_path, ["steel", "brass"], "Surface uniform, no marks. Verdict: ok")
    base = [f"paths.split={split}"]
    p = config.load(PARTS / "params.yaml", base + ["evaluate.attributes=[no marks]"])
    scoring.load_sets(p)  # the parts' own settings pass
    bad = config.load(PARTS / "params.yaml", base + ["evaluate.bias.groups={I: I-II, II: I-II}",
                                                      "evaluate.attributes=[no marks]"])
    with pytest.raises(InputError, match=r"evaluate.bias.groups: none of the values \['I', 'II'\] of subgroup "
                                         r"'material'.*\['brass', 'steel'\]"):
        scoring.load_sets(bad)
    bad = config.load(PARTS / "params.yaml", base + ["evaluate.attributes=[pigment network, blue-grey]"])
    with pytest.raises(InputError, match=r"evaluate.attributes: none of \['pigment network', 'blue-grey'\] occurs"):
        scoring.load_sets(bad)
    # a value or a term that this dataset happens not to hold is a warning, not an error
    partial = config.load(PARTS / "params.yaml", base + ["evaluate.bias.groups={steel: metal, bronze: metal}",
                                                         "evaluate.attributes=[no marks, pitting]"])
    with pytest.warns(UserWarning, match="bronze"):
        scoring.load_sets(partial)
