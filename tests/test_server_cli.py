"""`paligemma serve`: option checks, the missing demo model, and a real server process on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from server_helpers import image_message, png_data_uri  # noqa: E402

from paligemma.cli import main  # noqa: E402
from paligemma.server import cli as server_cli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--port", "70000"], ["--max-body-mb", "0"],
                                  ["--image-cache-size", "-1"]])
def test_bad_options_are_user_errors(argv, capsys):
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_missing_demo_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(server_cli, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    assert main(["serve"]) == 2
    assert "demo model is not installed" in capsys.readouterr().err


def test_serve_runs_a_server_process(tiny_checkpoint_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "paligemma", "serve", "--model", str(tiny_checkpoint_dir), "--port", str(port),
               "--model-name", "tiny", "--api-key", "k", "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "tiny", "max_tokens": 3, "messages": image_message("caption en",
                                                                             png_data_uri(Image.new("RGB", (30, 20))))}
        response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "tiny" and response.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()
        process.wait(20)
