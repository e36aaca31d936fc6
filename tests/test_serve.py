"""Serving what is promoted: every registry version is an MLflow pyfunc model; `mlflow models serve` on
`models:/<name>@champion` answers base64 images over HTTP exactly as `evaluate` predicted, and refuses a
malformed request with HTTP 400 naming the problem while it stays up."""
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pipeline import data as dataio, tracking

from conftest import free_port, promoted_project, stop


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_the_served_champion_answers_as_evaluate_predicted(params, tmp_path, base_dir, records, monkeypatch):
    p, uri, v = promoted_project(params, tmp_path, base_dir, records, monkeypatch)
    c = tracking.client()
    version = c.get_model_version(p.mlflow.registered_model, v)
    assert version.source.endswith("/model")
    # the registered version holds the adapter byte for byte, and no pickled model (models from code)
    local = tracking.download_adapter(c, version, tmp_path / "dl")
    assert dataio.dir_sha256(local) == dataio.dir_sha256(tmp_path / "models" / "adapter")
    assert not list(local.parent.parent.glob("*.pkl"))

    predictions = dataio.read_jsonl(tmp_path / "reports" / "eval" / "predictions.jsonl")[:3]
    by_id = {r["id"]: r for r in records}
    port = free_port()
    # as from an activated environment: mlflow starts `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               f"models:/{p.mlflow.registered_model}@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    server.kill()
                    pytest.fail("the scoring server did not start:\n" + (server.stdout.read() or "")[-3000:])
                time.sleep(1)
        url = f"http://127.0.0.1:{port}/invocations"
        images = [_b64(Image.open(by_id[r["id"]]["image"]).convert("RGB")) for r in predictions]
        status, body = _post(url, {"dataframe_records": [{"image": im} for im in images]})
        assert status == 200, body
        got = body["predictions"]
        assert [g["answer"] for g in got] == [r["answer"] for r in predictions]
        assert [g["label"] for g in got] == [r["prediction"] for r in predictions]

        # malformed requests: 400 naming the problem, and the server keeps answering
        bad = [({"dataframe_records": [{"prompt": "Describe the image."}]}, "image"),
               ({"dataframe_records": [{"image": "%%% not base64 %%%"}]}, "not valid base64"),
               ({"dataframe_records": [{"image": base64.b64encode(b"plain text, not a picture").decode()}]},
                "does not decode"),
               ({"dataframe_records": [{"image": _b64(Image.new("RGB", (p.curate.max_side + 1, 40)))}]},
                "larger than the limit")]
        for request, phrase in bad:
            status, body = _post(url, request)
            assert status == 400 and phrase in body.get("message", ""), (phrase, status, body)
        status, body = _post(url, {"dataframe_records": [{"image": images[0]}]})
        assert status == 200 and body["predictions"][0]["answer"] == predictions[0]["answer"]
    finally:
        stop(server)
