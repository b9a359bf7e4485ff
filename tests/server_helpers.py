"""A live PaliGemma server for tests: uvicorn in a background thread on 127.0.0.1, a free port,
or `paligemma serve` in a child process."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from PIL import Image


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_message(prompt: str, data_uri: str) -> list[dict]:
    """An OpenAI `messages` list: one user message with an image and a prompt."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri}},
                                         {"type": "text", "text": prompt}]}]


@contextmanager
def running_server(app, timeout: float = 20.0):
    """Serve `app` on 127.0.0.1 (free port) in a thread; yields the base URL ("http://127.0.0.1:PORT")."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


@contextmanager
def serve_process(model_dir, *options: str, timeout: float = 120.0):
    """Run `paligemma serve --model model_dir *options` on 127.0.0.1 (free port) in a child process;
    yields (base URL, the process) once /health answers."""
    import httpx

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "paligemma", "serve", "--model", str(model_dir), "--port", str(port), *options]
    process = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        process.wait(20)


def force_tokens(monkeypatch, model, tokens: list[int]) -> list:
    """Make `model` generate exactly `tokens` (every row), whatever its weights; returns the call log.

    Clear the returned list to replay the script for the next request.
    """
    calls = []

    def scripted(original):
        def step(*args, **kwargs):
            logits = original(*args, **kwargs)
            logits[:, tokens[min(len(calls), len(tokens) - 1)]] = 1e4
            calls.append(1)
            return logits
        return step

    monkeypatch.setattr(model, "prefill", scripted(model.prefill))
    monkeypatch.setattr(model, "decode_step", scripted(model.decode_step))
    return calls


def detect_script(tokenizer, locs=(100, 200, 500, 900), label=" circle") -> list[int]:
    """Token ids of a one-object detect answer "<loc..>x4 label" followed by <eos>."""
    return [tokenizer.loc_id(v) for v in locs] + tokenizer.encode(label) + [tokenizer.eos_id]
