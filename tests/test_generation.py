"""Generation against transformers' `generate` on the same weights, plus sampling, stops and streaming."""

import pytest
import torch
from tiny_models import write_complete_checkpoint

import paligemma
from paligemma.generation import generate, generate_detailed, stream_generate
from paligemma.processor import load_processor
from paligemma.sampling import SamplingParams, filter_logits

PROMPTS = ["caption en", "answer en how many circles are there?", "detect red circle"]


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def checkpoint(request, tmp_path_factory, spm_model_path, spm_layout):
    """(directory, reference model): tiny random weights, the test tokenizer, hub-style preprocessing."""
    directory = tmp_path_factory.mktemp(f"gen-{request.param}")
    reference = write_complete_checkpoint(directory, request.param, spm_model_path, spm_layout, kv_heads=2, window=12)
    return directory, reference


@pytest.fixture(scope="module")
def loaded(checkpoint):
    directory, reference = checkpoint
    return paligemma.load_model(directory), load_processor(directory), reference


def _images(photos, n):
    names = ["astronaut", "coffee", "chelsea"]
    return [photos[names[i % 3]] for i in range(n)]


def _reference_greedy(reference, inputs, max_new_tokens):
    out = reference.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return out[:, inputs["input_ids"].shape[1]:]


def test_greedy_matches_transformers_single_and_batched(loaded, skimage_photos):
    model, processor, reference = loaded
    images = _images(skimage_photos, 3)
    inputs = processor(images=images, prompts=PROMPTS)  # ragged prompt lengths: left padding
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        expected = _reference_greedy(reference, inputs, 12)
    results = generate_detailed(model, processor, images, PROMPTS, max_new_tokens=12)
    assert len({t for r in results for t in r.token_ids}) > 6  # varied answers, not one token repeated
    for row, result in zip(expected.tolist(), results):
        assert result.token_ids == row  # transformers forced to 12 tokens; no <eos> in these random answers
        assert result.finish_reason == "length"
    for i, prompt in enumerate(PROMPTS):
        alone = generate_detailed(model, processor, [images[i]], [prompt], max_new_tokens=12)[0]
        assert alone.token_ids == results[i].token_ids


def test_vision_tower_runs_once_per_image(loaded, skimage_photos):
    model, processor, _ = loaded
    calls = []
    handle = model.vision_tower.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        generate(model, processor, _images(skimage_photos, 2), PROMPTS[:2], max_new_tokens=6)
    finally:
        handle.remove()
    assert calls == [2]


def test_precomputed_image_features_skip_the_images_entirely(loaded, skimage_photos):
    model, processor, _ = loaded
    images = _images(skimage_photos, 2)
    expected = generate_detailed(model, processor, images, PROMPTS[:2], max_new_tokens=6)
    with torch.no_grad():
        features = model.encode_images(processor(images=images, prompts=PROMPTS[:2])["pixel_values"])
    # Placeholders that would fail to load: with features given, the images are only counted.
    events = stream_generate(model, processor, ["not/a/file.png", "neither.png"], PROMPTS[:2], max_new_tokens=6,
                             image_features=features)
    results = {e.index: e.result for e in events if e.result is not None}
    assert [results[i].token_ids for i in range(2)] == [r.token_ids for r in expected]


def test_sampling_is_reproducible_with_a_seed(loaded, skimage_photos):
    model, processor, _ = loaded
    image = skimage_photos["astronaut"]
    kwargs = dict(max_new_tokens=10, temperature=5.0, top_k=200, top_p=0.99)  # flat enough to vary

    def tokens(images, prompts, seed):
        return [r.token_ids for r in generate_detailed(model, processor, images, prompts, seed=seed, **kwargs)]

    first = tokens([image], ["caption en"], 7)
    assert tokens([image], ["caption en"], 7) == first
    others = [tokens([image], ["caption en"], s)[0] for s in range(8, 12)]
    assert any(other != first[0] for other in others)
    # A row's draws do not depend on its batch neighbours.
    batched = tokens([image, skimage_photos["coffee"]], ["caption en", "ocr"], [7, 3])
    assert batched[0] == first[0]


