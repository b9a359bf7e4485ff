"""The HTTP server against a tiny model: the official `openai` client, raw HTTP, batching, errors.

A server runs in a background thread on 127.0.0.1; answers are compared with the library's own
`generate_detailed` on the same model, which the server must reproduce exactly.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from server_helpers import detect_script, force_tokens, image_message, png_data_uri, running_server  # noqa: E402

from paligemma import generate_detailed, load_model, load_processor  # noqa: E402
from paligemma.server.app import ServerSettings, create_app  # noqa: E402
from paligemma.server.batcher import BatchEngine  # noqa: E402
from paligemma.server.schemas import RequestLimits  # noqa: E402

MAX_TOKENS = 8
CAP = 64


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def photos(skimage_photos):
    """Small non-square RGB test images (PNG data URIs stay a few KB)."""
    return {name: image.convert("RGB").resize((48, 40)) for name, image in skimage_photos.items()}


@pytest.fixture(scope="module")
def server(tiny):
    """(base_url, engine) of a server with a short batch window, a 2 MiB body and a 100k-pixel image limit."""
    model, processor = tiny
    engine = BatchEngine(model, processor, max_batch_size=8, image_cache_size=4, batch_window_s=0.02)
    settings = ServerSettings(model_name="tiny", max_body_bytes=2 * 1024 * 1024, max_image_pixels=100_000,
                              request=RequestLimits(max_tokens_cap=CAP, max_images=2))
    with running_server(create_app(engine, settings)) as url:
        yield url, engine


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _alone(tiny, image, prompt, **options):
    """The library's answer for one request, as the server must give it."""
    model, processor = tiny
    options.setdefault("max_new_tokens", MAX_TOKENS)
    return generate_detailed(model, processor, [image], [prompt], **options)[0]


def _slow_decoding(monkeypatch, model, seconds, eos_id=None):
    """Make every decode step take at least `seconds`, so requests overlap a running batch.

    With `eos_id`, that token is never chosen, so answers run to max_tokens.
    """
    original = model.decode_step

    def slow(*args, **kwargs):
        time.sleep(seconds)
        logits = original(*args, **kwargs)
        if eos_id is not None:
            logits[:, eos_id] = -1e4
        return logits

    monkeypatch.setattr(model, "decode_step", slow)


# ---------------------------------------------------------------------- basic API

def test_plain_completion_equals_the_library(client, tiny, photos):
    expected = _alone(tiny, photos["coffee"], "caption en")
    response = client.chat.completions.create(model="whatever", max_tokens=MAX_TOKENS,
                                              messages=image_message("caption en", png_data_uri(photos["coffee"])))
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == {"eos": "stop", "stop_string": "stop", "length": "length"}[expected.finish_reason]
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)


def test_content_as_string_with_image_in_an_earlier_message_and_system_ignored(client, tiny, photos):
    expected = _alone(tiny, photos["astronaut"], "answer en what is this?", max_new_tokens=5)
    uri = png_data_uri(photos["astronaut"])
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [{"type": "image_url", "image_url": uri}, {"type": "text", "text": "ocr"}]},
                {"role": "assistant", "content": "something"},
                {"role": "user", "content": "answer en what is this?"}]
    response = client.chat.completions.create(model="tiny", max_completion_tokens=5, messages=messages)
    assert response.choices[0].message.content == expected.text


def test_stop_string_and_sampling_with_seed(client, tiny, photos):
    full = _alone(tiny, photos["chelsea"], "caption en", max_new_tokens=12).text
    assert len(full) >= 4, full
    stop = full[2:4]
    expected = _alone(tiny, photos["chelsea"], "caption en", max_new_tokens=12, stop=[stop])
    response = client.chat.completions.create(model="tiny", max_tokens=12, stop=stop,
                                              messages=image_message("caption en", png_data_uri(photos["chelsea"])))
    assert response.choices[0].message.content == expected.text and response.choices[0].finish_reason == "stop"
    sampled = _alone(tiny, photos["chelsea"], "caption en", temperature=1.0, top_p=0.9, top_k=20, seed=7)
    response = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9,
                                              seed=7, extra_body={"top_k": 20},
                                              messages=image_message("caption en", png_data_uri(photos["chelsea"])))
    assert response.choices[0].message.content == sampled.text


