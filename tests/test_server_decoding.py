"""The server's decoding options (issue 19) against the library on a tiny model: `n`, `logprobs` and
`top_logprobs` in OpenAI's shapes through the official `openai` client (streaming and not), detection
scores with `min_score` / `nms_iou`, constrained decoding by default for detect prompts, the example image.

Every answer is compared with `generate_detailed` on the same model and settings, which the
server must reproduce exactly (each of the `n` answers is its own row of the running batch).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_helpers import image_message, png_data_uri, running_server, serve_process  # noqa: E402

from paligemma import generate_detailed, load_model, load_processor  # noqa: E402
from paligemma.server.app import EXAMPLE_IMAGE, ServerSettings, create_app  # noqa: E402
from paligemma.server.batcher import BatchEngine  # noqa: E402
from paligemma.tasks import filter_detections, parse_detections  # noqa: E402

MAX_TOKENS = 12
DETECT = "detect circle ; square"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def photo(skimage_photos):
    return skimage_photos["coffee"].convert("RGB").resize((48, 40))


def _serve(tiny, **settings):
    model, processor = tiny
    engine = BatchEngine(model, processor, max_batch_size=8, image_cache_size=4, batch_window_s=0.02)
    return running_server(create_app(engine, ServerSettings(model_name="tiny", **settings)))


@pytest.fixture(scope="module")
def server(tiny):
    with _serve(tiny) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def _library(tiny, photo, prompt, **options):
    model, processor = tiny
    options.setdefault("max_new_tokens", MAX_TOKENS)
    return generate_detailed(model, processor, [photo], [prompt], **options)


def _check_logprobs(content, expected, top: int):
    """An OpenAI logprobs `content` list against a library GenerationResult, token by token."""
    assert len(content) == len(expected.token_ids)
    for entry, logprob, alternatives in zip(content, expected.logprobs, expected.top_logprobs or [[]] * len(content)):
        assert entry["logprob"] == pytest.approx(logprob, abs=1e-5)
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", "backslashreplace")
        # Equal up to float32 rounding: the server prefills each row alone, the library once per prompt.
        expected_top = [lp for _, lp in alternatives][:top]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(expected_top, abs=1e-5)
        assert len(entry["top_logprobs"]) == min(top, len(alternatives))


def _dump(obj):
    return obj.model_dump() if hasattr(obj, "model_dump") else obj


# ---------------------------------------------------------------------- n, logprobs, top_logprobs

def test_n_answers_with_logprobs_equal_the_library(client, tiny, photo):
    options = dict(n=3, temperature=0.9, seed=7, top_logprobs=3)
    expected = _library(tiny, photo, "caption en", **options)
    response = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, n=3, temperature=0.9, seed=7,
                                              logprobs=True, top_logprobs=3,
                                              messages=image_message("caption en", png_data_uri(photo)))
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [r.text for r in expected]
    assert len({r.text for r in expected}) > 1  # seeded answers differ: each has its own seed
    for choice, result in zip(response.choices, expected):
        _check_logprobs([_dump(e) for e in choice.logprobs.content], result, top=3)
    assert response.usage.prompt_tokens == expected[0].prompt_tokens
    assert response.usage.completion_tokens == sum(len(r.token_ids) for r in expected)


def test_logprobs_without_top_and_none_unless_asked(client, tiny, photo):
    [expected] = _library(tiny, photo, "caption en")
    messages = image_message("caption en", png_data_uri(photo))
    response = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, logprobs=True, messages=messages)
    _check_logprobs([_dump(e) for e in response.choices[0].logprobs.content], expected, top=0)
    plain = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, messages=messages)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == expected.text


def test_streamed_n_answers_and_logprobs_equal_the_library(client, tiny, photo):
    expected = _library(tiny, photo, "caption en", n=2, temperature=0.8, seed=3, top_logprobs=2)
    stream = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, n=2, temperature=0.8, seed=3,
                                            logprobs=True, top_logprobs=2, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=image_message("caption en", png_data_uri(photo)))
    text, content, finish, usage = {0: "", 1: ""}, {0: [], 1: []}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                content[choice.index] += [_dump(e) for e in choice.logprobs.content]
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert [text[0], text[1]] == [r.text for r in expected]
    for index, result in enumerate(expected):
        _check_logprobs(content[index], result, top=2)
        assert finish[index] == {"eos": "stop", "stop_string": "stop", "length": "length"}[result.finish_reason]
    assert usage.completion_tokens == sum(len(r.token_ids) for r in expected)


@pytest.mark.parametrize("field, value", [("n", 0), ("n", 9), ("top_logprobs", 21), ("top_logprobs", -1)])
def test_out_of_range_settings_are_400(server, photo, field, value):
    body = {"model": "tiny", "logprobs": True, field: value,
            "messages": image_message("caption en", png_data_uri(photo))}
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == field


def test_top_logprobs_needs_logprobs(server, photo):
    body = {"model": "tiny", "top_logprobs": 2, "messages": image_message("caption en", png_data_uri(photo))}
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


# ---------------------------------------------------------------------- constrained decoding, detection scores

def _post(url, photo, prompt=DETECT, **fields):
    body = {"model": "tiny", "max_tokens": MAX_TOKENS, "messages": image_message(prompt, png_data_uri(photo)), **fields}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"]


def test_detect_prompts_are_constrained_by_default_and_scored(server, tiny, photo):
    [constrained] = _library(tiny, photo, DETECT, constrain=True)
    [raw] = _library(tiny, photo, DETECT)
    assert constrained.text != raw.text  # the random tiny model writes no well-formed answer on its own
    [choice] = _post(server, photo)
    assert choice["message"]["content"] == constrained.text
    found = parse_detections(constrained.text, photo.size, constrained.token_spans())
    assert found.objects and not found.errors
    assert choice["paligemma"]["detections"] == [pytest.approx(d.as_json()) for d in found.objects]
    assert all(0 < d["score"] <= 1 for d in choice["paligemma"]["detections"])

    [unconstrained] = _post(server, photo, constrain=False)
    assert unconstrained["message"]["content"] == raw.text


def test_min_score_and_nms_filter_the_scored_boxes(server, tiny, photo):
    sampled = dict(temperature=1.0, max_tokens=40)
    for seed in range(50):  # the first seed whose sampled answer holds several boxes
        [constrained] = _library(tiny, photo, DETECT, constrain=True, max_new_tokens=40, temperature=1.0, seed=seed)
        objects = parse_detections(constrained.text, photo.size, constrained.token_spans()).objects
        if len({d.score for d in objects}) >= 3:
            break
    else:
        pytest.fail("no seed gave an answer with three differently scored boxes")
    threshold = sorted(d.score for d in objects)[len(objects) // 2]
    for fields in ({}, {"min_score": threshold}, {"nms_iou": 0.0}, {"min_score": 0.0, "nms_iou": 0.5}):
        [choice] = _post(server, photo, seed=seed, **sampled, **fields)
        expected = filter_detections(objects, fields.get("min_score"), fields.get("nms_iou"))
        assert choice["paligemma"]["detections"] == [pytest.approx(d.as_json()) for d in expected]
    [choice] = _post(server, photo, seed=seed, min_score=threshold, **sampled)
    assert 0 < len(choice["paligemma"]["detections"]) < len(objects)


def test_constrained_streaming_with_n_equals_the_library(server, tiny, photo):
    expected = _library(tiny, photo, DETECT, constrain=True, n=2, temperature=1.0, seed=11)
    body = {"model": "tiny", "max_tokens": MAX_TOKENS, "n": 2, "temperature": 1.0, "seed": 11, "stream": True,
            "messages": image_message(DETECT, png_data_uri(photo))}
    text, extensions = {0: "", 1: ""}, {}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text[choice["index"]] += choice["delta"].get("content") or ""
                    if "paligemma" in choice:
                        extensions[choice["index"]] = choice["paligemma"]
    assert [text[0], text[1]] == [r.text for r in expected]
    for index, result in enumerate(expected):
        assert extensions[index]["detection_errors"] == []
        scores = [d.score for d in parse_detections(result.text, photo.size, result.token_spans()).objects]
        assert [d["score"] for d in extensions[index]["detections"]] == pytest.approx(scores)


def test_constrain_true_on_a_caption_prompt_is_400(server, photo):
    body = {"model": "tiny", "constrain": True, "messages": image_message("caption en", png_data_uri(photo))}
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "constrain"


def test_the_serve_flag_turns_the_default_off(tiny, photo):
    [raw] = _library(tiny, photo, DETECT)
    [constrained] = _library(tiny, photo, DETECT, constrain=True)
    with _serve(tiny, constrain=False) as url:
        assert _post(url, photo)[0]["message"]["content"] == raw.text
        assert _post(url, photo, constrain=True)[0]["message"]["content"] == constrained.text


def test_serve_no_constrain_and_max_n_flags(tiny_checkpoint_dir, tiny, photo):
    [raw] = _library(tiny, photo, DETECT)
    with serve_process(tiny_checkpoint_dir, "--no-constrain", "--max-n", "2", "--log-level", "warning") as (url, _):
        assert _post(url, photo)[0]["message"]["content"] == raw.text
        assert len(_post(url, photo, n=2)) == 2
        body = {"model": "tiny", "n": 3, "messages": image_message(DETECT, png_data_uri(photo))}
        response = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"


# ---------------------------------------------------------------------- in a running batch

def test_constrained_sampled_and_logprob_rows_share_a_batch_and_answer_as_alone(tiny, photo, monkeypatch):
    """Requests with every option at once overlap in the running batch (decode steps slowed down),
    one prefilled in pieces of layers; each answer equals the library's for that request alone."""
    model, processor = tiny
    requests = [dict(prompt=DETECT, n=2, temperature=1.0, seed=5),
                dict(prompt="caption en", logprobs=True, top_logprobs=2),
                dict(prompt=DETECT, constrain=False),
                dict(prompt="segment circle", temperature=0.7, seed=2, max_tokens=24)]
    library = [dict(constrain=True, n=2, temperature=1.0, seed=5), dict(top_logprobs=2), dict(),
               dict(constrain=True, temperature=0.7, seed=2, max_new_tokens=24)]
    expected = [_library(tiny, photo, r["prompt"], **options) for r, options in zip(requests, library)]
    original = model.decode_step

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "decode_step", slow)
    engine = BatchEngine(model, processor, max_batch_size=8, batch_window_s=0, prefill_layers_per_step=2)
    answers = [None] * len(requests)
    with running_server(create_app(engine, ServerSettings(model_name="tiny"))) as url:
        def ask(i):
            fields = {k: v for k, v in requests[i].items() if k != "prompt"}
            answers[i] = _post(url, photo, requests[i]["prompt"], **fields)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
            time.sleep(0.05)  # staggered: later requests join a running batch
        for thread in threads:
            thread.join(120)
    assert engine.stats()["max_batch_size"] >= 3
    for choices, results in zip(answers, expected):
        assert [c["message"]["content"] for c in choices] == [r.text for r in results]
    _check_logprobs(answers[1][0]["logprobs"]["content"], expected[1][0], top=2)
    assert all(not c["paligemma"]["detection_errors"] for c in answers[0])


# ---------------------------------------------------------------------- the web page's example image

def test_example_image_is_served(server):
    response = httpx.get(server + "/example.png", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == EXAMPLE_IMAGE.read_bytes()
    page = httpx.get(server + "/", timeout=30).text
    assert 'id="example"' in page and "/example.png" in page
