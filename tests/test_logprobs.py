"""Per-token log-probabilities, top alternatives, n / best_of, and detection scores built on them."""

import json
import math

import pytest
import torch
from decoding_helpers import photos_fixture, tiny_pair_fixture

import paligemma
from paligemma.generation import generate_detailed, stream_generate
from paligemma.metrics import box_iou
from paligemma.sampling import SamplingParams, choice_seed, filter_logits
from paligemma.tasks import Detection, TokenSpan, filter_detections, parse_detections

PROMPTS = ["caption en", "answer en how many circles are there?", "detect red circle"]


loaded = tiny_pair_fixture("logprobs")
images = photos_fixture()


def _teacher_forced_logits(model, processor, image, prompt, tokens):
    """Our logits (len(tokens), V) before each generated token, from one full forward pass."""
    inputs = processor(images=[image], prompts=[prompt])
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    types = torch.cat([inputs["token_type_ids"], torch.ones(1, len(tokens), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids),
                       token_type_ids=types).logits[0]
    start = inputs["input_ids"].shape[1] - 1
    return logits[start:start + len(tokens)]


def test_greedy_logprobs_equal_transformers_transition_scores(loaded, images):
    model, processor, reference = loaded
    inputs = processor(images=images, prompts=PROMPTS)
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=10, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        expected = reference.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    results = generate_detailed(model, processor, images, PROMPTS, max_new_tokens=10)
    generated = out.sequences[:, inputs["input_ids"].shape[1]:]
    for row, result in enumerate(results):
        count = len(result.token_ids)
        assert result.token_ids == generated[row, :count].tolist()
        assert len(result.logprobs) == count
        torch.testing.assert_close(torch.tensor(result.logprobs), expected[row, :count], atol=1e-5, rtol=1e-5)


def test_top_logprobs_are_the_best_alternatives_of_the_same_distribution(loaded, images):
    model, processor, _ = loaded
    result = generate_detailed(model, processor, images[:1], PROMPTS[:1], max_new_tokens=6, top_logprobs=4)[0]
    logits = _teacher_forced_logits(model, processor, images[0], PROMPTS[0], result.token_ids)
    for step, (token, logprob, top) in enumerate(zip(result.token_ids, result.logprobs, result.top_logprobs)):
        best = torch.topk(logits[step].float().log_softmax(-1), 4)
        assert [t for t, _ in top] == best.indices.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in top]), best.values, atol=1e-5, rtol=0)
        assert top[0] == (token, pytest.approx(logprob))  # greedy: the chosen token is the best one
    plain = generate_detailed(model, processor, images[:1], PROMPTS[:1], max_new_tokens=6)[0]
    assert plain.top_logprobs is None and plain.token_ids == result.token_ids


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_k=5), dict(temperature=1.5, top_p=0.6),
                                      dict(temperature=1.0)])
def test_sampled_logprobs_come_from_the_filtered_distribution(loaded, images, settings):
    model, processor, _ = loaded
    result = generate_detailed(model, processor, images[1:2], PROMPTS[1:2], max_new_tokens=8, seed=3, top_logprobs=8,
                               **settings)[0]
    logits = _teacher_forced_logits(model, processor, images[1], PROMPTS[1], result.token_ids)
    params = SamplingParams(**settings)
    distributions = filter_logits(logits, params).log_softmax(-1)  # (steps, V)
    chosen = distributions.gather(1, torch.tensor(result.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result.logprobs), chosen, atol=1e-5, rtol=1e-5)
    for step, top in enumerate(result.top_logprobs):
        drawable = int(torch.isfinite(distributions[step]).sum())
        assert len(top) == min(8, drawable)  # filtered-out tokens are not offered as alternatives
    if "top_k" in settings:
        assert all(len(top) == settings["top_k"] for top in result.top_logprobs)


