"""The batching engine: one worker thread owns the model and schedules requests step by step.

Continuous batching, as vLLM and TGI schedule: the worker loops over

    admit   the oldest waiting request, if the running batch has room (--max-batch-size) and the
            cache can hold it: its images are encoded and its prompt prefilled alone, as one step,
            and its KV cache rows join the running batch (`running_batch.py`);
    step    one token for every running row; a row that is done (eos, stop string, max_tokens) or
            whose client went away leaves at once, and its slot is free for the next request.

So a request that arrives while others decode starts at the next step instead of waiting for the
whole batch, and a short answer never waits for a long one. At most one prefill runs between two
decode steps: a running row's next token is delayed by at most one request's image encode and
prefill. With `prefill_layers_per_step` N > 0 the prefill itself is cut into pieces of N decoder
layers, one piece between two decode steps (exact: `running_batch.PrefillInSteps`), so the delay
is at most the image encode or N layers' share of a prefill (docs/server.md, "Batching").

Requests are admitted oldest first (a request that does not fit the cache yet holds the ones behind
it, so nothing starves). Every setting (max_tokens, temperature, top_p, top_k, stop strings, seed,
top_logprobs, answer grammar) is per row, so any requests share a batch, and a request's answer is
the same in a batch as alone: greedy always, sampled when it has a seed.

Images are encoded through an LRU cache keyed by the sha256 of their bytes, one image at a time,
so an image's features never depend on its batch-mates and a repeated image is encoded once.

A job whose client went away is `cancel()`led: dropped if still queued, and out of the running
batch before its next step; its events are never delivered after the cancel.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..constrained import AnswerGrammar
from ..generation import DecodedRow, StreamEvent, top_alternatives
from ..model import PaliGemma
from ..processor import Processor
from ..sampling import SamplingParams
from .running_batch import RunningBatch

log = logging.getLogger("paligemma.server")


class QueueFullError(RuntimeError):
    """The engine's queue is at its limit; the client should retry later."""


@dataclass
class ImageData:
    """A request image as queued: upright RGB pixels already at the model's input size (so a waiting
    job never holds full-size pixels), the original image's size and the sha256 of its bytes."""

    rgb: np.ndarray  # (H, W, 3) uint8; the server stores ImageProcessor.resize output, (height, width, 3)
    digest: str
    size: tuple[int, int]  # (width, height) of the original image: what detection boxes map back to

    @classmethod
    def from_bytes(cls, data: bytes, rgb: np.ndarray, size: tuple[int, int] | None = None) -> "ImageData":
        """`size` defaults to the size of `rgb` (when `rgb` is the original)."""
        return cls(rgb, hashlib.sha256(data).hexdigest(), size or (rgb.shape[1], rgb.shape[0]))


@dataclass
class RowEvent(StreamEvent):
    """A StreamEvent with the tokens taken since the job's previous event: (id, log-prob, top alternatives)."""

    tokens: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass
