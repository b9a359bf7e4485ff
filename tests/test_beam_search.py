"""Beam search against transformers' `generate(num_beams=K, do_sample=False)` on the same weights."""

import pytest
import torch
from decoding_helpers import photos, tiny_pair_fixture

import paligemma
from paligemma.beam_search import beam_search
from paligemma.generation import generate_detailed

PROMPTS = ["caption en", "answer en how many circles are there?", "detect red circle"]
MAX_NEW = 10


loaded = tiny_pair_fixture("beam", eos_scale=3.0)  # <eos> likely enough that beams end at different lengths


def _reference_beams(reference, inputs, eos_id, **kwargs):
    """transformers' beams per prompt: [(tokens up to and including <eos>, score)], best first."""
    out = reference.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **kwargs)
    beams = []
    for row, score in zip(out.sequences[:, inputs["input_ids"].shape[1]:].tolist(), out.sequences_scores.tolist()):
        beams.append((row[:row.index(eos_id) + 1] if eos_id in row else row, score))
    return beams


@pytest.mark.parametrize("length_penalty, early_stopping", [
    (1.0, False), (1.0, True), (2.0, "never"), (-0.5, False), (0.0, "never"), (2.0, False),
])
def test_beams_match_transformers_on_a_ragged_batch(loaded, skimage_photos, length_penalty, early_stopping):
    model, processor, reference = loaded
    images = photos(skimage_photos, 3)
    inputs = processor(images=images, prompts=PROMPTS)
    assert (inputs["attention_mask"] == 0).any()  # unequal prompt lengths: left padding
    eos = processor.tokenizer.eos_id
    settings = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    with torch.no_grad():
        expected = _reference_beams(reference, inputs, eos, num_return_sequences=3, **settings)
    results = generate_detailed(model, processor, images, PROMPTS, max_new_tokens=MAX_NEW, n=3, **settings)
    assert [r.token_ids for r in results] == [tokens for tokens, _ in expected]
    # float32 logits in both, summed in float32: equal up to the last bits of the models' matmuls
    torch.testing.assert_close(torch.tensor([r.beam_score for r in results]), torch.tensor([s for _, s in expected]))
    for result in results:
        assert result.finish_reason == ("eos" if result.token_ids[-1] == eos else "length")
        assert result.beam_score == pytest.approx(result.total_logprob / len(result.token_ids) ** length_penalty,
                                                  rel=1e-5)


def test_the_reference_ends_beams_at_different_lengths(loaded, skimage_photos):
    """What makes the comparisons above meaningful: some answers end with <eos> early, some run to the limit."""
    model, processor, _ = loaded
    results = generate_detailed(model, processor, photos(skimage_photos, 3), PROMPTS, max_new_tokens=MAX_NEW, n=3,
                                num_beams=3)
    lengths = {len(r.token_ids) for r in results}
    assert len(lengths) >= 2 and any(r.finish_reason == "eos" for r in results), lengths


def test_a_prompt_alone_equals_the_same_prompt_in_a_batch(loaded, skimage_photos):
    model, processor, _ = loaded
    images = photos(skimage_photos, 3)
    batched = generate_detailed(model, processor, images, PROMPTS, max_new_tokens=[MAX_NEW, 6, 8], num_beams=2)
    for i, prompt in enumerate(PROMPTS):
        alone = generate_detailed(model, processor, [images[i]], [prompt], max_new_tokens=[MAX_NEW, 6, 8][i],
                                  num_beams=2)[0]
        assert alone.token_ids == batched[i].token_ids
        assert alone.beam_score == pytest.approx(batched[i].beam_score, rel=1e-5)  # padding changes matmul shapes
        assert len(alone.token_ids) <= [MAX_NEW, 6, 8][i]


def test_each_prompt_is_prefilled_once(loaded, skimage_photos, monkeypatch):
    model, processor, _ = loaded
    prefilled = []
    original = model.prefill

    def counting_prefill(input_ids, *args, **kwargs):
        prefilled.append(input_ids.shape[0])
        return original(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "prefill", counting_prefill)
    beam_search(model, processor, photos(skimage_photos, 2), PROMPTS[:2], num_beams=4, max_new_tokens=5)
    assert prefilled == [2]  # one prefill of the two prompts, not of 2 x 4 beams


def test_cache_rows_copied_after_prefill_equal_prefilling_them(loaded, skimage_photos):
    model, processor, _ = loaded
    inputs = processor(images=photos(skimage_photos, 2), prompts=PROMPTS[:2])
    rows = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        features = model.encode_images(inputs["pixel_values"])
        length = inputs["input_ids"].shape[1] + 2
        copied = model.new_cache(2, length)
        model.prefill(inputs["input_ids"], inputs["attention_mask"], copied, image_features=features)
        copied.index_select(rows)
        direct = model.new_cache(4, length)
        model.prefill(inputs["input_ids"][rows], inputs["attention_mask"][rows], direct,
                      image_features=features[rows])
        positions = inputs["attention_mask"][rows].sum(-1) + 1
        tokens = torch.tensor([5, 6, 7, 8])
        torch.testing.assert_close(model.decode_step(tokens, positions, copied),
                                   model.decode_step(tokens, positions, direct))
    assert copied.batch_size == 4 and copied.keys[0].shape[0] == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.7), "temperature"), (dict(top_k=5), "top_k"), (dict(stop=["x"]), "stop"),
    (dict(top_logprobs=2), "top_logprobs"), (dict(best_of=3), "best_of"), (dict(n=4), "n \\(4\\)"),
    (dict(early_stopping="sometimes"), "early_stopping"), (dict(length_penalty=float("nan")), "length_penalty"),
])
def test_settings_beam_search_cannot_take_are_refused(loaded, skimage_photos, kwargs, message):
    model, processor, _ = loaded
    with pytest.raises(paligemma.UsageError, match=message):
        generate_detailed(model, processor, photos(skimage_photos, 1), PROMPTS[:1], num_beams=3, **kwargs)


def test_length_settings_without_beams_are_refused(loaded, skimage_photos):
    model, processor, _ = loaded
    with pytest.raises(paligemma.UsageError, match="num_beams"):
        generate_detailed(model, processor, photos(skimage_photos, 1), PROMPTS[:1], length_penalty=2.0)