def test_top_k_one_and_tiny_top_p_are_greedy(loaded, skimage_photos):
    model, processor, _ = loaded
    image = [skimage_photos["chelsea"]]
    greedy = generate(model, processor, image, ["caption en"], max_new_tokens=8)
    assert generate(model, processor, image, ["caption en"], max_new_tokens=8, temperature=1.0, top_k=1,
                    seed=1) == greedy
    assert generate(model, processor, image, ["caption en"], max_new_tokens=8, temperature=1.0, top_p=1e-6,
                    seed=1) == greedy


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    for params in (SamplingParams(0.7, 1.0, 20), SamplingParams(1.3, 0.8, 0), SamplingParams(1.0, 0.5, 40)):
        expected = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
        if params.top_k:
            expected = TopKLogitsWarper(params.top_k)(None, expected)
        if params.top_p < 1:
            expected = TopPLogitsWarper(params.top_p)(None, expected)
        got = filter_logits(logits, params)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_stop_string_cuts_the_answer(loaded, skimage_photos):
    model, processor, _ = loaded
    image = [skimage_photos["coffee"]]
    full = generate(model, processor, image, ["caption en"], max_new_tokens=16)[0]
    assert len(full) >= 6, full
    stop = full[3:5]
    result = generate_detailed(model, processor, image, ["caption en"], max_new_tokens=16, stop=[stop])[0]
    assert result.finish_reason == "stop_string"
    assert result.text == full[:full.index(stop)]


def test_eos_ends_the_row_and_is_not_in_the_text(loaded, skimage_photos, monkeypatch):
    model, processor, _ = loaded
    eos = processor.tokenizer.eos_id
    original = model.decode_step
    steps = []

    def eos_on_third_step(tokens, positions, cache):
        logits = original(tokens, positions, cache)
        steps.append(1)
        if len(steps) == 2:
            logits[0, eos] = 1e4  # row 0 ends after 3 tokens; row 1 runs on
        return logits

    monkeypatch.setattr(model, "decode_step", eos_on_third_step)
    results = generate_detailed(model, processor, _images(skimage_photos, 2), PROMPTS[:2], max_new_tokens=6)
    assert results[0].finish_reason == "eos" and results[0].token_ids[-1] == eos and len(results[0].token_ids) == 3
    assert results[1].finish_reason == "length" and len(results[1].token_ids) == 6
    assert processor.tokenizer.decode(results[0].token_ids[:-1]) == results[0].text


def test_stream_deltas_add_up_to_the_answer(loaded, skimage_photos):
    model, processor, _ = loaded
    images = _images(skimage_photos, 2)
    texts, finals = {0: "", 1: ""}, {}
    for event in stream_generate(model, processor, images, PROMPTS[:2], max_new_tokens=10):
        assert event.index not in finals, "no events after a row's last one"
        texts[event.index] += event.text
        if event.finish_reason:
            finals[event.index] = event.result
    assert set(finals) == {0, 1}
    assert all(texts[i] == finals[i].text for i in finals)
    assert finals[0].timings["prefill"] > 0 and finals[0].prompt_tokens > 4


def test_prompt_past_the_context_is_an_error_up_front(loaded, skimage_photos):
    model, processor, _ = loaded
    with pytest.raises(ValueError, match="context"):
        generate(model, processor, [skimage_photos["coffee"]], ["caption en"], max_new_tokens=600)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=[""]), "stop"), (dict(seed=[1, 2]), "seeds"),
])
def test_bad_settings_are_rejected(loaded, skimage_photos, kwargs, message):
    model, processor, _ = loaded
    with pytest.raises(ValueError, match=message):
        generate(model, processor, [skimage_photos["coffee"]], ["caption en"], **kwargs)


def test_settings_per_row_equal_each_request_alone(loaded, skimage_photos):
    model, processor, _ = loaded
    images = _images(skimage_photos, 3)
    full = generate(model, processor, images[:1], PROMPTS[:1], max_new_tokens=12)[0]
    stop = full[4:6]
    settings = [dict(max_new_tokens=12, stop=[stop]), dict(max_new_tokens=5, temperature=2.0, top_k=30, seed=11),
                dict(max_new_tokens=9, top_p=0.5, temperature=1.0, seed=5)]
    alone = [generate_detailed(model, processor, [images[i]], [PROMPTS[i]], **kw)[0] for i, kw in enumerate(settings)]
    batched = generate_detailed(
        model, processor, images, PROMPTS, max_new_tokens=[s["max_new_tokens"] for s in settings],
        temperature=[s.get("temperature", 0.0) for s in settings], top_p=[s.get("top_p", 1.0) for s in settings],
        top_k=[s.get("top_k", 0) for s in settings], seed=[s.get("seed") for s in settings],
        stop=[s.get("stop") for s in settings])
    assert [(r.token_ids, r.text, r.finish_reason) for r in batched] == \
        [(r.token_ids, r.text, r.finish_reason) for r in alone]
    assert batched[0].finish_reason == "stop_string" and len(batched[1].token_ids) == 5
    with pytest.raises(ValueError, match="max_new_tokens has 2 values"):
        generate(model, processor, images, PROMPTS, max_new_tokens=[3, 4])
