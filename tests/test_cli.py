"""The `paligemma` command run in-process (and once as `python -m paligemma`) against a tiny checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import paligemma
from paligemma import cli, cli_common
from paligemma.generation import GenerationResult

IMAGE_SIZE = (60, 40)  # (width, height): not square, so box mapping is checked on both axes


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, skimage_photos) -> Path:
    path = tmp_path_factory.mktemp("cli-images") / "photo.png"
    skimage_photos["astronaut"].resize(IMAGE_SIZE).save(path)
    return path


@pytest.fixture(scope="module")
def expected_caption(tiny_checkpoint_dir, image_file) -> str:
    model, processor = paligemma.load_model(tiny_checkpoint_dir), paligemma.load_processor(tiny_checkpoint_dir)
    return paligemma.generate(model, processor, [paligemma.load_image(image_file)], ["caption en"],
                              max_new_tokens=6)[0]


def _generate(capsys, *extra, model=None, image=None, prompt="caption en"):
    argv = ["generate", "--prompt", prompt, "--max-new-tokens", "6", *extra]
    argv += ["--model", str(model)] if model else []
    argv += ["--image", str(image)] if image else []
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _fake_answer(monkeypatch, text):
    """Make the CLI's generation return `text` (a random tiny model never writes loc tokens)."""
    def fake(model, processor, images, prompts, **kwargs):
        return [GenerationResult(text, [5, 6, 1], "eos", 7, {"encode_images": 0.1, "prefill": 0.2, "decode": 0.3})]
    monkeypatch.setattr(cli, "generate_detailed", fake)


def _assert_user_error(code, out, err, *phrases):
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err


def test_plain_prints_just_the_answer(capsys, tiny_checkpoint_dir, image_file, expected_caption):
    code, out, err = _generate(capsys, model=tiny_checkpoint_dir, image=image_file)
    assert code == 0 and err == ""
    assert out == expected_caption + "\n"


@pytest.mark.parametrize("flags, optimized", [((), True), (("--no-optimize",), False)])
def test_model_is_optimized_for_inference_unless_asked_not_to(capsys, monkeypatch, tiny_checkpoint_dir, image_file,
                                                               expected_caption, flags, optimized):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["optimize"])
        return paligemma.load_model(*args, **kwargs)

    monkeypatch.setattr(cli_common, "load_model", spy)
    code, out, _ = _generate(capsys, *flags, model=tiny_checkpoint_dir, image=image_file)
    assert code == 0 and out == expected_caption + "\n"  # same greedy answer either way
    assert seen == [optimized]


def test_stream_prints_the_same_answer(capsys, tiny_checkpoint_dir, image_file, expected_caption):
    code, out, _ = _generate(capsys, "--stream", model=tiny_checkpoint_dir, image=image_file)
    assert code == 0 and out == expected_caption + "\n"


def test_json_has_the_generation_details(capsys, tiny_checkpoint_dir, image_file, expected_caption):
    code, out, _ = _generate(capsys, "--json", "--dtype", "float32", model=tiny_checkpoint_dir, image=image_file)
    record = json.loads(out)
    assert code == 0
    assert record["text"] == expected_caption
    assert record["finish_reason"] in {"eos", "stop_string", "length"}
    assert all(isinstance(t, int) for t in record["tokens"]) and 1 <= len(record["tokens"]) <= 6
    assert record["prompt_tokens"] > 4  # 4 image tokens + <bos> + prompt + "\n"
    assert set(record["timings"]) == {"load", "encode_images", "prefill", "decode"}
    assert record["image_size"] == list(IMAGE_SIZE)
    assert "detections" not in record  # not a detect prompt


def test_json_detect_prompt_real_model_has_detection_fields(capsys, tiny_checkpoint_dir, image_file):
    code, out, _ = _generate(capsys, "--json", model=tiny_checkpoint_dir, image=image_file, prompt="detect circle")
    record = json.loads(out)
    assert code == 0
    assert isinstance(record["detections"], list) and isinstance(record["detection_errors"], list)
    if record["text"].strip():  # random text: not a box, so it must be reported
        assert record["detection_errors"]


