"""Continuous batching: rows join a running batch between steps and leave when done, each answering as alone.

Gemma 1 and Gemma 2 (sliding window shorter than the answers, so a misaligned cache would change
the tokens), greedy and seeded sampling, a short request finishing during a long one, at most one
prefill between two decode steps, prefills cut into pieces of layers (bit for bit `model.prefill`),
and the KV-cache surgery underneath (`KVCache.take_rows`).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from tiny_models import write_complete_checkpoint

from paligemma import generate_detailed, load_model, load_processor
from paligemma.sampling import SamplingParams
from paligemma.server.batcher import BatchEngine, ImageData, Job
from paligemma.server.running_batch import PrefillInSteps, RunningBatch


@pytest.fixture(scope="module")
def gemma1(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory, spm_model_path, spm_layout):
    directory = tmp_path_factory.mktemp("tiny-gemma2")
    write_complete_checkpoint(directory, "gemma2", spm_model_path, spm_layout, kv_heads=2, window=4)
    return load_model(directory), load_processor(directory)


def _image(seed: int) -> ImageData:
    rgb = np.random.default_rng(seed).integers(0, 256, (20 + seed, 30, 3), dtype=np.uint8)
    return ImageData.from_bytes(rgb.tobytes(), rgb)


class Events:
    """A job's `deliver`: text, result, error, and when it finished."""

    def __init__(self):
        self.text, self.result, self.error, self.count, self.finished = "", None, None, 0, None
        self.done = threading.Event()

    def __call__(self, item):
        if isinstance(item, Exception):
            self.error = item
        else:
            self.count += 1
            self.text += item.text
            self.result = item.result
        if isinstance(item, Exception) or item.result is not None:
            self.finished = time.monotonic()
            self.done.set()


def _record_calls(monkeypatch, model, eos_id: int, delay: float = 0.0) -> list[tuple[str, int]]:
    """Log ("prefill" | "decode", rows) of every model call; <eos> is never chosen, so answers run to
    max_tokens (alone too: the same patched model answers both); each decode step takes `delay` s longer."""
    calls = []

    def logged(name, original):
        def call(*args, **kwargs):
            if name == "decode":
                time.sleep(delay)
            logits = original(*args, **kwargs)
            calls.append((name, logits.shape[0]))
            logits[:, eos_id] = -1e4
            return logits
        return call

    monkeypatch.setattr(model, "prefill", logged("prefill", model.prefill))
    monkeypatch.setattr(model, "decode_step", logged("decode", model.decode_step))
    return calls


def _alone(model, processor, job: Job):
    return generate_detailed(model, processor, [[image.rgb for image in job.images]], [job.prompt],
                             max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                             top_k=job.top_k, seed=job.seed)[0]


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("family", ["gemma1", "gemma2"])
def test_rows_joining_and_leaving_a_running_batch_answer_as_alone(family, request, monkeypatch):
    model, processor = request.getfixturevalue(family)
    calls = _record_calls(monkeypatch, model, processor.tokenizer.eos_id, delay=0.01)
    engine = BatchEngine(model, processor, max_batch_size=3, batch_window_s=0).start()
    specs = [("caption en", 0, None, 24), ("describe en", 1, 7, 9), ("ocr", 2, None, 14), ("caption en", 3, 11, 6),
             ("answer en how many circles are there?", 4, None, 12)]
    jobs = []
    try:
        for prompt, image, seed, max_tokens in specs:  # each arrives while the earlier ones decode
            job = Job(prompt, [_image(image)], max_tokens, Events(), seed=seed, temperature=0.9 if seed else 0.0,
                      top_k=20 if seed == 7 else 0)
            engine.submit(job)
            jobs.append(job)
            _wait(lambda: job.deliver.count >= 2 or job.deliver.done.is_set())
        for job in jobs:
            assert job.deliver.done.wait(60) and job.deliver.error is None
    finally:
        engine.stop()
    sizes = [rows for name, rows in calls if name == "decode"]  # the engine's steps (before the answers alone)
    for job in jobs:
        alone = _alone(model, processor, job)
        assert job.deliver.text == job.deliver.result.text == alone.text
        assert job.deliver.result.token_ids == alone.token_ids and len(alone.token_ids) == job.max_tokens
        assert job.deliver.result.prompt_tokens == alone.prompt_tokens
    assert max(sizes) == 3 and sizes[0] == 1  # rows joined the running batch, up to max_batch_size
    assert sizes.index(2) < sizes.index(3) and sizes[-1] == 1  # ... and left it as they finished
    stats = engine.stats()
    assert stats["prefills"] == 5 and stats["decode_steps"] == len(sizes) and stats["rows_decoded"] == sum(sizes)
    assert stats["generated_tokens"] == stats["completion_tokens"] == sum(spec[3] for spec in specs)


