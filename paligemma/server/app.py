"""The FastAPI application: OpenAI-compatible chat completions over a `BatchEngine`, and the web page.

Routes: POST /v1/chat/completions, GET /v1/models, GET /health, GET /stats, GET /metrics (Prometheus),
GET / (web page), GET /example.png (the bundled example image the page can load).

A request's `n` answers are `n` jobs of the engine, each its own row of the running batch with the
seed the library gives that answer (`sampling.choice_seed`); they share the image features through
the engine's image cache. `logprobs` / `top_logprobs` come from each row's own log-probs, in
OpenAI's shape; detect and segment prompts are constrained to well-formed answers unless the
request (`"constrain": false`) or the server (`--no-constrain`) says otherwise.

Every error is answered as `{"error": {"message", "type", "param", "code"}}`. Request handlers
only parse, fetch and decode (in worker threads); the model is touched by the engine's thread alone.

A request's memory is bounded before it is spent: the body by its size, then the image count and
prompt length, the token count against the context, each image's encoded size and header (format,
pixel count), and only then the pixels, decoded a few images at a time (`decode_concurrency`) and
resized to the model's input size at once, so a queued job holds model-size pixels only.
See docs/server.md and docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import hmac
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..constrained import TASKS, AnswerGrammar
from ..errors import PaliGemmaError
from ..generation import GenerationResult
from ..images import ImageError, ImageProcessor, image_size
from ..sampling import choice_seed
from ..segmentation import parse_segmentations
from ..tasks import filter_detections, parse_detections, prompt_task
from .batcher import BatchEngine, ImageData, Job, QueueFullError, RowEvent
from .image_sources import FetchLimits, ImageSourceError, read_image_url
from .metrics import ServerMetrics
from .schemas import APIError, ChatRequest, RequestLimits, parse_chat_request

log = logging.getLogger("paligemma.server")
STATIC_DIR = Path(__file__).parent / "static"
EXAMPLE_IMAGE = Path(__file__).parent.parent / "assets" / "example.png"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte-fallback pieces
_FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length"}
CHAT_PATH = "/v1/chat/completions"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
RETRY_AFTER_S = "1"
# After a decode this large, freed memory is handed back to the OS: Pillow's 16 MB pixel blocks
# fall below glibc's adaptive mmap threshold and would stay resident in malloc's per-thread arenas.
# Smaller decodes are left alone: their memory is reused by the next one.
_TRIM_AFTER_PIXELS = 4_000_000


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "paligemma"
    api_key: str | None = None
    metrics_key: str | None = None  # protects /metrics instead of api_key when set
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    decode_concurrency: int = 1  # full-size images decoded at the same time, server-wide
    # Host header names answered (any port); None answers any. Loopback names by default, so a web
    # page the user visits cannot reach a local server through DNS rebinding.
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    request: RequestLimits = RequestLimits()
    fetch: FetchLimits = FetchLimits()
    constrain: bool = True  # detect/segment prompts decode constrained unless a request says "constrain": false


def create_app(engine: BatchEngine, settings: ServerSettings = ServerSettings(), mask_codec=None) -> FastAPI:
    """The app serving `engine`; the engine's worker starts and stops with the app. With `mask_codec`
    (a `paligemma.vqvae.MaskCodec`), `segment` answers come with their masks."""

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="PaliGemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine)
    if settings.allowed_hosts is not None:
        app.add_middleware(_TrustedHosts, allowed=settings.allowed_hosts, metrics=metrics)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    created = int(time.time())
    counters = {"upload_disconnects": 0}
    admission = _Admission(engine)
    resizer = dataclasses.replace(engine.processor.image_processor, max_pixels=settings.max_image_pixels)
    decode_slots = threading.BoundedSemaphore(settings.decode_concurrency)

    def count(request: Request, status: int, reason: str | None) -> None:
        if request.url.path == CHAT_PATH:
            metrics.answered(status)
        if 400 <= status < 500 and status != 499 and reason:  # 499: the client left, nothing was refused
            metrics.refused(reason)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        count(request, err.status, err.code or err.type)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        count(request, err.status_code, code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code,
                            headers=err.headers)  # 405 carries Allow

    @app.exception_handler(ClientDisconnect)
    async def upload_abandoned(request: Request, err: ClientDisconnect):
        # The client left mid-upload: nothing to answer and nothing wrong with the server.
        counters["upload_disconnects"] += 1
        count(request, 499, None)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error")
        count(request, 500, None)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/example.png")
    async def example_image():
        return FileResponse(EXAMPLE_IMAGE, media_type="image/png")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name}

    @app.get("/stats")
    async def stats(request: Request):
        _check_api_key(request, settings)
        return {**engine.stats(), **counters}

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        _check_api_key(request, settings, settings.metrics_key or settings.api_key)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_api_key(request, settings)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "paligemma"}]}

    @app.post(CHAT_PATH)
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        _check_api_key(request, settings)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":  # a page's "simple" cross-site POST cannot send this type
            raise APIError(415, f"Content-Type must be application/json, got {media_type[:60] or 'none'!r}",
                           code="unsupported_media_type")
        with admission:
            chat = parse_chat_request(await _read_json(request, settings.max_body_bytes), settings.request)
            max_tokens = await run_in_threadpool(_max_tokens, chat, engine, len(chat.image_urls), settings.request)
            grammar = await run_in_threadpool(_grammar, chat, engine, settings.constrain)
            images = await run_in_threadpool(_load_images, chat.image_urls, settings.fetch, resizer, decode_slots)
            chat.image_urls = []  # the encoded images (up to the body size) are not kept while queued
            completion = _Completion(request, engine, chat, images, max_tokens, settings.model_name, mask_codec,
                                     metrics, arrived, grammar)
            completion.submit()
        if chat.stream:
            metrics.answered(200)
            # The background task also cancels a job whose client left before the stream began.
            return StreamingResponse(completion.sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(completion.cancel))
        response = JSONResponse(await completion.whole())
        metrics.answered(200)
        return response

    return app


def _check_api_key(request: Request, settings: ServerSettings, key: str | None = None) -> None:
    """401 unless the request carries `key` (default: the API key) as a Bearer token; no key, no check."""
    key = settings.api_key if key is None else key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


async def _read_json(request: Request, limit: int):
    """The body decoded as JSON, refusing bodies past `limit` bytes without reading them whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is larger than the {limit} byte limit", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than the {limit} byte limit", code="request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    chunks.clear()  # while parsing, the body is held twice (bytes and parsed strings), not three times
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8, over-long integers
        raise APIError(400, f"could not parse the JSON body: {err}"[:300], code="invalid_json") from None


