"""The batching engine without HTTP: sharing the batch, per-row equality, cancellation, the image feature cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from paligemma import generate_detailed, load_model, load_processor
from paligemma.server.batcher import BatchEngine, ImageData, Job


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)


def _image(seed: int) -> ImageData:
    rgb = np.random.default_rng(seed).integers(0, 256, (20 + seed, 30, 3), dtype=np.uint8)
    return ImageData.from_bytes(rgb.tobytes(), rgb)


class Collector:
    """A job's `deliver`: gathers text, the final result, and errors; `done` is set at the end."""

    def __init__(self, on_event=None):
        self.text, self.result, self.error, self.events = "", None, None, 0
        self.done = threading.Event()
        self.on_event = on_event

    def __call__(self, item):
        if isinstance(item, Exception):
            self.error = item
            self.done.set()
            return
        self.events += 1
        self.text += item.text
        if self.on_event:
            self.on_event(self)
        if item.result is not None:
            self.result = item.result
            self.done.set()


def _held_engine(engine: BatchEngine):
    """Start `engine` with its worker blocked until the returned event is set (so jobs pile up)."""
    gate = threading.Event()
    original = engine._wait_for_work

    def gated():
        gate.wait(30)
        return original()

    engine._wait_for_work = gated
    return engine.start(), gate


def test_jobs_with_mixed_settings_batch_and_answer_as_alone(tiny):
    model, processor = tiny
    engine, gate = _held_engine(BatchEngine(model, processor, max_batch_size=3, batch_window_s=0))
    specs = [("caption en", 0, None, 6), ("describe en", 1, 5, 6), ("ocr", 2, None, 6), ("caption en", 3, None, 6),
             ("caption en", 4, None, 4)]  # another max_tokens: settings are per row, so it still batches
    jobs = []
    for prompt, image_seed, seed, max_tokens in specs:
        job = Job(prompt, [_image(image_seed)], max_tokens, Collector(), seed=seed,
                  temperature=0.8 if seed is not None else 0.0)
        jobs.append(job)
    jobs[1].top_k = 20
    for job in jobs:
        engine.submit(job)
    gate.set()
    for job in jobs:
        assert job.deliver.done.wait(60)
    engine.stop()
    for job in jobs:
        alone = generate_detailed(model, processor, [job.images[0].rgb], [job.prompt], max_new_tokens=job.max_tokens,
                                  temperature=job.temperature, top_k=job.top_k, seed=job.seed)[0]
        assert job.deliver.text == job.deliver.result.text == alone.text
        assert job.deliver.result.token_ids == alone.token_ids
    stats = engine.stats()
    assert stats["max_batch_size"] == 3 and stats["prefills"] == 5  # 5 jobs, at most 3 running at a time


def test_cancelled_jobs_are_dropped_and_a_batch_of_abandoned_rows_stops(tiny, monkeypatch):
    model, processor = tiny
    eos = processor.tokenizer.eos_id
    original = model.decode_step

    def never_eos(*args):  # rows run to max_tokens unless cancelled
        logits = original(*args)
        logits[:, eos] = -1e4
        return logits

    monkeypatch.setattr(model, "decode_step", never_eos)
    engine, gate = _held_engine(BatchEngine(model, processor, max_batch_size=4, batch_window_s=0))
    queued = Job("caption en", [_image(0)], 40, Collector())
    first = Job("caption en", [_image(1)], 40, Collector(on_event=lambda c: c.events == 3 and first.cancel()))
    second = Job("caption en", [_image(2)], 40, Collector(on_event=lambda c: c.events == 5 and second.cancel()))
    for job in (queued, first, second):
        engine.submit(job)
    queued.cancel()
    gate.set()
    for _ in range(300):
        if engine.stats().get("rows_cancelled") == 3 and not engine.stats()["running"]:
            break
        threading.Event().wait(0.1)
    engine.stop()
    stats = engine.stats()
    assert stats["rows_cancelled"] == 3 and stats["running"] == 0 and stats["decode_steps"] < 40
    assert queued.deliver.events == 0 and first.deliver.events == 3 and second.deliver.events == 5
    assert stats.get("completion_tokens", 0) == 0


def test_image_features_are_cached_by_content_in_lru_order(tiny):
    model, processor = tiny
    engine = BatchEngine(model, processor, image_cache_size=2)
    a, b, c = _image(0), _image(1), _image(2)
    a_again = ImageData.from_bytes(a.rgb.tobytes(), a.rgb.copy())
    first = engine.cache.features([a, b])
    assert torch.equal(engine.cache.features([a_again]), first[:1])  # hit: same bytes, another object
    engine.cache.features([c])  # evicts b, the least recently used
    assert (engine.cache.hits, engine.cache.misses) == (1, 3)
    assert set(engine.cache.entries) == {a.digest, c.digest}
    alone = model.encode_images(processor.image_processor([b.rgb]).pixel_values)
    assert torch.equal(engine.cache.features([b])[0], alone[0])


def test_a_failing_batch_reports_errors_and_the_engine_keeps_serving(tiny, monkeypatch):
    model, processor = tiny
    engine = BatchEngine(model, processor, batch_window_s=0).start()
    monkeypatch.setattr(model, "prefill", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    broken = Job("caption en", [_image(0)], 3, Collector())
    engine.submit(broken)
    assert broken.deliver.done.wait(30) and isinstance(broken.deliver.error, RuntimeError)
    monkeypatch.undo()
    fine = Job("caption en", [_image(0)], 3, Collector())
    engine.submit(fine)
    assert fine.deliver.done.wait(30) and fine.deliver.result is not None
    engine.stop()