def test_json_detections_are_in_original_image_pixels(capsys, monkeypatch, tiny_checkpoint_dir, image_file):
    _fake_answer(monkeypatch, "<loc0000><loc0000><loc1023><loc1023> a b ; <loc0511><loc0511> c")
    code, out, _ = _generate(capsys, "--json", model=tiny_checkpoint_dir, image=image_file, prompt="detect a b")
    record = json.loads(out)
    assert code == 0
    assert record["detections"] == [{"label": "a b", "box": [0.0, 0.0, 60.0, 40.0]}]
    assert len(record["detection_errors"]) == 1 and "found 2" in record["detection_errors"][0]
    assert record["tokens"] == [5, 6, 1] and record["finish_reason"] == "eos" and record["prompt_tokens"] == 7


def test_draw_detect_writes_boxes(capsys, monkeypatch, tmp_path, tiny_checkpoint_dir, image_file):
    _fake_answer(monkeypatch, "<loc0102><loc0102><loc0920><loc0920> cat")
    out_path = tmp_path / "boxes.png"
    code, out, _ = _generate(capsys, "--draw", str(out_path), model=tiny_checkpoint_dir, image=image_file,
                             prompt="detect cat")
    assert code == 0 and out.startswith("<loc0102>")
    with Image.open(out_path) as drawn:
        assert drawn.size == IMAGE_SIZE
        # The box's bottom edge (y = 920/1023*40 ~ 36) is drawn in the first palette colour.
        column = [drawn.convert("RGB").getpixel((30, y)) for y in range(34, 38)]
        assert (0x1F, 0x77, 0xB4) in column


def test_segment_prompt_decodes_masks_with_the_codec(capsys, monkeypatch, tmp_path, tiny_checkpoint_dir, image_file):
    from paligemma.segmentation import rle_to_mask
    from paligemma.vqvae import MaskCodec, MaskCodecConfig, save_mask_codec

    torch.manual_seed(0)
    codec_path = tmp_path / "codec.safetensors"
    save_mask_codec(MaskCodec(MaskCodecConfig(num_codes=128, embed_dim=8, hidden=8)), codec_path)
    segs = "".join(f"<seg{i:03d}>" for i in range(16))
    _fake_answer(monkeypatch, f"<loc0000><loc0000><loc0511><loc1023>{segs} cat")
    out_path = tmp_path / "masks.png"
    code, out, err = _generate(capsys, "--json", "--mask-codec", str(codec_path), "--draw", str(out_path),
                               model=tiny_checkpoint_dir, image=image_file, prompt="segment cat")
    assert code == 0, err
    record = json.loads(out)
    [segment] = record["segmentations"]
    assert segment["label"] == "cat" and segment["box"] == [0.0, 0.0, 60.0, 20.0 * 511 / 1023 * 2]
    mask = rle_to_mask(segment["mask_rle"])
    assert mask.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0]) and not mask[21:].any()  # nothing outside the box
    assert record["segmentation_errors"] == []
    with Image.open(out_path) as drawn:
        assert drawn.size == IMAGE_SIZE