def test_streaming_chunks_add_up_to_the_answer(client, tiny, photos):
    expected = _alone(tiny, photos["coffee"], "describe en")
    stream = client.chat.completions.create(model="tiny", max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=image_message("describe en", png_data_uri(photos["coffee"])))
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in content[:-1]] == [None] * (len(content) - 1)
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in content) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_raw_sse_ends_with_done(server, photos):
    body = {"model": "tiny", "max_tokens": 4, "stream": True,
            "messages": image_message("caption en", png_data_uri(photos["camera"]))}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_and_page(server):
    url = server[0]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    models = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<canvas" in page.text


# ---------------------------------------------------------------------- the detections extension

def test_detect_prompt_carries_boxes_in_original_pixels(server, client, tiny, photos, monkeypatch):
    model, processor = tiny
    calls = force_tokens(monkeypatch, model, detect_script(processor.tokenizer))
    width, height = photos["coffee"].size
    body = {"model": "tiny", "max_tokens": 16,
            "messages": image_message("detect circle", png_data_uri(photos["coffee"]))}
    choice = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["message"]["content"] == "<loc0100><loc0200><loc0500><loc0900> circle"
    box = [200 / 1023 * width, 100 / 1023 * height, 900 / 1023 * width, 500 / 1023 * height]
    # The scripted tokens have probability ~1, so the box's score (their product) is ~1.
    assert choice["paligemma"]["detections"] == [{"label": "circle", "box": pytest.approx(box),
                                                  "score": pytest.approx(1.0)}]
    assert choice["paligemma"]["detection_errors"] == []

    calls.clear()
    response = client.chat.completions.create(**body)
    assert response.choices[0].model_extra["paligemma"]["detections"][0]["label"] == "circle"
    calls.clear()
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["paligemma"]["detections"][0]["label"] == "circle"


def test_segment_prompt_carries_masks_when_the_server_has_a_codec(server, tiny, photos, monkeypatch):
    import torch

    from paligemma.segmentation import parse_segmentations, rle_to_mask
    from paligemma.vqvae import MaskCodec, MaskCodecConfig

    model, processor = tiny
    tokenizer = processor.tokenizer
    script = ([tokenizer.loc_id(v) for v in (100, 200, 500, 900)] + [tokenizer.seg_id(v) for v in range(40, 56)]
              + tokenizer.encode(" circle") + [tokenizer.eos_id])
    calls = force_tokens(monkeypatch, model, script)
    torch.manual_seed(0)
    codec = MaskCodec(MaskCodecConfig(num_codes=128, embed_dim=8, hidden=8)).eval()
    body = {"model": "tiny", "max_tokens": 32,
            "messages": image_message("segment circle", png_data_uri(photos["coffee"]))}

    # The shared server has no codec: the answer comes back as text, without a paligemma field.
    choice = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    answer = choice["message"]["content"]
    assert answer.endswith(" circle") and answer.count("<seg") == 16 and "paligemma" not in choice

    engine = BatchEngine(model, processor, max_batch_size=2, image_cache_size=0)
    with running_server(create_app(engine, ServerSettings(model_name="tiny"), mask_codec=codec)) as url:
        calls.clear()
        choice = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
        calls.clear()
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    expected = parse_segmentations(answer, photos["coffee"].size, codec)
    extension = choice["paligemma"]
    assert choice["message"]["content"] == answer
    scores = [segmentation.pop("score") for segmentation in extension["segmentations"]]
    assert scores == [pytest.approx(1.0)]  # the scripted tokens have probability ~1
    assert extension["segmentations"] == json.loads(json.dumps([o.as_json() for o in expected.objects]))
    assert extension["segmentation_errors"] == [] and extension["image_size"] == list(photos["coffee"].size)
    [segment] = extension["segmentations"]
    mask = rle_to_mask(segment["mask_rle"])
    assert segment["label"] == "circle" and mask.shape == photos["coffee"].size[::-1]
    extension["segmentations"][0]["score"] = scores[0]
    assert chunks[-1]["choices"][0]["paligemma"] == extension


