"""paligemma.visualize: captured attention against transformers' own weights, the answer maps'
shape and normalisation, the figures, and `paligemma generate --attention-map`."""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image
from tiny_models import TINY_CONFIGS, random_batch, write_hf_checkpoint

import paligemma
from paligemma import cli, visualize
from paligemma.cli_common import DEMO_MODEL_DIR, EXAMPLE_IMAGE
from paligemma.errors import UsageError


@pytest.fixture(scope="module")
def photo(skimage_photos) -> Image.Image:
    return skimage_photos["astronaut"].resize((60, 40))  # not square: the map is stretched back over it


@pytest.fixture(scope="module")
def tiny_answer(tiny_checkpoint_dir, photo):
    """(model, processor, prompt, generated token ids) on the tiny transformers-written checkpoint."""
    model, processor = paligemma.load_model(tiny_checkpoint_dir), paligemma.load_processor(tiny_checkpoint_dir)
    prompt = "caption en"
    result = paligemma.generate_detailed(model, processor, [photo], [prompt], max_new_tokens=5)[0]
    return model, processor, prompt, result.token_ids


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_captured_weights_are_transformers_output_attentions(name, tmp_path):
    """Every layer, head, query and key, with a suffix, Gemma 2's soft-cap and sliding window, MQA/GQA/MHA."""
    config = TINY_CONFIGS[name]
    reference = write_hf_checkpoint(config, tmp_path)
    ours = paligemma.load_model(tmp_path)
    batch = random_batch(config, prompt_len=6, suffix_len=12)  # longer than the gemma2 windows (6, 10)
    batch.pop("labels")
    with torch.no_grad():
        expected = reference(**batch, output_attentions=True).attentions
        with visualize.capture_attention(ours) as records:
            ours(**batch)
    assert len(records) == len(expected) == config.text.num_hidden_layers
    for layer, weights in zip(records, expected):
        assert len(layer) == 1
        torch.testing.assert_close(layer[0], weights, atol=2e-5, rtol=0)


def test_answer_maps_are_the_image_columns_of_transformers_weights(tiny_answer, tiny_checkpoint_dir, photo):
    from transformers import PaliGemmaForConditionalGeneration

    model, processor, prompt, token_ids = tiny_answer
    got = visualize.answer_attention(model, processor, photo, prompt, token_ids)

    side = model.config.vision.image_size // model.config.vision.patch_size
    text = model.config.text
    assert got.maps.shape == (len(token_ids), text.num_hidden_layers, text.num_attention_heads, side, side)
    assert got.image_share.shape == got.maps.shape[:3]
    torch.testing.assert_close(got.maps.sum((-2, -1)), torch.ones(got.maps.shape[:3]))
    assert got.token_ids == token_ids and len(got.labels) == len(token_ids)

    # Independently: transformers' eager weights over prompt + answer, the row of the query before each token.
    reference = PaliGemmaForConditionalGeneration.from_pretrained(tiny_checkpoint_dir, attn_implementation="eager")
    inputs = processor(images=[photo], prompts=[prompt])
    prompt_len = inputs["input_ids"].shape[1]
    answer = torch.tensor([token_ids[:-1]])
    input_ids = torch.cat([inputs["input_ids"], answer], dim=1)
    token_type_ids = torch.cat([torch.zeros(1, prompt_len, dtype=torch.long), torch.ones_like(answer)], dim=1)
    with torch.no_grad():
        attentions = reference(input_ids=input_ids, pixel_values=inputs["pixel_values"], token_type_ids=token_type_ids,
                               attention_mask=torch.ones_like(input_ids), output_attentions=True).attentions
    rows = torch.stack(attentions)[:, 0, :, prompt_len - 1:]  # (layers, heads, answer tokens, keys)
    image = (inputs["input_ids"][0] == model.config.image_token_index).nonzero()[:, 0]
    on_image = rows[..., image].permute(2, 0, 1, 3)  # (tokens, layers, heads, patches)
    share = on_image.sum(-1)
    torch.testing.assert_close(got.image_share, share, atol=2e-5, rtol=0)
    torch.testing.assert_close(got.maps.flatten(-2), on_image / share[..., None], atol=1e-4, rtol=1e-4)
    assert bool((share > 0).all() and (share < 1).all())  # the query also looks at text: a real renormalisation