def test_a_short_request_arriving_during_a_long_one_finishes_first(gemma1, monkeypatch):
    model, processor = gemma1
    _record_calls(monkeypatch, model, processor.tokenizer.eos_id, delay=0.02)
    engine = BatchEngine(model, processor, max_batch_size=4, batch_window_s=0).start()
    long = Job("describe en", [_image(0)], 60, Events())
    short = Job("caption en", [_image(1)], 3, Events())
    try:
        engine.submit(long)
        _wait(lambda: long.deliver.count >= 3)
        engine.submit(short)
        assert short.deliver.done.wait(60) and not long.deliver.done.is_set()
        assert long.deliver.done.wait(60)
    finally:
        engine.stop()
    assert short.deliver.finished < long.deliver.finished
    assert long.deliver.result.token_ids == _alone(model, processor, long).token_ids
    assert short.deliver.result.token_ids == _alone(model, processor, short).token_ids


def test_at_most_one_prefill_runs_between_two_decode_steps(gemma1, monkeypatch):
    model, processor = gemma1
    calls = _record_calls(monkeypatch, model, processor.tokenizer.eos_id)
    engine = BatchEngine(model, processor, max_batch_size=8, batch_window_s=0)
    gate = threading.Event()
    wait = engine._wait_for_work
    engine._wait_for_work = lambda: gate.wait(30) and wait()  # five requests queue up before the worker runs
    engine.start()
    jobs = [Job("caption en", [_image(i)], 8, Events()) for i in range(5)]
    for job in jobs:
        engine.submit(job)
    gate.set()
    try:
        for job in jobs:
            assert job.deliver.done.wait(60)
    finally:
        engine.stop()
    names = [name for name, _ in calls]
    assert names[:10] == ["prefill", "decode"] * 5  # a running row waits for one prefill at a time
    assert [rows for name, rows in calls if name == "decode"][:5] == [1, 2, 3, 4, 5]


def test_a_row_joins_only_when_the_shared_cache_can_hold_every_row(gemma1):
    model, processor = gemma1
    context = model.config.text.max_position_embeddings
    batch = RunningBatch(model)
    inputs = processor(images=[_image(0).rgb], prompts=["caption en"])
    prompt = int(inputs["attention_mask"].sum())
    assert batch.fits(prompt, context - prompt)  # an empty batch takes any request that fits the context
    features = model.encode_images(inputs["pixel_values"])
    batch.add("first", inputs["input_ids"], inputs["attention_mask"], features, SamplingParams(), None,
              context - prompt)
    for _ in range(5):
        batch.advance(batch.sample().tokens, [True])
    # The first row fills prompt + 5 slots and may still write context - prompt - 5 tokens: a second
    # row, aligned on the first's last slot, may ask for as many and no more.
    assert batch.fits(prompt, context - prompt - 5) and not batch.fits(prompt, context - prompt - 4)
    assert batch.cache.length == prompt + 5 and batch.cache.max_len == context - 1
    batch.remove([0])
    assert len(batch) == 0 and batch.cache is None and batch.fits(prompt, context - prompt)