def test_n_answers_share_one_prefill_and_each_has_its_own_seed(loaded, images, monkeypatch):
    model, processor, _ = loaded
    settings = dict(max_new_tokens=8, temperature=3.0, top_k=100)
    prefilled = []
    original = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids, *a, **k: prefilled.append(ids.shape[0]) or original(ids, *a, **k))
    results = generate_detailed(model, processor, images[:2], PROMPTS[:2], n=3, seed=[11, 12], **settings)
    assert prefilled == [2] and len(results) == 6
    monkeypatch.setattr(model, "prefill", original)
    for index, result in enumerate(results):
        prompt, choice = divmod(index, 3)
        alone = generate_detailed(model, processor, [images[prompt]], [PROMPTS[prompt]],
                                  seed=choice_seed([11, 12][prompt], choice), **settings)[0]
        assert alone.token_ids == result.token_ids
    assert len({tuple(r.token_ids) for r in results[:3]}) > 1  # the answers differ
    assert choice_seed(11, 0) == 11 and choice_seed(None, 2) is None


def test_stream_events_name_the_prompt_and_the_choice(loaded, images):
    model, processor, _ = loaded
    finals = {}
    for event in stream_generate(model, processor, images[:2], PROMPTS[:2], max_new_tokens=5, n=[2, 1],
                                 temperature=1.0, seed=1):
        if event.result is not None:
            finals[event.index, event.choice] = event.result
    assert sorted(finals) == [(0, 0), (0, 1), (1, 0)]


def test_best_of_keeps_the_most_likely_answers(loaded, images):
    model, processor, _ = loaded
    settings = dict(max_new_tokens=8, temperature=3.0, top_k=100, seed=5)
    drawn = generate_detailed(model, processor, images[:1], PROMPTS[:1], n=5, **settings)
    best = generate_detailed(model, processor, images[:1], PROMPTS[:1], n=2, best_of=5, **settings)
    ranked = sorted(drawn, key=lambda r: -r.total_logprob)
    assert [r.token_ids for r in best] == [r.token_ids for r in ranked[:2]]
    assert best[0].total_logprob >= best[1].total_logprob
    with pytest.raises(paligemma.UsageError, match="best_of"):
        generate_detailed(model, processor, images[:1], PROMPTS[:1], n=3, best_of=2)
    with pytest.raises(paligemma.UsageError, match="n must be"):
        generate_detailed(model, processor, images[:1], PROMPTS[:1], n=0)


def test_token_spans_cover_the_text(loaded, images):
    model, processor, _ = loaded
    result = generate_detailed(model, processor, images[:1], PROMPTS[:1], max_new_tokens=12)[0]
    spans = result.token_spans()
    assert len(spans) == len(result.token_ids) and spans[0].start == 0 and spans[-1].end == len(result.text)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    rebuilt = "".join(result.text[s.start:s.end] for s in spans)
    assert rebuilt == result.text


# ---------------------------------------------------------------------- detection scores


def _spans(tokenizer, answer, logprobs):
    """TokenSpans of `answer` + <eos> as generation reports them, with the given log-prob per token."""
    ids = tokenizer.encode(answer) + [tokenizer.eos_id]
    assert len(ids) == len(logprobs)
    ends = [len(tokenizer.decode(ids[:i + 1])) for i in range(len(ids))]
    return ids, [TokenSpan(s, e, lp) for s, e, lp in zip([0] + ends[:-1], ends, logprobs)]


def test_detection_score_is_the_product_of_its_loc_and_label_token_probabilities(spm_model_path):
    tokenizer = paligemma.Tokenizer.from_file(spm_model_path)
    answer = "<loc0100><loc0200><loc0300><loc0400> red circle ; <loc0010><loc0020><loc0030><loc0040> square"
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(answer)]
    # This tokenizer spells " ; " as three pieces (";" by byte fallback): none of them is the label's.
    assert pieces[4:9] == ["▁red", "▁circle", "▁", "<0x3B>", "▁"] and pieces[13:] == ["▁square"]
    logprobs = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -5.0, -6.0, -4.0, -0.01, -0.02, -0.03, -0.04, -0.05, -7.0]
    _, spans = _spans(tokenizer, answer, logprobs)
    result = parse_detections(answer, (1023, 1023), spans)
    first, second = result.objects
    assert first.score == pytest.approx(math.exp(-(0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 0.6)))  # not " ;", " " or <eos>
    assert second.score == pytest.approx(math.exp(-(0.01 + 0.02 + 0.03 + 0.04 + 0.05)))
    assert first.as_json() == {"label": "red circle", "box": first.box, "score": first.score}
    label, box = first  # still unpacks as a (label, box) pair
    assert (label, box) == ("red circle", [200.0, 100.0, 400.0, 300.0])
    assert parse_detections(answer, (1023, 1023)).objects[0].score is None