def _load_images(urls: list[str], fetch: FetchLimits, resizer: ImageProcessor,
                 decode_slots: threading.BoundedSemaphore) -> list[ImageData]:
    """Fetch, check and decode every image of a request (blocking; runs in a worker thread).

    Every image's bytes and header (format, pixel count) are checked before any is decoded. Each
    is then decoded while holding a decode slot and resized at once, so at most `decode_slots`
    full-size images exist server-wide.
    """
    encoded = []
    for index, url in enumerate(urls):
        with _image_errors(index):
            data = read_image_url(url, fetch)
            width, height = image_size(data, resizer.max_pixels)
        encoded.append((data, width * height))
    images = []
    for index, (data, pixels) in enumerate(encoded):
        with _image_errors(index), decode_slots:
            rgb, original_size = resizer.load_resized(data)  # the full-size pixels are freed on return
            if pixels >= _TRIM_AFTER_PIXELS:
                _return_freed_memory()  # before the next decode, maybe on another thread's arena
        images.append(ImageData.from_bytes(data, rgb, original_size))
        encoded[index] = None
    return images


@contextlib.contextmanager
def _image_errors(index: int):
    """ImageSourceError / ImageError about request image `index` -> an APIError."""
    try:
        yield
    except ImageSourceError as err:
        status = 403 if err.code == "image_url_forbidden" else 400
        raise APIError(status, f"image {index}: {err}", "messages", err.code) from None
    except ImageError as err:
        raise APIError(400, f"image {index}: {err}", "messages", "invalid_image") from None


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) on Windows
        return None


_MALLOC_TRIM = _malloc_trim()


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim, about 10 ms); elsewhere a no-op."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _max_tokens(chat: ChatRequest, engine: BatchEngine, num_images: int, limits: RequestLimits) -> int:
    """The request's max_tokens, defaulted, and checked against what the context has left."""
    prompt_tokens = engine.prompt_tokens(chat.prompt, num_images)
    room = engine.context_length - prompt_tokens
    if room < 1 or (chat.max_tokens is not None and chat.max_tokens > room):
        asked = f" + max_tokens {chat.max_tokens}" if chat.max_tokens else ""
        raise APIError(400, f"the prompt is {prompt_tokens} tokens (image tokens included){asked}, past the model's "
                       f"context of {engine.context_length} tokens", "messages", "context_length_exceeded")
    return chat.max_tokens if chat.max_tokens is not None else min(limits.max_tokens_cap, room)


