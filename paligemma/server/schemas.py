"""Chat-completion request bodies -> a checked `ChatRequest`, and OpenAI-shaped errors.

Validation is written out by hand rather than with pydantic models so that every refusal names
the offending field in OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`),
which is what OpenAI client libraries parse.

How a conversation becomes one PaliGemma prompt (PaliGemma is not a chat model):
- the LAST message must come from the user; its text parts, joined by spaces, are the prompt
  (e.g. "caption en", "detect cat", "answer en what is this?");
- the images are those of the last user message, or, when it has none, those of the nearest
  earlier user message that has some (so a follow-up question can reuse an uploaded image);
- system, developer and assistant messages are accepted and otherwise ignored.

Decoding fields beyond OpenAI's (docs/server.md): `constrain` (bool; default: on for detect and
segment prompts, as `paligemma serve --no-constrain` sets), `min_score` and `nms_iou` (detection
and segmentation filtering by box score, off by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..tokenizer import IMAGE_TOKEN

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # as OpenAI
_ROLES = {"system", "developer", "user", "assistant", "tool"}
_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"


class APIError(Exception):
    """An error answered as `{"error": {...}}` with HTTP `status` (and `headers`, e.g. Retry-After).

    Object reprs are cut from the message: they come from library errors and would tell a client
    the server's heap addresses.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        message = _OBJECT_REPR.sub("<object>", message)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class RequestLimits:
    max_tokens_cap: int = 256  # largest max_tokens a request may ask for; also the default
    max_images: int = 4  # images per request
    max_prompt_chars: int = 16_384  # checked before the prompt is tokenized
    max_n: int = 8  # answers per request (`n`); each is a row of the running batch


@dataclass
class ChatRequest:
    prompt: str
    image_urls: list[str]  # data: URIs or http(s) URLs, in message order
    max_tokens: int | None  # None: the cap, or what is left of the context
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    n: int = 1  # answers to the prompt
    logprobs: bool = False  # each answer's tokens with their log-probs (OpenAI's choices[i].logprobs)
    top_logprobs: int = 0  # with logprobs: the N most likely tokens at each step, 0..MAX_TOP_LOGPROBS
    constrain: bool | None = None  # None: the server's default for the prompt's task
    min_score: float | None = None  # drop detections scored below this
    nms_iou: float | None = None  # per-label non-maximum suppression at this IoU