# ---------------------------------------------------------------------- batching and caching

def test_concurrent_requests_are_batched_and_each_equals_its_answer_alone(server, tiny, photos, monkeypatch):
    url, engine = server
    names = ["coffee", "chelsea", "astronaut", "camera"]
    requests = [(name, prompt, seed) for name in names for prompt, seed in (("caption en", None), ("describe en", 3))]
    expected = {}
    for name, prompt, seed in requests:
        options = dict(temperature=0.9, seed=seed) if seed is not None else {}
        expected[name, prompt] = _alone(tiny, photos[name], prompt, **options).text
    _slow_decoding(monkeypatch, tiny[0], 0.01)
    before = engine.stats()
    answers, errors = {}, []

    def ask(name, prompt, seed):
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
            extra = dict(temperature=0.9, seed=seed) if seed is not None else {}
            response = client.chat.completions.create(
                model="tiny", max_tokens=MAX_TOKENS, messages=image_message(prompt, png_data_uri(photos[name])),
                **extra)
            answers[name, prompt] = response.choices[0].message.content
        except Exception as err:  # reported below, on the test's thread
            errors.append(err)

    threads = [threading.Thread(target=ask, args=r) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    assert answers == expected
    after = engine.stats()
    assert after["max_batch_size"] >= 2
    # Rows shared decode steps: fewer steps than tokens generated.
    assert after["decode_steps"] - before["decode_steps"] < after["generated_tokens"] - before["generated_tokens"]


def test_a_repeated_image_is_not_encoded_again(client, server, photos):
    engine = server[1]
    image = photos["camera"].rotate(90)  # bytes no other test sends
    messages = image_message("caption en", png_data_uri(image))
    before = engine.stats()
    first = client.chat.completions.create(model="tiny", max_tokens=4, messages=messages)
    middle = engine.stats()
    second = client.chat.completions.create(model="tiny", max_tokens=4, messages=messages)
    after = engine.stats()
    assert middle["image_cache_misses"] == before["image_cache_misses"] + 1
    assert after["image_cache_misses"] == middle["image_cache_misses"]
    assert after["image_cache_hits"] == middle["image_cache_hits"] + 1
    assert first.choices[0].message.content == second.choices[0].message.content


# ---------------------------------------------------------------------- cancellation

def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_stream_whose_client_leaves_stops_generating(server, tiny, photos, monkeypatch):
    url, engine = server
    _slow_decoding(monkeypatch, tiny[0], 0.05, eos_id=tiny[1].tokenizer.eos_id)
    before = engine.stats()
    body = {"model": "tiny", "max_tokens": CAP, "stream": True,
            "messages": image_message("caption en", png_data_uri(photos["coffee"]))}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():  # until the first content chunk: the batch runs; then hang up
            if '"content": "' in line and '"content": ""' not in line:
                break
    _wait_for(lambda: engine.stats().get("rows_cancelled", 0) > before.get("rows_cancelled", 0))
    assert engine.stats().get("completion_tokens", 0) == before.get("completion_tokens", 0)


def test_a_waiting_client_that_leaves_cancels_its_request(server, tiny, photos, monkeypatch):
    url, engine = server
    _slow_decoding(monkeypatch, tiny[0], 0.05, eos_id=tiny[1].tokenizer.eos_id)
    before = engine.stats()
    body = {"model": "tiny", "max_tokens": CAP,
            "messages": image_message("caption en", png_data_uri(photos["chelsea"]))}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    _wait_for(lambda: engine.stats().get("rows_cancelled", 0) > before.get("rows_cancelled", 0))
    assert engine.stats().get("completion_tokens", 0) == before.get("completion_tokens", 0)


# ---------------------------------------------------------------------- bad input

def _valid_body(photos) -> dict:
    return {"model": "tiny", "max_tokens": 4, "messages": image_message("caption en", png_data_uri(photos["coffee"]))}


def _with_prompt_parts(parts):
    return {"model": "tiny", "messages": [{"role": "user", "content": parts}]}


TEXT = {"type": "text", "text": "caption en"}
PNG_1PX = ("data:image/png;base64,"
           "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
TOO_MANY_PIXELS = png_data_uri(Image.new("RGB", (400, 300)))  # past the fixture's 100k-pixel limit
BAD_BODIES = {
    "not an object": ([1, 2], 400, None),
    "no messages": ({"model": "tiny"}, 400, "messages"),
    "empty messages": ({"messages": []}, 400, "messages"),
    "message not an object": ({"messages": ["hi"]}, 400, "messages[0]"),
    "bad role": ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    "content a number": ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "unknown part": (_with_prompt_parts([{"type": "audio"}]), 400, "messages[0].content[0]"),
    "text not a string": (_with_prompt_parts([{"type": "text", "text": 3}]), 400, "messages[0].content[0].text"),
    "no image": (_with_prompt_parts([TEXT]), 400, "messages"),
    "no text": (_with_prompt_parts([{"type": "image_url", "image_url": {"url": PNG_1PX}}]), 400,
                "messages[0].content"),
    "last message not user": ({"messages": [{"role": "user", "content": [TEXT]},
                                            {"role": "assistant", "content": "hi"}]}, 400, "messages[1].role"),
    "bad base64": (_with_prompt_parts([TEXT, {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
                   400, "messages"),
    "not an image": (_with_prompt_parts([TEXT, {"type": "image_url", "image_url": "data:text/plain;base64,aGVsbG8="}]),
                     400, "messages"),
    "remote image refused": (_with_prompt_parts([TEXT, {"type": "image_url", "image_url": "http://example.com/a.png"}]),
                             400, "messages"),
    "file url": (_with_prompt_parts([TEXT, {"type": "image_url", "image_url": "file:///etc/passwd"}]), 400, "messages"),
    "too many pixels": (_with_prompt_parts([TEXT, {"type": "image_url", "image_url": TOO_MANY_PIXELS}]), 400,
                        "messages"),
    "too many images": (_with_prompt_parts([TEXT] + [{"type": "image_url", "image_url": PNG_1PX}] * 3), 400,
                        "messages"),
    "image token in prompt": (_with_prompt_parts([{"type": "text", "text": "<image> caption"},
                                                  {"type": "image_url", "image_url": PNG_1PX}]), 400,
                              "messages[0].content"),
    "prompt past the context": (_with_prompt_parts([{"type": "text", "text": "red " * 700},
                                                    {"type": "image_url", "image_url": PNG_1PX}]), 400, "messages"),
}
BAD_FIELDS = {
    "n": (99, "n"), "top_logprobs": (21, "top_logprobs"), "constrain": ("no", "constrain"),
    "min_score": (1.5, "min_score"), "temperature": ("hot", "temperature"), "top_p": (0, "top_p"),
    "top_k": (-1, "top_k"),
    "max_tokens": (CAP + 1, "max_tokens"), "max_completion_tokens": (0, "max_completion_tokens"),
    "seed": (1.5, "seed"), "stop": ([""], "stop"), "stream": ("yes", "stream"), "logprobs": ("yes", "logprobs"),
}


def _assert_openai_error(response, status, param="unchecked"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "unchecked":
        assert error["param"] == param


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_requests_get_openai_shaped_4xx(server, case):
    body, status, param = BAD_BODIES[case]
    _assert_openai_error(httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30), status, param)


@pytest.mark.parametrize("field", list(BAD_FIELDS))
def test_bad_fields_get_openai_shaped_4xx(server, photos, field):
    value, param = BAD_FIELDS[field]
    body = {**_valid_body(photos), field: value}
    _assert_openai_error(httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30), 400, param)


def test_malformed_json_too_large_bodies_and_unknown_routes(server):
    url = server[0] + "/v1/chat/completions"

    def post(content):
        return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)

    _assert_openai_error(post(b"{not json"), 400)
    _assert_openai_error(post(b"\xff\xfe"), 400)
    _assert_openai_error(post(b"[" * 100_000), 400)
    _assert_openai_error(post(b"{\"n\": " + b"9" * 5000 + b"}"), 400)
    _assert_openai_error(post(b" " * (3 * 1024 * 1024)), 413)
    _assert_openai_error(httpx.get(server[0] + "/v1/nothing-here"), 404)
    _assert_openai_error(httpx.get(url), 405)


def test_the_openai_client_sees_bad_requests_as_such(client, photos):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", n=99, messages=image_message("caption en", PNG_1PX))
    assert caught.value.body["param"] == "n"


def test_fuzzed_requests_never_crash_the_server(server, photos):
    """Random values put at random places of a valid body: always a 2xx or an OpenAI-shaped 4xx."""
    rng = random.Random(0)
    junk = [None, True, 0, -1, 2**70, 1e308, float("nan"), "", "x" * 300, "data:", "data:image/png;base64,",
            [], [None], {}, {"type": "image_url"}, {"url": 3}, "\ud800", PNG_1PX]
    url = server[0] + "/v1/chat/completions"
    for _ in range(60):
        body = _valid_body(photos)
        body["max_tokens"] = 2
        part = ["messages", 0, "content"]
        path = rng.choice([["model"], ["messages"], ["messages", 0], ["messages", 0, "role"], part, part + [0],
                           part + [1], part + [0, "image_url"], part + [0, "image_url", "url"], part + [1, "text"],
                           ["temperature"], ["stop"], ["seed"], ["stream"], ["top_p"], ["max_tokens"],
                           ["stream_options"]])
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = rng.choice(junk)
        try:
            content = json.dumps(body).encode()
        except ValueError:
            content = b"{}"
        if rng.random() < 0.2:  # sometimes cut the JSON short
            content = content[:rng.randrange(len(content))]
        response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code < 500, (path, response.text)
        if response.status_code >= 400:
            _assert_openai_error(response, response.status_code)
    assert httpx.get(server[0] + "/health").status_code == 200


# ---------------------------------------------------------------------- API key

def test_api_key_is_required_when_set(tiny, photos):
    model, processor = tiny
    engine = BatchEngine(model, processor, batch_window_s=0)
    with running_server(create_app(engine, ServerSettings(model_name="tiny", api_key="s3cret"))) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            _assert_openai_error(httpx.get(url + "/v1/models", headers=headers), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        response = good.chat.completions.create(model="tiny", max_tokens=2,
                                                messages=image_message("caption en", png_data_uri(photos["coffee"])))
        assert response.choices[0].message.content is not None
        assert httpx.get(url + "/health").status_code == 200


def test_a_full_queue_answers_429(tiny, photos, monkeypatch):
    model, processor = tiny
    engine = BatchEngine(model, processor, max_batch_size=1, max_queue=1, batch_window_s=0)
    _slow_decoding(monkeypatch, model, 0.05)
    body = {"model": "tiny", "max_tokens": 10, "messages": image_message("caption en", png_data_uri(photos["coffee"]))}
    with running_server(create_app(engine, ServerSettings(model_name="tiny"))) as url:
        statuses = []

        def post():
            statuses.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=post) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert 200 in statuses and 429 in statuses