class Job:
    """One request. `deliver` is called from the worker thread with each StreamEvent, or an Exception."""

    prompt: str
    images: list[ImageData]
    max_tokens: int
    deliver: Callable[[StreamEvent | Exception], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int = 0
    grammar: AnswerGrammar | None = None  # constrained decoding: only answers of this grammar
    cancelled: threading.Event = field(default_factory=threading.Event)
    # time.monotonic() seconds, set by the engine: queued, first token sampled, last token sampled.
    submitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()


class ImageFeatureCache:
    """LRU cache of `model.encode_images` features (N, D), keyed by image bytes' sha256."""

    def __init__(self, model: PaliGemma, processor: Processor, capacity: int):
        self.model, self.processor, self.capacity = model, processor, capacity
        self.entries: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.hits = self.misses = 0

    def features(self, images: list[ImageData]) -> torch.Tensor:
        """Features (len(images), N, D) in order, encoding only the images not cached."""
        out = []
        for image in images:
            cached = self.entries.get(image.digest)
            if cached is not None:
                self.hits += 1
                self.entries.move_to_end(image.digest)
            else:
                self.misses += 1
                pixels = self.processor.image_processor([image.rgb]).pixel_values.to(self.model.device)
                with torch.no_grad():
                    cached = self.model.encode_images(pixels)[0]  # (N, D)
                if self.capacity > 0:
                    self.entries[image.digest] = cached
                    while len(self.entries) > self.capacity:
                        self.entries.popitem(last=False)
            out.append(cached)
        return torch.stack(out)


class BatchEngine:
    """Owns the model; `submit` jobs from any thread, results come back through each job's `deliver`."""

    def __init__(self, model: PaliGemma, processor: Processor, max_batch_size: int = 8, image_cache_size: int = 32,
                 batch_window_s: float = 0.005, max_queue: int = 64, prefill_layers_per_step: int = 0):
        if max_batch_size < 1 or max_queue < 1 or min(image_cache_size, batch_window_s, prefill_layers_per_step) < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, image_cache_size, batch window and "
                             "prefill_layers_per_step >= 0")
        self.model, self.processor = model, processor
        self.prefill_layers_per_step = prefill_layers_per_step  # 0: a whole prefill in one step
        self.joining = None  # the row whose prefill runs in pieces, until it joins the batch
        self.max_batch_size, self.batch_window_s, self.max_queue = max_batch_size, batch_window_s, max_queue
        self.cache = ImageFeatureCache(model, processor, image_cache_size)
        self.batch = RunningBatch(model)
        self.queue: collections.deque[Job] = collections.deque()
        self.condition = threading.Condition()
        self.counters = collections.Counter()
        self.running = False
        self.thread: threading.Thread | None = None

    @property
    def context_length(self) -> int:
        return self.model.config.text.max_position_embeddings

    def prompt_tokens(self, prompt: str, num_images: int) -> int:
        """Prompt length in tokens, image tokens included (what counts against the context)."""
        return len(self.processor.encode_prefix(prompt, num_images))

    def stats(self) -> dict:
        """Counters (requests, prefills, decode_steps, rows_decoded, max_batch_size, tokens, rows_cancelled,
        ...), the queue and running batch sizes, and the image cache's hits and misses."""
        with self.condition:
            return {**self.counters, "queued": len(self.queue), "running": len(self.batch),
                    "image_cache_hits": self.cache.hits, "image_cache_misses": self.cache.misses,
                    "image_cache_entries": len(self.cache.entries)}

    def start(self) -> "BatchEngine":
        with self.condition:
            if self.thread is None:
                self.running = True
                self.thread = threading.Thread(target=self._worker, name="paligemma-batcher", daemon=True)
                self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Fail queued jobs, let the worker finish its current step and fail the running rows, end the worker."""
        with self.condition:
            self.running = False
            pending, self.queue = list(self.queue), collections.deque()
            self.condition.notify_all()
        for job in pending:
            job.deliver(RuntimeError("the server is shutting down"))
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None

    def submit(self, job: Job, *more: Job) -> None:
        """Queue jobs (all or none, e.g. a request's `n` answers); raises QueueFullError when they would
        make more than `max_queue` jobs wait."""
        jobs = (job, *more)
        with self.condition:
            if not self.running:
                raise RuntimeError("the batching engine is not running")
            if len(self.queue) + len(jobs) > self.max_queue:
                raise QueueFullError(f"{len(self.queue)} requests are already waiting")
            for queued in jobs:
                queued.submitted_at = time.monotonic()
                self.queue.append(queued)
            self.counters["requests"] += 1
            self.condition.notify()

    # ------------------------------------------------------------------ worker thread

    def _worker(self) -> None:
        while self._wait_for_work():
            if self.joining is not None:
                self._continue_prefill()
            elif (job := self._next_job()) is not None:
                self._admit(job)
            if len(self.batch):
                self._step()
        joining = [self.joining.row] if self.joining is not None else []
        for row in self.batch.clear() + joining:
            row.job.deliver(RuntimeError("the server is shutting down"))

    def _wait_for_work(self) -> bool:
        """Block while there is nothing to do; False once the engine stops. An idle engine waits
        `batch_window_s` after a request arrives, so that requests sent together start together."""
        with self.condition:
            idle = not len(self.batch)
            while self.running and not self.queue and not len(self.batch) and self.joining is None:
                self.condition.wait()
            if not self.running:
                return False
        if idle and self.batch_window_s:
            time.sleep(self.batch_window_s)
        return True

    def _next_job(self) -> Job | None:
        """The oldest live waiting job, if the running batch has a free row and room in its cache for it."""
        with self.condition:
            while self.queue and self.queue[0].cancelled.is_set():
                self.queue.popleft()
                self.counters["rows_cancelled"] += 1
            if not self.queue or len(self.batch) >= self.max_batch_size:
                return None
            job = self.queue[0]
            if len(self.batch) and not self.batch.fits(self.prompt_tokens(job.prompt, len(job.images)), job.max_tokens):
                return None  # it waits for rows to finish; the jobs behind it wait too (first come, first served)
            return self.queue.popleft()

    def _admit(self, job: Job) -> None:
        """Encode the job's images and prefill its prompt (one step), and join it to the running batch."""
        try:
            start = time.perf_counter()
            features = self.cache.features(job.images)
            encoded = time.perf_counter()
            inputs = self.processor(images=[[image.rgb for image in job.images]], prompts=[job.prompt],
                                    with_pixels=False)
            if int(inputs["attention_mask"].sum()) + job.max_tokens > self.context_length:
                raise ValueError(f"prompt + max_tokens {job.max_tokens} exceed the context of {self.context_length}")
            row = _LiveRow(job, DecodedRow(self.processor.tokenizer, job.stop, job.max_tokens, job.top_logprobs),
                           int(inputs["attention_mask"].sum()), {"encode_images": encoded - start, "decode": 0.0})
            settings = (SamplingParams(job.temperature, job.top_p, job.top_k), job.seed, job.max_tokens,
                        job.top_logprobs, job.grammar)
            if self.prefill_layers_per_step:  # the encode was this step; the prefill's pieces are the next ones
                self.joining = self.batch.begin(row, inputs["input_ids"], inputs["attention_mask"], features,
                                                *settings, layers_per_step=self.prefill_layers_per_step)
                return
            row.timings["prefill"] = self.batch.add(row, inputs["input_ids"], inputs["attention_mask"], features,
                                                    *settings)
        except Exception as err:  # a bad request or a model failure: fail this job, keep serving the others
            self._prefill_failed(job, err)
            return
        self._joined(row)

    def _continue_prefill(self) -> None:
        """Run the next piece of the joining row's prefill (it joins after the last one)."""
        joining, self.joining = self.joining, None
        job = joining.row.job
        if job.cancelled.is_set():
            self.counters["rows_cancelled"] += 1
            return
        try:
            joined = self.batch.prefill_step(joining)
        except Exception as err:
            self._prefill_failed(job, err)
            return
        if not joined:
            self.joining = joining
            return
        joining.row.timings["prefill"] = joining.seconds
        self._joined(joining.row)

    def _prefill_failed(self, job: Job, err: Exception) -> None:
        """A bad request or a model failure: fail this job, keep serving the others."""
        log.exception("prefill failed")
        self.counters["failed_prefills"] += 1
        job.deliver(err)

    def _joined(self, row: "_LiveRow") -> None:
        self.counters["prefills"] += 1
        self.counters["prompt_tokens"] += row.prompt_tokens
        self.counters["max_batch_size"] = max(self.counters["max_batch_size"], len(self.batch))

    def _step(self) -> None:
        """One token for every running row: deliver it, let done and cancelled rows leave, decode the rest."""
        try:
            cancelled = [i for i, row in enumerate(self.batch.rows) if row.job.cancelled.is_set()]
            if cancelled:
                self.counters["rows_cancelled"] += len(cancelled)
                self.batch.remove(cancelled)
                if not len(self.batch):
                    return
            start = time.perf_counter()
            choice = self.batch.sample()
            tokens, logprobs = choice.tokens.tolist(), choice.logprobs.tolist()  # one device sync per step
            keep = [self._take(row, tokens[r], logprobs[r], top_alternatives(choice, r, row.text.top_logprobs))
                    for r, row in enumerate(self.batch.rows)]
            self.batch.advance(choice.tokens, keep)
        except Exception as err:  # a model failure: fail the running rows, keep serving
            log.exception("decode step failed")
            self.counters["failed_steps"] += 1
            for row in self.batch.clear():
                row.job.deliver(err)
            return
        seconds = time.perf_counter() - start
        for row in self.batch.rows:
            row.timings["decode"] += seconds
        if len(self.batch):  # the rows that stay were decoded together
            self.counters["decode_steps"] += 1
            self.counters["rows_decoded"] += len(self.batch)

    def _take(self, row: "_LiveRow", token: int, logprob: float, top: list[tuple[int, float]]) -> bool:
        """Give a row its sampled token and deliver what it wrote; False when the row is done."""
        job, now = row.job, time.monotonic()
        delta = row.text.add(token, logprob, top)
        row.pending.append((token, logprob, top))
        self.counters["generated_tokens"] += 1
        if job.first_token_at is None:
            job.first_token_at = now
        if row.text.finish_reason is None:
            if delta and not job.cancelled.is_set():
                job.deliver(RowEvent(0, delta, tokens=row.take_pending()))
            return True
        job.finished_at = now
        if not job.cancelled.is_set():
            self.counters["completion_tokens"] += len(row.text.token_ids)
            self.counters["rows_finished"] += 1
            result = row.text.result(row.prompt_tokens, dict(row.timings, queued=row.queued))
            job.deliver(RowEvent(0, delta, row.text.finish_reason, result, tokens=row.take_pending()))
        return False


@dataclass
class _LiveRow:
    """A job in the running batch: its text so far (detokenized, stop strings) and its timings."""

    job: Job
    text: DecodedRow
    prompt_tokens: int
    timings: dict
    pending: list = field(default_factory=list)  # tokens taken since the job's last event

    def __post_init__(self):
        self.queued = time.monotonic() - (self.job.submitted_at or time.monotonic())  # seconds it waited

    def take_pending(self) -> list:
        pending, self.pending = self.pending, []
        return pending
