"""`paligemma serve`: option checks, the missing demo model, and a real server process on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from server_helpers import image_message, png_data_uri, serve_process  # noqa: E402

from paligemma import cli_common  # noqa: E402
from paligemma.cli import main  # noqa: E402


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--port", "70000"], ["--max-body-mb", "0"],
                                  ["--image-cache-size", "-1"]])
def test_bad_options_are_user_errors(argv, capsys):
    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_missing_demo_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_common, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    assert main(["serve"]) == 2
    assert "demo model is not installed" in capsys.readouterr().err


def test_serve_runs_a_server_process(tiny_checkpoint_dir):
    options = ["--model-name", "tiny", "--api-key", "k", "--log-level", "warning"]
    with serve_process(tiny_checkpoint_dir, *options) as (url, _):
        body = {"model": "tiny", "max_tokens": 3, "messages": image_message("caption en",
                                                                             png_data_uri(Image.new("RGB", (30, 20))))}
        response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "tiny" and response.json()["usage"]["completion_tokens"] >= 1


def test_serve_decodes_masks_with_the_checkpoints_codec(tmp_path, tiny_checkpoint_dir, monkeypatch, capsys):
    import torch
    import uvicorn

    from paligemma.cli import MASK_CODEC_FILE
    from paligemma.server import app as server_app
    from paligemma.vqvae import MaskCodec, MaskCodecConfig, save_mask_codec

    model_dir = tmp_path / "with-codec"
    model_dir.mkdir()
    for file in Path(tiny_checkpoint_dir).iterdir():
        shutil.copy(file, model_dir / file.name)  # copies: the loader refuses links out of the folder
    config = MaskCodecConfig(num_codes=128, embed_dim=8, hidden=8)
    torch.manual_seed(0)
    save_mask_codec(MaskCodec(config), model_dir / MASK_CODEC_FILE)
    codecs = []
    monkeypatch.setattr(server_app, "create_app", lambda engine, settings, mask_codec=None: codecs.append(mask_codec))
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    assert main(["serve", "--model", str(model_dir)]) == 0
    assert main(["serve", "--model", str(tiny_checkpoint_dir)]) == 0
    assert main(["serve", "--model", str(tiny_checkpoint_dir), "--mask-codec", str(model_dir / MASK_CODEC_FILE)]) == 0
    assert [None if c is None else c.config for c in codecs] == [config, None, config]
    assert main(["serve", "--model", str(tiny_checkpoint_dir), "--mask-codec", str(tmp_path / "none.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
