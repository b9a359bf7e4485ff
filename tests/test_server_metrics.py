"""GET /metrics: Prometheus text format, read back with prometheus_client's own parser, and its keys."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from PIL import Image  # noqa: E402
from server_helpers import image_message, png_data_uri, running_server  # noqa: E402

from paligemma import load_model, load_processor  # noqa: E402
from paligemma.server.app import ServerSettings, create_app  # noqa: E402
from paligemma.server.batcher import BatchEngine  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)


def _scrape(url: str, **headers) -> dict:
    """{(name, labels as a sorted tuple): value} of every sample of /metrics."""
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in parser.text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _request(prompt: str, image: Image.Image, max_tokens: int = 4, **extra) -> dict:
    return {"model": "tiny", "max_tokens": max_tokens, "messages": image_message(prompt, png_data_uri(image)),
            **extra}


def test_metrics_count_requests_tokens_rejections_and_timings(tiny):
    model, processor = tiny
    engine = BatchEngine(model, processor, max_batch_size=4, image_cache_size=4, batch_window_s=0)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    with running_server(create_app(engine, ServerSettings(model_name="tiny"))) as url:
        before = _scrape(url)
        answers = []

        def ask(prompt, stream):
            body = _request(prompt, image, stream=stream)
            answers.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=60))

        threads = [threading.Thread(target=ask, args=(p, s)) for p in ("caption en", "ocr") for s in (False, True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [a.status_code for a in answers] == [200] * 4
        httpx.post(url + "/v1/chat/completions", json=_request("caption en", image, max_tokens=10_000), timeout=30)
        httpx.post(url + "/v1/chat/completions", content=b"{}", headers={"Content-Type": "text/plain"}, timeout=30)
        httpx.get(url + "/metrics", headers={"Host": "evil.example"}, timeout=30)
        after = _scrape(url)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("paligemma_requests_total", status="200") == 4
    assert grew("paligemma_requests_total", status="400") == 1 and grew("paligemma_requests_total", status="415") == 1
    assert grew("paligemma_rejected_requests_total", reason="unsupported_media_type") == 1
    assert grew("paligemma_rejected_requests_total", reason="invalid_host") == 1
    assert grew("paligemma_rejected_requests_total", reason="max_tokens_too_large") == 1
    stats = engine.stats()
    assert grew("paligemma_generation_tokens_total") == stats["generated_tokens"] >= 4
    assert grew("paligemma_prompt_tokens_total") == stats["prompt_tokens"] > 0
    assert grew("paligemma_prefills_total") == 4 and grew("paligemma_decode_steps_total") == stats["decode_steps"]
    assert (grew("paligemma_image_cache_hits_total"), grew("paligemma_image_cache_misses_total")) == (3, 1)
    assert after["paligemma_queue_depth", ()] == 0 and after["paligemma_running_batch_size", ()] == 0
    assert after["paligemma_max_batch_size", ()] == 4
    for histogram in ("time_to_first_token_seconds", "request_duration_seconds"):
        assert grew(f"paligemma_{histogram}_count") == 4
        assert grew(f"paligemma_{histogram}_bucket", le="+Inf") == 4 and grew(f"paligemma_{histogram}_sum") > 0
    # Time per output token: one observation per answer of more than one token.
    assert 0 < grew("paligemma_time_per_output_token_seconds_count") <= 4


def test_metrics_take_the_api_key_or_their_own(tiny):
    model, processor = tiny
    for settings, good, bad in ((ServerSettings(api_key="api"), "api", "other"),
                                (ServerSettings(api_key="api", metrics_key="scrape"), "scrape", "api")):
        with running_server(create_app(BatchEngine(model, processor), settings)) as url:
            assert httpx.get(url + "/metrics", timeout=30).status_code == 401
            wrong = {"Authorization": f"Bearer {bad}"}
            assert httpx.get(url + "/metrics", headers=wrong, timeout=30).status_code == 401
            samples = _scrape(url, Authorization=f"Bearer {good}")
            assert samples["paligemma_rejected_requests_total", (("reason", "invalid_api_key"),)] == 2
    with running_server(create_app(BatchEngine(model, processor), ServerSettings())) as url:
        assert ("paligemma_queue_depth", ()) in _scrape(url)  # no key: open, like the API
