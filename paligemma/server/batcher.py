"""The batching engine: one worker thread owns the model and runs requests in batches.

Requests queue up while a batch runs and the worker takes the next batch from the queue when it
is done (static batching: a running batch is never joined), oldest first, so nothing starves.
Every setting (max_tokens, temperature, top_p, top_k, stop strings, seed) is per row, so any
requests can share a batch and a request's answer is the same in a batch as alone: greedy always,
sampled when it has a seed.

Images are encoded through an LRU cache keyed by the sha256 of their bytes, one image at a time,
so an image's features never depend on its batch-mates and a repeated image is encoded once.

A job whose client went away is `cancel()`led: dropped if still queued; in a running batch its
events are no longer delivered, and the batch stops as soon as every one of its rows is cancelled.
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

from ..generation import StreamEvent, stream_generate
from ..model import PaliGemma
from ..processor import Processor

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
    cancelled: threading.Event = field(default_factory=threading.Event)

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
                 batch_window_s: float = 0.005, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1 or image_cache_size < 0 or batch_window_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, image_cache_size and batch window >= 0")
        self.model, self.processor = model, processor
        self.max_batch_size, self.batch_window_s, self.max_queue = max_batch_size, batch_window_s, max_queue
        self.cache = ImageFeatureCache(model, processor, image_cache_size)
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
        """Counters (requests, batches, max_batch_size, rows_cancelled, ...) and the cache's hits and misses."""
        with self.condition:
            return {**self.counters, "queued": len(self.queue), "image_cache_hits": self.cache.hits,
                    "image_cache_misses": self.cache.misses, "image_cache_entries": len(self.cache.entries)}

    def start(self) -> "BatchEngine":
        with self.condition:
            if self.thread is None:
                self.running = True
                self.thread = threading.Thread(target=self._worker, name="paligemma-batcher", daemon=True)
                self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running batch, fail queued jobs, and end the worker."""
        with self.condition:
            self.running = False
            pending, self.queue = list(self.queue), collections.deque()
            self.condition.notify_all()
        for job in pending:
            job.deliver(RuntimeError("the server is shutting down"))
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFullError when `max_queue` jobs are already waiting."""
        with self.condition:
            if not self.running:
                raise RuntimeError("the batching engine is not running")
            if len(self.queue) >= self.max_queue:
                raise QueueFullError(f"{len(self.queue)} requests are already waiting")
            self.queue.append(job)
            self.counters["requests"] += 1
            self.condition.notify()

    # ------------------------------------------------------------------ worker thread

    def _worker(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as err:  # a bug or a model failure: fail this batch, keep serving
                log.exception("batch of %d failed", len(batch))
                self.counters["failed_batches"] += 1
                for job in batch:
                    job.deliver(err)

    def _next_batch(self) -> list[Job] | None:
        with self.condition:
            while self.running and not self.queue:
                self.condition.wait()
            if not self.running:
                return None
        if self.batch_window_s:
            time.sleep(self.batch_window_s)  # let requests sent at the same moment arrive
        with self.condition:
            self.counters["rows_cancelled"] += sum(job.cancelled.is_set() for job in self.queue)
            live = [job for job in self.queue if not job.cancelled.is_set()]
            if not live:
                self.queue.clear()
                return []
            batch = live[:self.max_batch_size]  # any requests can share a batch: settings are per row
            chosen = set(map(id, batch))
            self.queue = collections.deque(job for job in live if id(job) not in chosen)
        return batch

    def _run(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.counters["batches"] += 1
        self.counters["max_batch_size"] = max(self.counters["max_batch_size"], len(batch))
        features = self.cache.features([image for job in batch for image in job.images])
        events = stream_generate(
            self.model, self.processor, [[image.rgb for image in job.images] for job in batch],
            [job.prompt for job in batch], max_new_tokens=[job.max_tokens for job in batch],
            temperature=[job.temperature for job in batch], top_p=[job.top_p for job in batch],
            top_k=[job.top_k for job in batch], seed=[job.seed for job in batch], stop=[job.stop for job in batch],
            image_features=features)
        answered = set()
        try:
            for event in events:
                job = batch[event.index]
                if not job.cancelled.is_set():
                    if event.result is not None:
                        answered.add(event.index)
                        self.counters["completion_tokens"] += len(event.result.token_ids)
                    job.deliver(event)
                # Rows answered or abandoned need nothing more: stop when no row is left to serve.
                left = [job for i, job in enumerate(batch) if i not in answered]
                if left and all(job.cancelled.is_set() for job in left):
                    self.counters["batches_stopped_early"] += 1
                    return
        finally:
            events.close()
            self.counters["rows_cancelled"] += sum(job.cancelled.is_set() for i, job in enumerate(batch)
                                                   if i not in answered)
