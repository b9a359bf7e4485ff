"""`paligemma serve`: load a checkpoint and serve it over HTTP (registered by paligemma/cli.py).

    paligemma serve                                   # the bundled demo model on 127.0.0.1:8000
    paligemma serve --model DIR --port 8080 --api-key "$KEY" --max-batch-size 8

FastAPI, uvicorn and prometheus-client are optional dependencies (`pip install "paligemma[serve]"`),
imported only when the server is run, so the rest of the command line works without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from ..cli_common import add_mask_codec_argument, add_model_arguments, checkpoint_dir, load
from ..errors import UsageError

API_KEY_ENV = "PALIGEMMA_API_KEY"
METRICS_KEY_ENV = "PALIGEMMA_METRICS_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options."""
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    add_mask_codec_argument(model)
    parser.add_argument("--model-name", help="model id reported by /v1/models and in responses "
                        "(default: the checkpoint directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--allowed-hosts", help="comma-separated Host header names answered, any port, or '*' for "
                        "any (default: localhost,127.0.0.1,::1 when --host is a loopback address, else any)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV} "
                        "if set, else no key)")
    parser.add_argument("--metrics-key", help="require 'Authorization: Bearer KEY' on /metrics instead of the API key, "
                        f"so a scraper needs no API key (default: ${METRICS_KEY_ENV} if set, else the API key)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (public addresses only); default: data: URIs only")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="rows in the running decode batch; new requests join it between steps (default 8)")
    parser.add_argument("--batch-window-ms", type=float, default=5.0,
                        help="when idle, wait this long after a request arrives for others to start with it "
                        "(default 5)")
    parser.add_argument("--prefill-layers-per-step", type=int, default=0, metavar="N",
                        help="run a joining request's prefill N decoder layers at a time, with a decode step of the "
                        "running requests between pieces, so their streams pause for less (default 0: the whole "
                        "prefill in one step)")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429 "
                        "(default 64)")
    parser.add_argument("--max-tokens-cap", type=int, default=256,
                        help="largest max_tokens a request may ask for, and the default (default 256)")
    parser.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    parser.add_argument("--max-n", type=int, default=8, help="answers per request, the 'n' field (default 8)")
    parser.add_argument("--no-constrain", action="store_true",
                        help="decode detect/segment prompts unconstrained unless a request sends \"constrain\": true "
                             "(default: constrained to well-formed answers unless it sends \"constrain\": false)")
    parser.add_argument("--max-image-pixels", type=int, default=25_000_000,
                        help="largest decoded image, width x height (default 25M)")
    parser.add_argument("--decode-concurrency", type=int, default=1,
                        help="full-size images decoded at the same time (default 1; each needs up to "
                        "8 bytes x --max-image-pixels while it is decoded)")
    parser.add_argument("--max-prompt-chars", type=int, default=16_384,
                        help="longest prompt in characters, checked before tokenizing (default 16384)")
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    parser.add_argument("--image-cache-size", type=int, default=32,
                        help="images whose encoded features are kept (LRU; default 32, 0 = off)")
    parser.add_argument("--remote-image-max-mb", type=float, default=20.0,
                        help="largest image file accepted, data: URIs included, in MiB (default 20)")
    parser.add_argument("--remote-image-timeout", type=float, default=10.0,
                        help="seconds allowed for fetching a remote image, redirects included (default 10)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    """Check the options, load the model, serve until interrupted. User errors raise PaliGemmaError."""
    for name in ("max_batch_size", "max_queue", "max_tokens_cap", "max_images", "max_image_pixels",
                 "decode_concurrency", "max_prompt_chars"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.image_cache_size, args.batch_window_ms, args.prefill_layers_per_step) < 0 or not 0 < args.port < 65536:
        raise UsageError("--image-cache-size, --batch-window-ms and --prefill-layers-per-step must be >= 0, "
                         "--port in 1..65535")
    if min(args.max_body_mb, args.remote_image_max_mb, args.remote_image_timeout) <= 0:
        raise UsageError("--max-body-mb, --remote-image-max-mb and --remote-image-timeout must be > 0")
    try:
        import uvicorn

        from .app import LOOPBACK_HOSTS, ServerSettings, create_app
    except ImportError as err:
        raise UsageError(f"paligemma serve needs FastAPI, uvicorn and prometheus-client ({err}): "
                         "pip install 'paligemma[serve]'") from None
    allowed_hosts = _allowed_hosts(args.allowed_hosts, args.host, LOOPBACK_HOSTS)
    from .batcher import BatchEngine
    from .image_sources import FetchLimits
    from .schemas import RequestLimits

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    metrics_key = args.metrics_key or os.environ.get(METRICS_KEY_ENV) or None
    if not api_key and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    directory = checkpoint_dir(args.model)
    model, processor, mask_codec = load(directory, args.dtype, args.device, optimize=not args.no_optimize,
                                        quantize=args.quantize, mask_codec=args.mask_codec,
                                        max_pixels=args.max_image_pixels)

    engine = BatchEngine(model, processor, max_batch_size=args.max_batch_size,
                         image_cache_size=args.image_cache_size, batch_window_s=args.batch_window_ms / 1000,
                         max_queue=args.max_queue, prefill_layers_per_step=args.prefill_layers_per_step)
    mib = 1024 * 1024
    settings = ServerSettings(
        model_name=args.model_name or directory.name, api_key=api_key, metrics_key=metrics_key,
        max_body_bytes=int(args.max_body_mb * mib),
        max_image_pixels=args.max_image_pixels, decode_concurrency=args.decode_concurrency, allowed_hosts=allowed_hosts,
        request=RequestLimits(max_tokens_cap=args.max_tokens_cap, max_images=args.max_images,
                              max_prompt_chars=args.max_prompt_chars, max_n=args.max_n),
        constrain=not args.no_constrain,
        fetch=FetchLimits(allow_remote=args.allow_remote_images, max_bytes=int(args.remote_image_max_mb * mib),
                          timeout_s=args.remote_image_timeout))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"serving {settings.model_name} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    uvicorn.run(create_app(engine, settings, mask_codec), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _allowed_hosts(option: str | None, host: str, loopback_names: tuple[str, ...]) -> tuple[str, ...] | None:
    """--allowed-hosts as ServerSettings.allowed_hosts (None: any Host header)."""
    if option is None:
        return loopback_names if _is_loopback(host) else None
    names = tuple(name.strip() for name in option.split(",") if name.strip())
    if not names:
        raise UsageError("--allowed-hosts needs at least one host name, or '*' for any")
    return None if "*" in names else names


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