def test_take_rows_moves_rows_of_caches_of_different_lengths_to_one_write_slot(gemma2):
    model, processor = gemma2
    images = [_image(i).rgb for i in range(3)]
    prompts = ["caption en", "answer en how many circles are there?", "ocr"]
    alone, caches, logits = [], [], []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            inputs = processor(images=[image], prompts=[prompt])
            cache = model.new_cache(1, inputs["input_ids"].shape[1] + 4)
            logits.append(model.prefill(inputs["input_ids"], inputs["attention_mask"], cache,
                                        image_features=model.encode_images(inputs["pixel_values"])))
            positions = inputs["attention_mask"].sum(-1)
            token = logits[-1].argmax(-1)
            alone.append(model.decode_step(token, positions + 1, cache))
            caches.append((cache, positions))
        # The same rows, each after the same first token, moved into one cache: rows 2 and 0, then 1.
        for cache, _ in caches:  # undo the decode step's slot, so each cache holds its prompt only
            cache.length -= 1
        length = max(int(positions) for _, positions in caches)
        merged = model.new_cache(3, length + 2)
        merged.take_rows([(caches[2][0], torch.tensor([0])), (caches[0][0], torch.tensor([0])),
                          (caches[1][0], torch.tensor([0]))], length)
        order = [2, 0, 1]
        tokens = torch.cat([logits[i].argmax(-1) for i in order])
        positions = torch.cat([caches[i][1] for i in order]) + 1
        together = model.decode_step(tokens, positions, merged)
    for row, i in enumerate(order):
        torch.testing.assert_close(together[row], alone[i][0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fills more than"):
        model.new_cache(1, 40).take_rows([(merged, torch.tensor([1]))], 3)


@pytest.mark.parametrize("family", ["gemma1", "gemma2"])
def test_a_prefill_in_pieces_of_layers_is_model_prefill_bit_for_bit(family, request):
    model, processor = request.getfixturevalue(family)
    inputs = processor(images=[_image(3).rgb], prompts=["answer en how many circles are there?"])
    features = model.encode_images(inputs["pixel_values"])
    whole = model.new_cache(1, inputs["input_ids"].shape[1])
    expected = model.prefill(inputs["input_ids"], inputs["attention_mask"], whole, image_features=features)
    for layers_per_step in (1, 2, len(model.language_model.layers)):
        pieces = PrefillInSteps(model, inputs["input_ids"], inputs["attention_mask"], features, layers_per_step)
        steps = 1
        while not pieces.step():
            steps += 1
        assert steps == -(-len(model.language_model.layers) // layers_per_step)
        assert torch.equal(pieces.logits, expected)
        for mine, theirs in zip(pieces.cache.keys + pieces.cache.values, whole.keys + whole.values):
            assert torch.equal(mine, theirs)
        assert torch.equal(pieces.cache.valid, whole.valid) and pieces.cache.length == whole.length


def test_joining_rows_prefilled_a_layer_per_step_answer_as_alone_and_interleave(gemma2, monkeypatch):
    model, processor = gemma2
    log = []
    for index, layer in enumerate(model.language_model.layers):
        def forward(x, *args, original=layer.forward, index=index, **kwargs):
            if x.shape[1] > 1:  # a prompt's layer, not a decode step's
                log.append(f"layer{index}")
            return original(x, *args, **kwargs)
        monkeypatch.setattr(layer, "forward", forward)
    decode = model.decode_step

    def logged_decode(tokens, *args):
        log.append(f"decode{tokens.shape[0]}")
        return decode(tokens, *args)

    monkeypatch.setattr(model, "decode_step", logged_decode)
    engine = BatchEngine(model, processor, max_batch_size=4, batch_window_s=0, prefill_layers_per_step=1).start()
    first = Job("caption en", [_image(0)], 30, Events())
    second = Job("describe en", [_image(1)], 10, Events(), temperature=0.9, seed=5)
    try:
        engine.submit(first)
        _wait(lambda: first.deliver.count >= 1 or first.deliver.done.is_set())
        engine.submit(second)
        assert first.deliver.done.wait(60) and second.deliver.done.wait(60)
    finally:
        engine.stop()
    layers = len(model.language_model.layers)
    joined = log.index("layer0", log.index(f"layer{layers - 1}") + 1)  # the second request's prefill
    # Each of its layers ran between two decode steps of the first request, not all at once; after its
    # last layer it decodes with the first one.
    pieces = log[joined:joined + 2 * layers]
    assert pieces[::2] == [f"layer{i}" for i in range(layers)]
    assert pieces[1::2] == ["decode1"] * (layers - 1) + ["decode2"]
    for job in (first, second):
        alone = _alone(model, processor, job)
        assert job.deliver.result.token_ids == alone.token_ids and job.deliver.text == alone.text
