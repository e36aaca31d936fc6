"""docker/: the compose file against the Compose specification's JSON schema (no Docker engine here),
every variable it reads defined in .env.example, no credential in it, the README's scale-out section
listing its services, and every container command one that docker/services.sh (the local cluster) runs."""
import re

import jsonschema
import pytest
import yaml

from conftest import BIN, ROOT

SCHEMA = BIN.parent / "share" / "compose-spec.json"  # fetched by `make setup` (scripts/compose_schema.py)
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _env_example() -> dict:
    env = {}
    for line in (ROOT / "docker/.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k.strip()] = v.strip()
    return env


def interpolate(text: str, env: dict) -> str:
    """Compose's variable substitution: ${V}, ${V:-default}, ${V-default}, ${V:?error}, $$."""
    def sub(m):
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and not value:
            return arg
        return value or ""
    return VAR.sub(sub, text.replace("$$", "\x00")).replace("\x00", "$")


def _compose(env: dict) -> dict:
    return yaml.safe_load(interpolate((ROOT / "docker/compose.yaml").read_text(), env))


def test_compose_file_passes_the_compose_spec_schema():
    schema = __import__("json").loads(SCHEMA.read_text())
    compose = _compose(_env_example())
    jsonschema.validate(compose, schema)
    # the check can fail: a misspelt key is refused
    broken = {**compose, "services": {**compose["services"], "redis": {**compose["services"]["redis"], "comand": []}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_every_variable_is_in_env_example_and_secrets_are_required():
    text = (ROOT / "docker/compose.yaml").read_text()
    env = _env_example()
    used = {m.group(1): m.group(2) for m in VAR.finditer(text)}
    missing = [v for v, op in used.items() if v not in env and op not in (":-", "-")]
    assert not missing, f"variables the compose file reads but .env.example lacks: {missing}"
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "AIRFLOW_ADMIN_PASSWORD",
                   "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET"):
        with pytest.raises(KeyError, match=secret):
            _compose({k: v for k, v in env.items() if k != secret})
    assert "change-me" not in text and not re.search(r"(?i)password\s*[:=]\s*[\"']?\w", text.replace("PASSWORD:", "")
                                                     .replace("${", ""))


def test_services_match_the_readme_and_the_local_cluster():
    compose = _compose(_env_example())
    services = set(compose["services"])
    assert {"postgres", "redis", "mlflow", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker-cpu", "airflow-worker-gpu"} <= services
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Scale out"):]
    section = section[: section.find("\n## ", 5)]
    listed = set(re.findall(r"^\| `([\w-]+)` \|", section, re.M))
    assert listed == services, f"README scale-out table {sorted(listed)} != compose services {sorted(services)}"
    # every pipeline container runs a docker/services.sh command, the ones scripts/cluster.sh starts
    script = (ROOT / "docker/services.sh").read_text()
    known = set(re.findall(r"^  ([\w|-]+)\)", script, re.M))
    known = {k for group in known for k in group.split("|")}
    for name, svc in compose["services"].items():
        if "command" in svc and svc.get("image", "").startswith("multimodal-pipeline"):
            assert svc["command"][0] in known, f"{name}: {svc['command']} is not a services.sh command"
    cluster = (ROOT / "scripts/cluster.sh").read_text()
    assert all(s in cluster for s in ("mlflow", "api-server", "scheduler", "dag-processor", "triggerer", "worker"))
    gpu = compose["services"]["airflow-worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["AIRFLOW_WORKER_QUEUES"] == "training"
    assert compose["services"]["airflow-worker-cpu"]["environment"]["AIRFLOW_WORKER_QUEUES"] == "default"


def test_dockerfiles_copy_what_exists_and_run_the_services_script():
    for name in ("Dockerfile", "Dockerfile.gpu"):
        lines = [l.strip() for l in (ROOT / "docker" / name).read_text().splitlines() if l.strip() and not l.startswith("#")]
        assert lines[0].startswith("FROM python:3.11"), name
        for line in lines:
            if line.startswith("COPY"):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
        assert any("-c constraints.txt" in l for l in lines), f"{name}: installs without the pinned constraints"
        assert 'ENTRYPOINT ["bash", "/opt/pipeline/docker/services.sh"]' in lines
    compose = _compose(_env_example())
    builds = {s["build"]["dockerfile"] for s in compose["services"].values() if "build" in s}
    assert builds == {"docker/Dockerfile", "docker/Dockerfile.gpu"}