def _grammar(chat: ChatRequest, engine: BatchEngine, constrain_by_default: bool) -> AnswerGrammar | None:
    """The answer grammar the request decodes under: None unless it asks for one (`constrain: true`)
    or, not saying, its prompt is detect/segment and the server constrains those by default. A default
    grammar that cannot be built (e.g. "detect" with no label) falls back to unconstrained decoding."""
    wanted = chat.constrain
    if wanted is None:
        wanted = constrain_by_default and prompt_task(chat.prompt) in TASKS
    if not wanted:
        return None
    try:
        return AnswerGrammar.for_prompt(engine.processor.tokenizer, chat.prompt, engine.model.config.text.vocab_size)
    except PaliGemmaError as err:
        if chat.constrain:
            raise APIError(400, f"cannot constrain this prompt: {err}", "constrain") from None
        return None


class _Completion:
    """One request in flight: its `n` jobs in the engine, and the response built from their events."""

    def __init__(self, request: Request, engine: BatchEngine, chat: ChatRequest, images: list[ImageData],
                 max_tokens: int, model_name: str, mask_codec=None, metrics: ServerMetrics | None = None,
                 arrived: float | None = None, grammar: AnswerGrammar | None = None):
        self.request, self.engine, self.chat, self.images = request, engine, chat, images
        self.model_name, self.mask_codec = model_name, mask_codec
        self.metrics, self.arrived = metrics, time.monotonic() if arrived is None else arrived
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: asyncio.Queue[tuple[int, RowEvent | Exception]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliverer(choice: int):
            def deliver(item):  # called on the engine's thread
                try:
                    loop.call_soon_threadsafe(self.events.put_nowait, (choice, item))
                except RuntimeError:  # the event loop has closed: nobody is listening any more
                    pass
            return deliver

        top_logprobs = chat.top_logprobs if chat.logprobs else 0
        self.jobs = [Job(chat.prompt, images, max_tokens, deliverer(choice), chat.temperature, chat.top_p, chat.top_k,
                         choice_seed(chat.seed, choice), chat.stop, top_logprobs, grammar)
                     for choice in range(chat.n)]

    def submit(self) -> None:
        try:
            self.engine.submit(*self.jobs)
        except QueueFullError as err:
            raise _busy(str(err)) from None

    def cancel(self) -> None:
        """Cancel every answer's job (a no-op for those that have finished)."""
        for job in self.jobs:
            job.cancel()

    async def _next(self) -> tuple[int, RowEvent]:
        """The next (choice, event) of any of the request's answers."""
        choice, item = await self.events.get()
        if isinstance(item, Exception):
            log.error("generation failed: %r", item)
            raise APIError(500, "generation failed on the server", type="server_error")
        if item.result is not None and self.metrics is not None:
            job = self.jobs[choice]
            self.metrics.finished(self.arrived, job.first_token_at, job.finished_at, len(item.result.token_ids))
        return choice, item

    async def whole(self) -> dict:
        """The non-streaming response; cancels the jobs if the client disconnects first."""
        watcher = asyncio.ensure_future(_wait_for_disconnect(self.request))
        results: dict[int, GenerationResult] = {}
        try:
            while len(results) < len(self.jobs):
                getter = asyncio.ensure_future(self._next())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    self.cancel()
                    raise APIError(499, "client disconnected", code="client_disconnected")
                choice, event = getter.result()
                if event.result is not None:
                    results[choice] = event.result
        except BaseException:
            self.cancel()
            raise
        finally:
            watcher.cancel()
        answers = [results[choice] for choice in range(len(self.jobs))]
        choices = []
        for index, result in enumerate(answers):
            choice = {"index": index, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": self._logprobs(_result_tokens(result)),
                      "finish_reason": _FINISH_REASONS[result.finish_reason]}
            choice.update(await run_in_threadpool(self._extension, result))
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
                "choices": choices, "usage": _usage(answers), "system_fingerprint": None}

    async def sse(self):
        """Server-sent events: a role chunk per answer, content chunks (with their tokens' log-probs when
        asked), each answer's finish chunk, [usage chunk], [DONE]. Answers interleave, told apart by `index`.

        Starlette cancels this generator when the client disconnects; the jobs are cancelled with it.
        """
        try:
            for index in range(len(self.jobs)):
                yield self._chunk(index, {"role": "assistant", "content": ""})
            results: dict[int, GenerationResult] = {}
            while len(results) < len(self.jobs):
                try:
                    index, event = await self._next()
                except APIError as err:
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                logprobs = self._logprobs(event.tokens)
                if event.text or (logprobs and logprobs["content"]):
                    yield self._chunk(index, {"content": event.text}, logprobs=logprobs)
                if event.result is not None:
                    results[index] = event.result
                    extension = await run_in_threadpool(self._extension, event.result)
                    yield self._chunk(index, {}, _FINISH_REASONS[event.result.finish_reason], extension)
            if self.chat.include_usage:
                yield self._data({"choices": [], "usage": _usage([results[i] for i in range(len(self.jobs))])})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a no-op once the jobs have finished

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None, extra: dict | None = None,
               logprobs: dict | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                  **(extra or {})}
        return self._data({"choices": [choice]})

    def _logprobs(self, tokens: list[tuple[int, float, list[tuple[int, float]]]]) -> dict | None:
        """OpenAI's `logprobs` of a choice or chunk: {"content": [{token, logprob, bytes, top_logprobs}]},
        one entry per generated token (<eos> included); None unless the request asked for logprobs."""
        if not self.chat.logprobs:
            return None
        tokenizer = self.engine.processor.tokenizer
        content = [{**_token_logprob(tokenizer, token, logprob),
                    "top_logprobs": [_token_logprob(tokenizer, t, lp) for t, lp in top[:self.chat.top_logprobs]]}
                   for token, logprob, top in tokens]
        return {"content": content, "refusal": None}

    def _data(self, fields: dict) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_name,
                 "system_fingerprint": None, **fields}
        return f"data: {json.dumps(chunk)}\n\n"

    def _extension(self, result: GenerationResult) -> dict:
        """The `paligemma` field of a choice: detections for detect prompts, masks for segment prompts
        when the server has a mask codec (boxes in original pixels). Decoding masks is blocking work."""
        task, size = prompt_task(self.chat.prompt), self.images[0].size
        spans, chat = result.token_spans(), self.chat
        if task == "detect":
            found = parse_detections(result.text, size, spans)
            kept = filter_detections(found.objects, chat.min_score, chat.nms_iou)
            return {"paligemma": {"detections": [d.as_json() for d in kept],
                                  "detection_errors": found.errors, "image_size": list(size)}}
        if task == "segment" and self.mask_codec is not None:
            segmented = parse_segmentations(result.text, size, self.mask_codec, spans)
            kept = filter_detections(segmented.objects, chat.min_score, chat.nms_iou)
            return {"paligemma": {"segmentations": [o.as_json() for o in kept],
                                  "segmentation_errors": segmented.errors, "image_size": list(size)}}
        return {}