def test_segment_prompt_uses_the_checkpoints_own_codec(capsys, monkeypatch, tmp_path, tiny_checkpoint_dir, image_file):
    """Without --mask-codec, generate decodes with the model directory's mask_codec.safetensors."""
    from paligemma.segmentation import parse_segmentations
    from paligemma.vqvae import MaskCodec, MaskCodecConfig, load_mask_codec, save_mask_codec

    model_dir = tmp_path / "with-codec"
    model_dir.mkdir()
    for file in Path(tiny_checkpoint_dir).iterdir():
        shutil.copy(file, model_dir / file.name)  # copies: the loader refuses links out of the folder
    torch.manual_seed(1)
    save_mask_codec(MaskCodec(MaskCodecConfig(num_codes=128, embed_dim=8, hidden=8)), model_dir / cli.MASK_CODEC_FILE)
    answer = f"<loc0100><loc0000><loc0900><loc1023>{''.join(f'<seg{i:03d}>' for i in range(16, 32))} cat"
    _fake_answer(monkeypatch, answer)
    code, out, err = _generate(capsys, "--json", model=model_dir, image=image_file, prompt="segment cat")
    assert code == 0, err
    [segment] = json.loads(out)["segmentations"]
    expected = parse_segmentations(answer, IMAGE_SIZE, load_mask_codec(model_dir / cli.MASK_CODEC_FILE)).objects[0]
    assert segment == json.loads(json.dumps(expected.as_json()))


def test_segment_prompt_without_a_codec_fails_before_generating(capsys, tiny_checkpoint_dir, image_file):
    code, _, err = _generate(capsys, model=tiny_checkpoint_dir, image=image_file, prompt="segment cat")
    assert code == 2 and "--mask-codec" in err and "Traceback" not in err


def test_draw_other_prompt_writes_the_answer_below_the_image(capsys, tmp_path, tiny_checkpoint_dir, image_file):
    out_path = tmp_path / "caption.png"
    code, _, _ = _generate(capsys, "--draw", str(out_path), model=tiny_checkpoint_dir, image=image_file)
    assert code == 0
    with Image.open(out_path) as drawn:
        assert drawn.width == IMAGE_SIZE[0] and drawn.height > IMAGE_SIZE[1]


def test_demo_model_and_example_image_are_the_defaults(capsys, monkeypatch, tiny_checkpoint_dir, image_file,
                                                       expected_caption):
    monkeypatch.setattr(cli_common, "DEMO_MODEL_DIR", tiny_checkpoint_dir)
    monkeypatch.setattr(cli, "EXAMPLE_IMAGE", image_file)
    code, out, _ = _generate(capsys)
    assert code == 0 and out == expected_caption + "\n"


def test_missing_demo_model_asks_for_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli_common, "DEMO_MODEL_DIR", tmp_path / "no-demo")
    _assert_user_error(*_generate(capsys), "demo model", "--model")


def test_missing_model_dir(capsys, tmp_path, image_file):
    _assert_user_error(*_generate(capsys, model=tmp_path / "nowhere", image=image_file), "nowhere")


def test_model_without_image(capsys, tiny_checkpoint_dir):
    _assert_user_error(*_generate(capsys, model=tiny_checkpoint_dir), "--image")


def test_corrupt_image(capsys, tmp_path, tiny_checkpoint_dir):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _assert_user_error(*_generate(capsys, model=tiny_checkpoint_dir, image=bad), "bad.png")


