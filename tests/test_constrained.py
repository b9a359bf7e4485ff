"""Constrained decoding: the answer-grammar state machine, on random walks, random tiny models and the demo model."""

import random

import pytest
import torch
from decoding_helpers import tiny_pair

import paligemma
from paligemma.cli_common import DEMO_MASK_CODEC, DEMO_MODEL_DIR
from paligemma.constrained import DONE, AnswerGrammar
from paligemma.demo.recipe import EVAL_SEED0
from paligemma.demo.scenes import SHAPES, detect_prompt, generate_scene, segment_prompt
from paligemma.generation import generate_detailed
from paligemma.segmentation import parse_segmentations
from paligemma.tasks import format_detections, parse_detections, prompt_labels, prompt_task

DETECT = "detect red circle ; square"
SEGMENT = "segment star ; red circle"
SIZE = (640, 480)


@pytest.fixture(scope="module")
def tokenizer(spm_model_path):
    return paligemma.Tokenizer.from_file(spm_model_path)


@pytest.fixture(scope="module")
def codec():
    return paligemma.load_mask_codec(DEMO_MASK_CODEC)


def _problems(text: str, prompt: str, codec) -> list[str]:
    """Why an answer to `prompt` is not well formed: parse errors and labels the prompt did not ask for."""
    parsed = parse_detections(text, SIZE) if prompt_task(prompt) == "detect" else parse_segmentations(text, SIZE, codec)
    labels = set(prompt_labels(prompt))
    return parsed.errors + [f"label {o.label!r} not asked for" for o in parsed.objects if o.label not in labels]


def _random_walk(grammar: AnswerGrammar, budget: int, rng: random.Random) -> list[int]:
    """Random allowed tokens until <eos> (rarely chosen while something else is allowed)."""
    state, tokens = grammar.start(), []
    while state != DONE:
        allowed = grammar.allowed(state, budget - len(tokens)).nonzero()[:, 0].tolist()
        others = [t for t in allowed if t != grammar.eos]
        ends = grammar.eos in allowed and (not others or rng.random() < 0.15)
        token = grammar.eos if ends else rng.choice(others)
        tokens.append(token)
        state = grammar.advance(state, token)
    return tokens


@pytest.mark.parametrize("prompt", [DETECT, SEGMENT, "detect square", "segment red circle"])
def test_every_random_walk_is_a_well_formed_answer_within_its_budget(tokenizer, codec, prompt):
    grammar = AnswerGrammar.for_prompt(tokenizer, prompt)
    rng = random.Random(0)
    lengths = []
    for _ in range(150):
        budget = rng.randint(1, 80)
        tokens = _random_walk(grammar, budget, rng)
        assert len(tokens) <= budget and tokens[-1] == tokenizer.eos_id and grammar.accepts(tokens)
        text = tokenizer.decode(tokens)
        assert _problems(text, prompt, codec) == [], text
        lengths.append(len(tokens))
    assert max(lengths) > 30  # several objects were written, not just empty answers


def test_well_formed_answers_are_accepted_and_malformed_ones_refused(tokenizer):
    grammar = AnswerGrammar.for_prompt(tokenizer, DETECT)
    eos = [tokenizer.eos_id]
    good = format_detections([("red circle", [10, 20, 30, 40]), ("square", [0, 0, 640, 480]),
                              ("square", [5, 5, 5, 5])], SIZE)
    assert grammar.accepts(tokenizer.encode(good) + eos)
    assert grammar.accepts(eos)  # nothing found
    for bad in ["<loc0100><loc0200><loc0300> square",  # three locations
                "<loc0300><loc0200><loc0100><loc0400> square",  # y_min > y_max
                "<loc0100><loc0200><loc0300><loc0400> triangle",  # a label nobody asked for
                "<loc0100><loc0200><loc0300><loc0400>",  # no label
                "<loc0100><loc0200><loc0300><loc0400> red"]:  # half a label
        assert not grammar.accepts(tokenizer.encode(bad) + eos), bad
    assert not grammar.accepts(tokenizer.encode(good))  # no <eos>
    segment = AnswerGrammar.for_prompt(tokenizer, "segment square")
    seg = "".join(f"<seg{i:03d}>" for i in range(16))
    assert segment.accepts(tokenizer.encode(f"<loc0100><loc0200><loc0300><loc0400>{seg} square") + eos)
    assert not segment.accepts(tokenizer.encode(f"<loc0100><loc0200><loc0100><loc0400>{seg} square") + eos)  # flat
    assert not segment.accepts(tokenizer.encode(f"<loc0100><loc0200><loc0300><loc0400>{seg[:-8]} square") + eos)


def test_a_short_budget_only_allows_what_can_still_be_finished(tokenizer):
    grammar = AnswerGrammar.for_prompt(tokenizer, "detect square")  # an object + <eos> is 4 + 1 + 1 tokens
    assert grammar.allowed(grammar.start(), 5).nonzero()[:, 0].tolist() == [tokenizer.eos_id]
    assert int(grammar.allowed(grammar.start(), 6).sum()) == 1 + 1024
    state = grammar.start()
    for value in (1000, 10):
        state = grammar.advance(state, tokenizer.loc_id(value))
    assert grammar.allowed(state, 10)[tokenizer.loc_id(1000):tokenizer.loc_id(1023) + 1].all()
    assert not grammar.allowed(state, 10)[tokenizer.loc_id(0):tokenizer.loc_id(1000)].any()  # y_max >= y_min