def test_min_score_and_per_label_nms():
    boxes = [Detection("cat", [0, 0, 10, 10], 0.9), Detection("cat", [1, 1, 11, 11], 0.8),
             Detection("dog", [1, 1, 11, 11], 0.7), Detection("cat", [50, 50, 60, 60], 0.2)]
    assert box_iou(boxes[0].box, boxes[1].box) == pytest.approx(81 / 119)
    assert filter_detections(boxes) == boxes  # off by default
    assert filter_detections(boxes, min_score=0.5) == boxes[:3]
    assert filter_detections(boxes, nms_iou=0.5) == [boxes[0], boxes[2], boxes[3]]  # the dog box overlaps, kept
    assert filter_detections(boxes, min_score=0.5, nms_iou=0.9) == boxes[:3]
    with pytest.raises(ValueError, match="scores"):
        filter_detections([Detection("cat", [0, 0, 1, 1])], min_score=0.1)


# ---------------------------------------------------------------------- the command line (bundled demo model)


def _cli_json(capsys, prompt, *extra):
    from paligemma import cli

    code = cli.main(["generate", "--prompt", prompt, "--no-optimize", "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_cli_json_has_logprobs_and_scored_detections(capsys):
    record = _cli_json(capsys, "detect circle", "--top-logprobs", "2")
    assert len(record["logprobs"]) == len(record["tokens"]) and all(lp <= 0 for lp in record["logprobs"])
    assert all(1 <= len(step) <= 2 and {"id", "token", "logprob"} == set(step[0]) for step in record["top_logprobs"])
    assert record["detections"] and all(0 < d["score"] <= 1 for d in record["detections"])
    assert _cli_json(capsys, "detect circle", "--min-score", "1")["detections"] == []  # no box is that sure
    assert _cli_json(capsys, "detect circle", "--nms-iou", "0.5")["detections"] == record["detections"]  # apart


def test_cli_beam_search_and_constrain_give_the_library_answers(capsys):
    from paligemma.cli_common import DEMO_MODEL_DIR, EXAMPLE_IMAGE

    model, processor = paligemma.load_model(DEMO_MODEL_DIR), paligemma.load_processor(DEMO_MODEL_DIR)
    image = [paligemma.load_image(EXAMPLE_IMAGE)]
    record = _cli_json(capsys, "caption en", "--num-beams", "3", "--length-penalty", "0.5")
    expected = generate_detailed(model, processor, image, ["caption en"], num_beams=3, length_penalty=0.5)[0]
    assert (record["tokens"], record["beam_score"]) == (expected.token_ids, pytest.approx(expected.beam_score))
    prompt = "detect triangle ; circle"
    record = _cli_json(capsys, prompt, "--constrain")
    expected = generate_detailed(model, processor, image, [prompt], constrain=True)[0]
    assert record["tokens"] == expected.token_ids and record["detection_errors"] == []


@pytest.mark.parametrize("extra, phrase", [
    (["--prompt", "caption en", "--min-score", "0.5"], "detect prompts"),
    (["--prompt", "detect cat", "--nms-iou", "2"], "[0, 1]"),
    (["--prompt", "caption en", "--constrain"], "detect and segment"),
    (["--prompt", "caption en", "--stream", "--num-beams", "2"], "--stream"),
    (["--prompt", "caption en", "--best-of", "3"], "--temperature"),
    (["--prompt", "caption en", "--top-logprobs", "3"], "--json"),
    (["--prompt", "caption en", "--num-beams", "0"], "--num-beams"),
])
def test_cli_refuses_decoding_options_that_cannot_apply(capsys, extra, phrase):
    from paligemma import cli

    code = cli.main(["generate", *extra])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and phrase in err and err.startswith("error: ")
