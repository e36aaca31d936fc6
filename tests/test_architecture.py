"""The import graph: stage modules sit on library modules only, and every DVC stage lists every
`pipeline` module its command imports (directly or not), so that editing one re-runs the stage."""
import ast

import pytest
import yaml

from conftest import ROOT

PKG = ROOT / "pipeline"
STAGES = ("synth", "curate", "split", "base", "train", "evaluate", "promote", "monitor", "ingest", "publish", "export")


def pipeline_imports(module: str) -> set[str]:
    """The `pipeline` modules that `module` imports anywhere in its file (function-level imports too)."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            if node.module == "pipeline":
                found |= {a.name for a in node.names if (PKG / f"{a.name}.py").is_file()}
            else:
                found.add(node.module.split(".")[1])
    return found - {module}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += sorted(pipeline_imports(m))
    return seen


def test_the_graph_reads_the_modules_it_should():
    """The walker itself: it sees module-level, `from pipeline import x` and function-level imports."""
    assert {"config", "data", "model", "distributed", "losses"} <= pipeline_imports("train")
    assert "scoring" in pipeline_imports("monitor")  # imported inside a function
    assert "curate" not in closure("split")


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_no_other_stage(stage):
    others = pipeline_imports(stage) & set(STAGES)
    assert not others, f"pipeline/{stage}.py imports the stage(s) {sorted(others)}: move the shared piece down"


def test_library_modules_import_no_stage():
    library = [p.stem for p in PKG.glob("*.py") if p.stem not in STAGES and not p.stem.startswith("__")]
    assert {"model", "data", "tracking", "checks", "scoring"} <= set(library)
    for module in library:
        assert not pipeline_imports(module) & set(STAGES), f"library module {module} imports a stage"


def test_every_dvc_stage_depends_on_every_module_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        deps = {d for d in stage.get("deps", []) if isinstance(d, str)}
        needed = {f"pipeline/{m}.py" for m in closure(name)}
        missing = sorted(needed - deps)
        assert not missing, f"dvc.yaml stage {name!r} misses deps {missing}"
        stale = sorted(d for d in deps if d.startswith("pipeline/") and d not in needed)
        assert not stale, f"dvc.yaml stage {name!r} lists modules it does not import: {stale}"


def test_design_references_name_sections_that_exist():
    """Docstrings and the README cite docs/design.md by section; every cited section is there."""
    import re

    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md").read_text(), re.M))
    cited = {}
    for path in [*PKG.glob("*.py"), *(ROOT / "dags").glob("*.py"), ROOT / "README.md", ROOT / "params.yaml"]:
        for section in re.findall(r"docs/design\.md §(\d+(?:\.\d+)?)", path.read_text()):
            cited.setdefault(section.rstrip("."), path.name)
    assert cited, "nothing cites docs/design.md"
    missing = {s: f for s, f in cited.items() if s not in headings}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"