def parse_chat_request(body: Any, limits: RequestLimits) -> ChatRequest:
    """Check a decoded JSON body of POST /v1/chat/completions. Raises APIError (400) naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    _refuse_unsupported(body)
    n = 1 if body.get("n") is None else _integer(body["n"], "n", minimum=1)
    if n > limits.max_n:
        raise APIError(400, f"'n' is {n} but this server gives at most {limits.max_n} answers per request", "n",
                       "n_too_large")
    logprobs = bool(_optional(body, "logprobs", bool))
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        top_logprobs = _integer(top_logprobs, "top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
        if not logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    prompt, image_urls = _prompt_and_images(body.get("messages"), limits)

    # OpenAI clients send both names, the unused one as null: the first that is set counts.
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is not None:
        max_tokens = _integer(max_tokens, param, minimum=1)
        if max_tokens > limits.max_tokens_cap:
            raise APIError(400, f"'{param}' is {max_tokens} but this server allows at most {limits.max_tokens_cap}",
                           param, "max_tokens_too_large")
    stream_options = _optional(body, "stream_options", dict) or {}
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
    return ChatRequest(
        prompt=prompt, image_urls=image_urls, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        top_k=_integer(body.get("top_k", 0), "top_k", minimum=0),
        seed=None if body.get("seed") is None else _integer(body["seed"], "seed", minimum=-2**63, maximum=2**64 - 1),
        stop=_stop(body.get("stop")),
        stream=bool(_optional(body, "stream", bool)),
        include_usage=include_usage,
        n=n, logprobs=logprobs, top_logprobs=top_logprobs or 0,
        constrain=_optional(body, "constrain", bool),
        min_score=None if body.get("min_score") is None else _number(body, "min_score", 0.0, low=0.0, high=1.0),
        nms_iou=None if body.get("nms_iou") is None else _number(body, "nms_iou", 0.0, low=0.0, high=1.0),
    )


def _refuse_unsupported(body: dict) -> None:
    """Options a client may rely on that this server cannot honour get a 400, not silence."""
    if body.get("tools") or body.get("functions"):
        raise APIError(400, "tools / function calling are not supported by PaliGemma", "tools",
                       "unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise APIError(400, "only the text response_format is supported", "response_format", "unsupported_parameter")


def _prompt_and_images(messages: Any, limits: RequestLimits) -> tuple[str, list[str]]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", "messages")
    parsed = [_message(message, f"messages[{i}]") for i, message in enumerate(messages)]
    role, text, images = parsed[-1]
    if role != "user":
        raise APIError(400, f"the last message must have role 'user' (got {role!r}): its text is PaliGemma's prompt",
                       f"messages[{len(parsed) - 1}].role")
    if len(text) > limits.max_prompt_chars:
        raise APIError(400, f"the prompt is {len(text):,} characters; this server takes at most "
                       f"{limits.max_prompt_chars:,}", f"messages[{len(parsed) - 1}].content", "prompt_too_long")
    if not text:
        raise APIError(400, "the last user message has no text: give a task prompt such as 'caption en', "
                       "'detect cat' or 'answer en what is in the image?'", f"messages[{len(parsed) - 1}].content")
    if IMAGE_TOKEN in text:
        raise APIError(400, f"the prompt contains {IMAGE_TOKEN!r}: send images as image_url parts; the server inserts "
                       "the image tokens itself", f"messages[{len(parsed) - 1}].content")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the prompt is not valid Unicode (lone surrogate escapes)",
                       f"messages[{len(parsed) - 1}].content") from None
    if not images:
        images = next((imgs for r, _, imgs in reversed(parsed) if r == "user" and imgs), [])
    if not images:
        raise APIError(400, "no image: add an image_url part to the user message (PaliGemma needs an image)",
                       "messages", "missing_image")
    if len(images) > limits.max_images:
        raise APIError(400, f"{len(images)} images in one message; this server takes at most {limits.max_images}",
                       "messages", "too_many_images")
    return text, images


def _message(message: Any, where: str) -> tuple[str, str, list[str]]:
    """(role, text, image urls) of one message."""
    if not isinstance(message, dict):
        raise APIError(400, f"{where} must be an object with 'role' and 'content'", where)
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise APIError(400, f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", f"{where}.role")
    content = message.get("content")
    if content is None and role != "user":
        return role, "", []
    if isinstance(content, str):
        return role, content.strip(), []
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{here}.text must be a string", f"{here}.text")
            texts.append(part["text"].strip())
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url  # {"url": ...} or a bare string
            if not isinstance(url, str) or not url:
                raise APIError(400, f"{here}.image_url.url must be a non-empty string", f"{here}.image_url")
            images.append(url)
        else:
            raise APIError(400, f"{here} must be a {{'type': 'text'}} or {{'type': 'image_url'}} part", here)
    return role, " ".join(t for t in texts if t), images


def _optional(body: dict, name: str, kind: type):
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise APIError(400, f"'{name}' must be a {kind.__name__}", name)
    return value


def _integer(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {value!r}"[:200], name)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise APIError(400, f"'{name}' is out of range ({value})"[:200], name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise APIError(400, f"'{name}' must be a number, got {value!r}"[:200], name)
    if value > high or value < low or (low_open and value == low):
        raise APIError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", name)
    return float(value)


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or any(not isinstance(s, str) or not s for s in stops)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                       "non-empty strings", "stop")
    return stops