def _busy(why: str) -> APIError:
    return APIError(429, f"server busy ({why}); retry shortly", code="server_busy", type="rate_limit_error",
                    headers={"Retry-After": RETRY_AFTER_S})


class _Admission:
    """Counts requests being read and decoded as waiting: with the engine's queue they may not exceed
    its `max_queue`, so at most `max_queue` requests hold a body or images (runs on the event loop)."""

    def __init__(self, engine: BatchEngine):
        self.engine, self.preparing = engine, 0

    def __enter__(self):
        queued = self.engine.stats()["queued"]
        if self.preparing + queued >= self.engine.max_queue:
            raise _busy(f"{queued} requests are waiting, {self.preparing} more are being read")
        self.preparing += 1

    def __exit__(self, *exc_info):
        self.preparing -= 1


class _TrustedHosts:
    """ASGI middleware answering 400 to a request whose Host header is not an allowed name (any port)."""

    def __init__(self, app, allowed: tuple[str, ...], metrics: ServerMetrics):
        self.app, self.allowed, self.metrics = app, {name.lower().strip("[]") for name in allowed}, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _host_name(Headers(scope=scope).get("host", "")) not in self.allowed:
            self.metrics.refused("invalid_host")
            error = APIError(400, f"Host header not allowed: this server answers {sorted(self.allowed)} "
                             "(paligemma serve --allowed-hosts)", code="invalid_host")
            await JSONResponse(error.body(), status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _host_name(header: str) -> str | None:
    """The lower-case name of a Host header ("[::1]:8000" -> "::1"); None when malformed."""
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            return None
        port = port[1:]
    else:
        name, _, port = header.partition(":")
    return name.lower() if name and (not port or port.isdigit()) else None


def _usage(results: list[GenerationResult]) -> dict:
    """Token counts of a request: its prompt once, every answer's tokens."""
    prompt, completion = results[0].prompt_tokens, sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _result_tokens(result: GenerationResult) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """A whole answer's (id, log-prob, top alternatives) per token, as the engine's events carry them."""
    tops = result.top_logprobs or [[] for _ in result.token_ids]
    return list(zip(result.token_ids, result.logprobs, tops))


def _token_logprob(tokenizer, token_id: int, logprob: float) -> dict:
    """{token, logprob, bytes} of one token: its piece's text ("▁" as a space; a byte-fallback piece is
    its byte, shown as a "\\xNN" escape when not a whole character), and that text's UTF-8 bytes."""
    try:
        piece = tokenizer.id_to_piece(token_id)
    except ValueError:  # an embedding padding row: no piece, no text
        piece = ""
    byte = _BYTE_PIECE.fullmatch(piece)
    data = bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
    return {"token": data.decode("utf-8", "backslashreplace"), "logprob": logprob, "bytes": list(data)}


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone (the body has been read, so receive() waits for a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