@pytest.mark.parametrize("optimize", [False, True])
def test_maps_are_the_rows_that_generation_computed(optimize):
    """The teacher-forced pass gives the weights the prefill and decode steps computed (demo model, with
    and without the inference layout, whose `attend` is its own)."""
    model = paligemma.load_model(DEMO_MODEL_DIR, optimize=optimize)
    processor = paligemma.load_processor(DEMO_MODEL_DIR)
    image = Image.open(EXAMPLE_IMAGE).convert("RGB")
    with visualize.capture_attention(model, last_queries=1) as records:
        result = paligemma.generate_detailed(model, processor, [image], ["detect triangle"])[0]
    assert [len(layer) for layer in records] == [len(result.token_ids)] * model.config.text.num_hidden_layers
    maps = visualize.answer_attention(model, processor, image, "detect triangle", result.token_ids)
    n = model.config.num_image_tokens
    for i in range(len(result.token_ids)):
        during = torch.stack([layer[i][0, :, 0, :n] for layer in records])  # (layers, heads, patches): image first
        torch.testing.assert_close(maps.image_share[i], during.sum(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(maps.maps[i].flatten(-2), during / during.sum(-1, keepdim=True), atol=1e-4, rtol=0)


def test_capture_leaves_the_model_as_it_was(tiny_answer):
    model = tiny_answer[0]
    attn = model.language_model.layers[0].self_attn
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(RuntimeError, match="inside"):
            with visualize.capture_attention(model) as records:
                torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)  # recording changes nothing
                raise RuntimeError("inside")
    assert "attend" not in vars(attn) and len(records[0]) == 1
    with visualize.capture_attention(model):
        with pytest.raises(UsageError, match="already being captured"):
            with visualize.capture_attention(model):
                pass
    assert "attend" not in vars(attn)


def test_answer_attention_rejects_an_empty_answer(tiny_answer, photo):
    model, processor, prompt, _ = tiny_answer
    with pytest.raises(UsageError, match="at least one"):
        visualize.answer_attention(model, processor, photo, prompt, [])


def test_spread_keeps_ends_and_count():
    assert visualize.spread(4, 8) == [0, 1, 2, 3]
    picked = visualize.spread(26, 8)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 25 and picked == sorted(set(picked))


# ---------------------------------------------------------------------- figures

def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_figures_are_written_and_never_silently_replaced(tiny_answer, photo, tmp_path):
    model, processor, prompt, token_ids = tiny_answer
    attention = visualize.answer_attention(model, processor, photo, prompt, token_ids)
    answer_png, token_png, mask_png = tmp_path / "answer.png", tmp_path / "token.png", tmp_path / "mask.png"
    visualize.plot_answer_attention(photo, attention, answer_png)
    visualize.plot_token_attention(photo, attention, -1, token_png, heads=[0, 2])
    batch = processor(images=[photo], prompts=[prompt], suffixes=["a cat"])
    visualize.plot_prefix_lm_mask(batch["input_ids"][0], batch["attention_mask"][0], batch["token_type_ids"][0],
                                  model.config.image_token_index, mask_png)
    sizes = [_png_size(p) for p in (answer_png, token_png, mask_png)]
    assert sizes[0][0] > sizes[0][1]  # more token columns than layer rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answer.png", "mask.png", "token.png"]  # no temp files

    with pytest.raises(UsageError, match="already exists"):
        visualize.plot_answer_attention(photo, attention, answer_png)
    before = answer_png.read_bytes()
    visualize.plot_answer_attention(photo, attention, answer_png, max_tokens=1, overwrite=True)
    assert answer_png.read_bytes() != before


@pytest.mark.parametrize("call, phrase", [
    (lambda a, img, out: visualize.plot_token_attention(img, a, 99, out), "out of range"),
    (lambda a, img, out: visualize.plot_token_attention(img, a, 0, out, heads=[7]), "heads [7] are not in"),
    (lambda a, img, out: visualize.plot_answer_attention(img, a, out, layers=[-1]), "layers [-1] are not in"),
    (lambda a, img, out: visualize.plot_answer_attention(img, a, out.with_suffix(".xyz")), "unknown figure format"),
    (lambda a, img, out: visualize.plot_answer_attention(img, a, out.parent / "no" / "x.png"), "does not exist"),
])
def test_bad_figure_requests_are_user_errors(tiny_answer, photo, tmp_path, call, phrase):
    model, processor, prompt, token_ids = tiny_answer
    attention = visualize.answer_attention(model, processor, photo, prompt, token_ids)
    with pytest.raises(UsageError) as err:
        call(attention, photo, tmp_path / "out.png")
    assert phrase in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install 'paligemma\[viz\]'"):
        visualize.check_figure_path(tmp_path / "out.png")


# ---------------------------------------------------------------------- paligemma generate --attention-map

def _generate(capsys, checkpoint, image_path, *extra):
    code = cli.main(["generate", "--model", str(checkpoint), "--image", str(image_path), "--prompt", "caption en",
                     "--max-new-tokens", "4", *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory, photo):
    path = tmp_path_factory.mktemp("viz-images") / "photo.png"
    photo.save(path)
    return path


def test_cli_attention_map_writes_the_figure(capsys, tmp_path, tiny_checkpoint_dir, photo_file):
    out_png = tmp_path / "attention.png"
    code, out, err = _generate(capsys, tiny_checkpoint_dir, photo_file, "--attention-map", str(out_png))
    assert code == 0 and err == "" and out.strip()
    width, height = _png_size(out_png)
    token_png = tmp_path / "token.png"
    code, _, err = _generate(capsys, tiny_checkpoint_dir, photo_file, "--attention-map", str(token_png),
                             "--attention-token", "0")
    assert code == 0 and err == ""
    assert _png_size(token_png) != (width, height)  # a layers x heads grid, not layers x tokens


@pytest.mark.parametrize("extra, phrase", [
    (["--attention-token", "1"], "--attention-token needs --attention-map"),
    (["--attention-map", "EXISTING"], "already exists"),
    (["--attention-map", "out.nope"], "unknown figure format"),
    (["--attention-map", "missing/out.png"], "does not exist"),
])
def test_cli_attention_map_errors_come_before_loading(capsys, monkeypatch, tmp_path, tiny_checkpoint_dir, photo_file,
                                                      extra, phrase):
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    extra = [str(existing) if arg == "EXISTING" else str(tmp_path / arg) if "." in arg else arg for arg in extra]
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("the model was loaded before the checks"))
    code, out, err = _generate(capsys, tiny_checkpoint_dir, photo_file, *extra)
    assert code == 2 and out == "" and err.startswith("error: ") and phrase in err
    assert existing.read_bytes() == b"keep me"


def test_cli_attention_token_out_of_range(capsys, tmp_path, tiny_checkpoint_dir, photo_file):
    code, _, err = _generate(capsys, tiny_checkpoint_dir, photo_file, "--attention-map", str(tmp_path / "a.png"),
                             "--attention-token", "4")  # at most 4 tokens: 0..3
    assert code == 2 and "out of range" in err and not (tmp_path / "a.png").exists()


def test_tour_figure_script_draws_every_tour_picture(tmp_path):
    """docs/make_tour_figures.py regenerates exactly the tour_*.png files docs/tour.md shows."""
    import importlib.util
    import re

    docs = DEMO_MODEL_DIR.parent.parent / "docs"
    spec = importlib.util.spec_from_file_location("make_tour_figures", docs / "make_tour_figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path)])
    shown = set(re.findall(r"\(assets/(tour_[\w]+\.png)\)", (docs / "tour.md").read_text(encoding="utf-8")))
    assert shown and {p.name for p in tmp_path.iterdir()} == shown
    for name in shown:
        assert _png_size(tmp_path / name)[0] > 300