@pytest.mark.parametrize("setting, name", [(["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"),
                                           (["--max-new-tokens", "0"], "max_new_tokens")])
def test_bad_settings(capsys, tmp_path, image_file, setting, name):
    # Checked before the model is loaded: the (missing) model is never reached.
    _assert_user_error(*_generate(capsys, *setting, model=tmp_path / "nowhere", image=image_file), name)


@pytest.mark.parametrize("out_name, phrase", [("boxes.xyz", "extension"), ("missing/boxes.png", "does not exist")])
def test_bad_draw_path_fails_before_generating(capsys, tmp_path, image_file, out_name, phrase):
    _assert_user_error(*_generate(capsys, "--draw", str(tmp_path / out_name), model=tmp_path / "nowhere",
                                  image=image_file), phrase)


def test_argparse_errors_exit_2(capsys):
    assert cli.main(["generate"]) == 2  # --prompt missing
    assert cli.main(["generate", "--prompt", "x", "--json", "--stream"]) == 2
    assert cli.main(["no-such-command"]) == 2
    capsys.readouterr()


def test_plugins_are_registered_from_the_table(capsys, monkeypatch, tmp_path):
    plugin = types.ModuleType("fake_plugin_cli")
    plugin.add_arguments = lambda parser: parser.add_argument("--answer", type=int, default=0)
    plugin.run = lambda args: args.answer
    monkeypatch.setitem(sys.modules, "fake_plugin_cli", plugin)
    monkeypatch.setattr(cli, "_PLUGINS", [("fake", "fake_plugin_cli", "a fake"),
                                          ("absent", "paligemma.no_such_package.cli", "missing")])
    assert cli.main(["fake", "--answer", "7"]) == 7
    assert cli.main(["absent"]) == 2 and "invalid choice" in capsys.readouterr().err

    (tmp_path / "broken_plugin_cli.py").write_text("import fancy_dep_not_installed\n")  # exists, its import fails
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_PLUGINS", cli._PLUGINS + [("broken", "broken_plugin_cli", "needs a dependency")])
    assert cli.main(["broken", "--some", "args"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: paligemma broken is unavailable") and "fancy_dep_not_installed" in err

    plugin.run = lambda args: (_ for _ in ()).throw(KeyboardInterrupt)
    assert cli.main(["fake"]) == 130
    plugin.run = lambda args: 1 / 0
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err


def test_python_dash_m_entry_point(tiny_checkpoint_dir, image_file, expected_caption):
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "paligemma", "generate", "--model", str(tiny_checkpoint_dir),
                           "--image", str(image_file), "--prompt", "caption en", "--max-new-tokens", "6"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_caption + "\n"


# ---------------------------------------------------------------------- one loader, one set of options

def _parse(argv):
    return cli.build_parser(argv).parse_args(argv)


def test_every_command_takes_the_shared_model_options():
    generate = _parse(["generate", "--prompt", "x"])
    assert (generate.model, generate.dtype, generate.device, generate.quantize, generate.no_optimize,
            generate.mask_codec) == (None, None, "cpu", None, False, None)
    tuned = _parse(["generate", "--prompt", "x", "--model", "m", "--dtype", "bfloat16", "--device", "cuda:1",
                    "--quantize", "int4", "--no-optimize", "--mask-codec", "c.npz"])
    assert (tuned.model, tuned.dtype, tuned.device, tuned.quantize, tuned.no_optimize, tuned.mask_codec) == \
        ("m", "bfloat16", "cuda:1", "int4", True, "c.npz")
    finetune = _parse(["finetune", "--model", "m", "--data", "d", "--out", "o"])
    assert (finetune.model, finetune.dtype, finetune.quantize) == ("m", "float32", None)  # --quantize: QLoRA's base
    assert not hasattr(finetune, "no_optimize")  # trained: no inference layout
    demo = _parse(["demo-eval"])
    assert (demo.model, demo.dtype, demo.mask_codec, demo.no_segmentation) == (None, None, None, False)
    with pytest.raises(SystemExit):  # --mask-codec and --no-segmentation exclude each other
        _parse(["demo-eval", "--mask-codec", "c.npz", "--no-segmentation"])
    with pytest.raises(SystemExit):  # finetune's --model is required
        _parse(["finetune", "--data", "d", "--out", "o"])


def test_load_returns_model_processor_and_the_checkpoints_codec(tmp_path, tiny_checkpoint_dir):
    from paligemma.vqvae import MASK_CODEC_FILE, MaskCodec, MaskCodecConfig, save_mask_codec

    model, processor, codec = cli_common.load(tiny_checkpoint_dir, "float32")
    assert isinstance(model, paligemma.PaliGemma) and isinstance(processor, paligemma.Processor) and codec is None
    assert next(model.parameters()).dtype == torch.float32 and not model.training

    model_dir = tmp_path / "with-codec"
    model_dir.mkdir()
    for file in Path(tiny_checkpoint_dir).iterdir():
        shutil.copy(file, model_dir / file.name)  # copies: the loader refuses links out of the folder
    save_mask_codec(MaskCodec(MaskCodecConfig(num_codes=128, embed_dim=8, hidden=8)), model_dir / MASK_CODEC_FILE)
    assert isinstance(cli_common.load(model_dir)[2], MaskCodec)
    explicit = cli_common.load(tiny_checkpoint_dir, mask_codec=model_dir / MASK_CODEC_FILE)[2]
    assert isinstance(explicit, MaskCodec)


@pytest.mark.parametrize("options, phrase", [
    (dict(dtype="float16"), "--dtype 'float16'"),
    (dict(device="meta", quantize="int8"), "CPU only"),
    (dict(device="not-a-device"), "not a torch device"),
    (dict(mask_codec="missing.npz"), "--mask-codec missing.npz does not exist"),
])
def test_load_checks_its_options_first(tmp_path, options, phrase):
    with pytest.raises(paligemma.PaliGemmaError, match=phrase):
        cli_common.load(tmp_path / "nowhere" if "mask_codec" not in options else tmp_path, **options)


def test_checkpoint_dir_defaults_to_the_demo_model(monkeypatch, tmp_path, tiny_checkpoint_dir):
    monkeypatch.setattr(cli_common, "DEMO_MODEL_DIR", tiny_checkpoint_dir)
    assert cli_common.checkpoint_dir(None) == tiny_checkpoint_dir
    assert cli_common.checkpoint_dir(str(tmp_path)) == tmp_path
    monkeypatch.setattr(cli_common, "DEMO_MODEL_DIR", tmp_path / "no-demo")
    with pytest.raises(paligemma.UsageError, match="demo model is not installed"):
        cli_common.checkpoint_dir(None)


# ---------------------------------------------------------------------- exit codes in every command

@pytest.mark.parametrize("argv, phrase", [
    (["demo-eval", "--scenes", "0"], "--scenes"),
    (["demo-eval", "--model", "/nowhere/ckpt"], "nowhere"),
    (["serve", "--max-batch-size", "0"], "--max-batch-size"),
    (["finetune", "--model", "/nowhere/ckpt", "--data", "d.jsonl", "--out", "o"], "nowhere"),
    (["finetune", "--model", "m", "--data", "d.jsonl", "--out", "o", "--batch-size", "0"], "batch_size must be >= 1"),
])
def test_user_errors_exit_2_in_every_command(capsys, argv, phrase):
    _assert_user_error(cli.main(argv), *capsys.readouterr(), phrase)


def test_finetune_module_entry_point_has_the_same_exit_codes(capsys, tmp_path):
    from paligemma.finetune import cli as finetune_cli

    code = finetune_cli.main(["--model", str(tmp_path / "nowhere"), "--data", "d.jsonl", "--out", str(tmp_path)])
    _assert_user_error(code, *capsys.readouterr(), "nowhere")
    assert finetune_cli.main(["--data", "d.jsonl"]) == 2  # argparse: --model and --out missing
    capsys.readouterr()


@pytest.mark.parametrize("extra, phrase", [
    (["--max-new-tokens", "100000"], "exceeds the model's context"),
    (["--stop", ""], "stop strings must be non-empty"),
    (["--prompt", "caption <image> en"], "contains '<image>'"),  # a leading <image> is accepted (processor.py)
    (["--prompt", "segment cat", "--mask-codec", "missing.npz"], "--mask-codec missing.npz does not exist"),
])
def test_library_user_errors_exit_2(capsys, tiny_checkpoint_dir, image_file, extra, phrase):
    _assert_user_error(*_generate(capsys, *extra, model=tiny_checkpoint_dir, image=image_file), phrase)


def test_unreadable_mask_codec_is_a_user_error(capsys, tmp_path, tiny_checkpoint_dir, image_file):
    bad = tmp_path / "codec.safetensors"
    bad.write_bytes(b"not a safetensors file")
    _assert_user_error(*_generate(capsys, "--mask-codec", str(bad), model=tiny_checkpoint_dir, image=image_file,
                                  prompt="segment cat"), "not a readable mask codec")
