"""Answer scoring against transformers' per-token loss, and classification on top of it."""

import pytest
import torch
import torch.nn.functional as F
from decoding_helpers import photos_fixture, tiny_pair_fixture

import paligemma
from paligemma.model import IGNORE_INDEX
from paligemma.scoring import classify, score

PROMPTS = ["caption en", "answer en how many circles are there?", "detect red circle"]
ANSWERS = ["a red circle and a purple star", "3", "<loc0100><loc0200><loc0300><loc0400> red circle"]


loaded = tiny_pair_fixture("score")
images = photos_fixture()


def _reference_token_losses(reference, processor, images, prompts, answers):
    """transformers' cross-entropy of each answer token (B, T - 1), 0 off the answers, and the batch's mean loss."""
    inputs = processor(images=images, prompts=prompts, suffixes=answers)
    with torch.no_grad():
        out = reference(**inputs)
    labels = inputs["labels"][:, 1:]
    losses = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses, (labels != IGNORE_INDEX).sum(-1), out.loss


def test_score_is_minus_the_reference_per_token_loss_summed(loaded, images):
    model, processor, reference = loaded
    losses, counts, _ = _reference_token_losses(reference, processor, images, PROMPTS, ANSWERS)
    assert len(set(counts.tolist())) == 3  # answers of unequal lengths: right padding
    torch.testing.assert_close(torch.tensor(score(model, processor, images, PROMPTS, ANSWERS)), -losses.sum(-1))
    torch.testing.assert_close(torch.tensor(score(model, processor, images, PROMPTS, ANSWERS, normalize="mean")),
                               -losses.sum(-1) / counts)


def test_mean_score_of_one_answer_is_minus_the_reference_loss(loaded, images):
    model, processor, reference = loaded
    _, _, loss = _reference_token_losses(reference, processor, images[:1], PROMPTS[:1], ANSWERS[:1])
    assert score(model, processor, images[0], PROMPTS[0], ANSWERS[0], normalize="mean")[0] == \
        pytest.approx(-float(loss), abs=1e-5)


def test_one_forward_pass_per_batch_and_batches_agree(loaded, images):
    model, processor, _ = loaded
    calls = []
    handle = model.language_model.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    try:
        together = score(model, processor, images, PROMPTS, ANSWERS)
        assert calls == [3]
        one_by_one = score(model, processor, images, PROMPTS, ANSWERS, batch_size=1)
        assert calls == [3, 1, 1, 1]
    finally:
        handle.remove()
    torch.testing.assert_close(torch.tensor(one_by_one), torch.tensor(together))


def test_the_eos_counts_and_a_longer_answer_costs_more(loaded, images):
    model, processor, _ = loaded
    image = images[0]
    eos_only, one_token = score(model, processor, [image, image], "caption en", ["", "a"])
    assert eos_only < 0 and one_token < 0
    # log P("a" <eos>) = log P("a") + log P(<eos> | "a"): the two-token answer is the product of two probabilities
    inputs = processor(images=[image], prompts=["caption en"])
    with torch.no_grad():
        cache = model.new_cache(1, inputs["input_ids"].shape[1] + 1)
        features = model.encode_images(inputs["pixel_values"])
        first = model.prefill(inputs["input_ids"], inputs["attention_mask"], cache, image_features=features)
        a = processor.tokenizer.encode("a")[0]
        second = model.decode_step(torch.tensor([a]), inputs["attention_mask"].sum(-1) + 1, cache)
    expected = first.float().log_softmax(-1)[0, a] + second.float().log_softmax(-1)[0, processor.tokenizer.eos_id]
    assert one_token == pytest.approx(float(expected), abs=1e-5)
    assert eos_only == pytest.approx(float(first.float().log_softmax(-1)[0, processor.tokenizer.eos_id]), abs=1e-5)


def test_classify_ranks_the_choices_by_score(loaded, images):
    model, processor, _ = loaded
    choices = ["a red circle", "3", "yes", "no"]
    encoded = []
    handle = model.vision_tower.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    try:
        results = classify(model, processor, images[:2], "answer en what is this?", choices, batch_size=3)
    finally:
        handle.remove()
    assert encoded == [2]  # each image once, not once per choice
    for image, result in zip(images[:2], results):
        expected = score(model, processor, [image] * 4, "answer en what is this?", choices)
        torch.testing.assert_close(torch.tensor([result.scores[c] for c in choices]), torch.tensor(expected))
        assert result.label == choices[max(range(4), key=lambda i: expected[i])]
        assert sum(result.probabilities.values()) == pytest.approx(1.0)
        assert max(result.probabilities, key=result.probabilities.get) == result.label


@pytest.mark.parametrize("call, message", [
    (lambda m, p, im: score(m, p, im, PROMPTS, ANSWERS[:2]), "one prompt per answer"),
    (lambda m, p, im: score(m, p, im, PROMPTS, ANSWERS, normalize="max"), "normalize"),
    (lambda m, p, im: score(m, p, im, PROMPTS, ANSWERS, batch_size=0), "batch_size"),
    (lambda m, p, im: classify(m, p, im, "caption en", ["yes", "yes"]), "distinct"),
    (lambda m, p, im: classify(m, p, im, ["a", "b"], ["yes", "no"]), "one per image"),
])
def test_bad_arguments_are_usage_errors(loaded, images, call, message):
    model, processor, _ = loaded
    with pytest.raises(paligemma.UsageError, match=message):
        call(model, processor, images)