@pytest.mark.parametrize("prompt, message", [("caption en", "detect and segment"), ("detect", "labels"),
                                             ("detect a<loc0001>", "label")])
def test_prompts_without_a_grammar_are_usage_errors(tokenizer, prompt, message):
    with pytest.raises(paligemma.UsageError, match=message):
        AnswerGrammar.for_prompt(tokenizer, prompt)


# ---------------------------------------------------------------------- random tiny models


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def tiny(request, tmp_path_factory, spm_model_path, spm_layout):
    model, processor, _ = tiny_pair(tmp_path_factory.mktemp(f"constrained-{request.param}"), request.param,
                                    spm_model_path, spm_layout)
    return model, processor


def test_constrained_answers_of_random_models_all_parse(tiny, skimage_photos, codec):
    model, processor = tiny
    images = [skimage_photos[name] for name in ("astronaut", "coffee", "chelsea", "camera")]
    prompts = [DETECT, SEGMENT, "detect square", "segment red circle"]
    answers = []
    for settings in (dict(), dict(temperature=1.0, seed=[1, 2, 3, 4]), dict(temperature=2.0, top_k=50, seed=9)):
        for max_new_tokens in (5, 24, 60):
            answers += generate_detailed(model, processor, images, prompts, max_new_tokens=max_new_tokens,
                                         constrain=True, **settings)
    answers += generate_detailed(model, processor, images, prompts, max_new_tokens=40, constrain=True, num_beams=3)
    for index, result in enumerate(answers):
        assert _problems(result.text, prompts[index % 4], codec) == [], result.text
        assert result.finish_reason == "eos"  # the budget is respected: nothing is cut off
    assert sum(result.text.count(";") for result in answers) > 3  # answers of several objects
    unconstrained = generate_detailed(model, processor, images, prompts, max_new_tokens=24)
    assert sum(bool(_problems(r.text, p, codec)) for r, p in zip(unconstrained, prompts)) >= 2


def test_unconstrained_rows_are_unchanged_beside_constrained_ones(tiny, skimage_photos):
    model, processor = tiny
    images = [skimage_photos["astronaut"], skimage_photos["coffee"]]
    mixed = generate_detailed(model, processor, images, [DETECT, DETECT], max_new_tokens=16, constrain=[True, False],
                              temperature=[0.0, 1.0], seed=[None, 4])
    plain = generate_detailed(model, processor, images[1:], [DETECT], max_new_tokens=16, temperature=1.0, seed=4)[0]
    assert mixed[1].token_ids == plain.token_ids
    torch.testing.assert_close(torch.tensor(mixed[1].logprobs), torch.tensor(plain.logprobs))  # batch shapes differ
    assert mixed[0].token_ids != mixed[1].token_ids


def test_constrained_logprobs_are_those_of_the_allowed_tokens(tiny, skimage_photos):
    """Under a constraint a token's probability is renormalised over the allowed tokens, so it is never lower."""
    model, processor = tiny
    image = [skimage_photos["chelsea"]]
    constrained = generate_detailed(model, processor, image, ["detect square"], max_new_tokens=8, constrain=True,
                                    top_logprobs=3)[0]
    first_allowed = {t for t, _ in constrained.top_logprobs[0]}
    assert all(processor.tokenizer.is_loc(t) or t == processor.tokenizer.eos_id for t in first_allowed)
    assert sum(torch.tensor([lp for _, lp in constrained.top_logprobs[0]]).exp()) <= 1.0 + 1e-6


# ---------------------------------------------------------------------- the demo model


@pytest.fixture(scope="module")
def demo():
    return paligemma.load_model(DEMO_MODEL_DIR), paligemma.load_processor(DEMO_MODEL_DIR)


def test_demo_model_constrained_answers_parse_on_held_out_scenes(demo, codec):
    """Single- and multi-class detect and segment prompts on 16 held-out scenes: every answer is well formed,
    and the boxes carry scores (small ones: a loc token shares its probability with the neighbouring bins)."""
    model, processor = demo
    rng = random.Random(0)
    images, prompts = [], []
    for index in range(16):
        scene = generate_scene(EVAL_SEED0 + 40_000 + index)
        present = sorted({o.shape for o in scene.objects})
        labels = rng.sample(SHAPES, rng.choice([2, 3]))
        for prompt in [detect_prompt(s) for s in SHAPES] + [detect_prompt(labels), segment_prompt(present[0]),
                                                             segment_prompt(rng.sample(SHAPES, 2))]:
            images.append(scene.image)
            prompts.append(prompt)
    scored = []
    for start in range(0, len(prompts), 64):
        chunk = slice(start, start + 64)
        results = generate_detailed(model, processor, images[chunk], prompts[chunk], max_new_tokens=64, constrain=True)
        for result, prompt in zip(results, prompts[chunk]):
            assert _problems(result.text, prompt, codec) == [], (prompt, result.text)
            if prompt_task(prompt) == "detect":
                scored += [d.score for d in parse_detections(result.text, SIZE, result.token_spans()).objects]
    assert len(scored) > 40 and all(0 < s <= 1 for s in scored)
