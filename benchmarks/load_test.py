"""Load test for `paligemma serve`: N concurrent clients for T seconds, or staggered arrivals, then a table.

    python benchmarks/load_test.py --clients 8 --duration 30                  # starts a demo-model server
    python benchmarks/load_test.py --model DIR --clients 4 -- --max-batch-size 4   # args after -- go to serve
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY      # an already running server
    python benchmarks/load_test.py --rate 0.5 --duration 60 --stream \
        --mix "describe en:48:1" --mix "answer en how many shapes are there?:8:3"   # staggered, mixed lengths

Without --url a server is started as a subprocess (`python -m paligemma serve`) on a free
loopback port and stopped at the end (`--server-root DIR` runs the `paligemma` package of another
checkout, e.g. a `git worktree` of an older commit, to compare schedulers on one workload).

Closed loop (default): each of --clients clients sends one chat completion at a time until the
duration is over (or --max-requests have been sent). Open loop (`--rate R`): requests arrive at
staggered times, a Poisson process of R requests/s drawn from --seed, each on its own connection
whatever the server's state, so the same schedule can be replayed against two servers. `--mix
PROMPT:MAX_TOKENS:WEIGHT` (repeatable) draws each request's prompt and max_tokens, seeded too.
Requests still in flight at the end finish. Reported: requests/s, completion tokens/s, latency
percentiles (and time to first token with --stream), per-prompt latency, errors by kind, and the
server's counters from /stats.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGE = ROOT / "paligemma" / "assets" / "example.png"
MAX_CLIENTS, MAX_DURATION_S, MAX_RATE = 64, 600, 100.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.duration <= MAX_DURATION_S:
        raise SystemExit(f"--clients must be 1..{MAX_CLIENTS} and --duration 0..{MAX_DURATION_S} s")
    if args.rate is not None and not 0 < args.rate <= MAX_RATE:
        raise SystemExit(f"--rate must be in (0, {MAX_RATE}] requests/s")
    mix = parse_mix(args.mix, args.prompt, args.max_tokens)
    images = make_images(args.image, args.clients if args.distinct_images else 1)
    server = None
    url = args.url
    if url is None:
        server, url = start_server(args.model, args.api_key, serve_args, args.startup_timeout, args.server_root)
    try:
        stats_before = get_stats(url, args.api_key)
        if args.rate is None:
            records, wall = run_clients(url, args, images, mix)
        else:
            records, wall = run_arrivals(url, args, images, mix)
        stats_after = get_stats(url, args.api_key)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    print_report(records, wall, args, stats_before, stats_after)
    return 0 if records else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="server to test (default: start one with --model)")
    parser.add_argument("--model", help="checkpoint for the started server (default: the bundled demo model)")
    parser.add_argument("--api-key", help="Bearer key for the server")
    parser.add_argument("--clients", type=int, default=4, help=f"concurrent clients (default 4, at most {MAX_CLIENTS})")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    parser.add_argument("--max-requests", type=int, default=10_000, help="stop after this many requests")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    parser.add_argument("--prompt", default="caption en", help="prompt of each request (default 'caption en')")
    parser.add_argument("--mix", action="append", metavar="PROMPT:MAX_TOKENS:WEIGHT",
                        help="a kind of request and its share (repeatable; default: --prompt with --max-tokens)")
    parser.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s "
                        "(default: closed loop with --clients)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times and the mix (default 0)")
    parser.add_argument("--server-root", help="start the server from this checkout (default: this one)")
    parser.add_argument("--image", help="image file (default: the package's example image, else a generated one)")
    parser.add_argument("--distinct-images", action="store_true",
                        help="one image per client, so the server's image cache cannot serve them all")
    parser.add_argument("--stream", action="store_true", help="stream, and measure time to first token")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server")
    return parser.parse_args(argv)


def make_images(path: str | None, count: int) -> list[str]:
    """`count` PNG data URIs; distinct ones differ in one pixel (so their sha256 differ)."""
    if path:
        base = Image.open(path).convert("RGB")
    elif EXAMPLE_IMAGE.is_file():
        base = Image.open(EXAMPLE_IMAGE).convert("RGB")
    else:
        base = Image.linear_gradient("L").convert("RGB").resize((224, 224))
    uris = []
    for index in range(count):
        image = base.copy()
        image.putpixel((0, 0), (index % 256, index // 256 % 256, 7))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        uris.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def parse_mix(specs: list[str] | None, prompt: str, max_tokens: int) -> list[tuple[str, int, float]]:
    """--mix "PROMPT:MAX_TOKENS:WEIGHT" options as (prompt, max_tokens, weight); the prompt may hold colons."""
    if not specs:
        return [(prompt, max_tokens, 1.0)]
    mix = []
    for spec in specs:
        text, _, rest = spec.rpartition(":")
        text, _, tokens = text.rpartition(":")
        try:
            mix.append((text, int(tokens), float(rest)))
        except ValueError:
            raise SystemExit(f"--mix {spec!r}: expected PROMPT:MAX_TOKENS:WEIGHT") from None
        if not text or mix[-1][1] < 1 or mix[-1][2] <= 0:
            raise SystemExit(f"--mix {spec!r}: needs a prompt, max_tokens >= 1 and a weight > 0")
    return mix


def start_server(model: str | None, api_key: str | None, serve_args: list[str], timeout: float,
                 root: str | None = None):
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "paligemma", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", *(["--model", model] if model else []),
               *(["--api-key", api_key] if api_key else []), *serve_args]
    root = Path(root).resolve() if root else ROOT
    print("starting:", " ".join(command), "in", root, file=sys.stderr)
    process = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise SystemExit(f"the server did not answer /health within {timeout} s")


def get_stats(url: str, api_key: str | None) -> dict:
    try:
        return httpx.get(url + "/stats", headers=_headers(api_key), timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return {}


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def run_clients(url: str, args: argparse.Namespace, images: list[str],
                mix: list[tuple[str, int, float]]) -> tuple[list[dict], float]:
    """Run the clients; returns one record per request and the wall time."""
    records: list[dict] = []
    lock = threading.Lock()
    sent = [0]
    start = time.monotonic()
    stop_at = start + args.duration
    draw = random.Random(args.seed)

    def client(index: int) -> None:
        with httpx.Client(timeout=args.timeout, headers=_headers(args.api_key)) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= args.max_requests:
                        return
                    sent[0] += 1
                    prompt, max_tokens, _ = draw.choices(mix, weights=[w for *_, w in mix])[0]
                record = one_request(http, url, args, images[index % len(images)], prompt, max_tokens)
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.duration + args.timeout + 10)
    return records, time.monotonic() - start


def arrival_schedule(rate: float, duration: float, max_requests: int, seed: int,
                     mix: list[tuple[str, int, float]]) -> list[tuple[float, str, int]]:
    """(send time in s from the start, prompt, max_tokens) of each request: Poisson arrivals, seeded."""
    draw = random.Random(seed)
    schedule, at = [], draw.expovariate(rate)
    while at < duration and len(schedule) < max_requests:
        prompt, max_tokens, _ = draw.choices(mix, weights=[w for *_, w in mix])[0]
        schedule.append((at, prompt, max_tokens))
        at += draw.expovariate(rate)
    return schedule


def run_arrivals(url: str, args: argparse.Namespace, images: list[str],
                 mix: list[tuple[str, int, float]]) -> tuple[list[dict], float]:
    """Send each request of the schedule at its time, on its own thread; returns the records and wall time."""
    schedule = arrival_schedule(args.rate, args.duration, args.max_requests, args.seed, mix)
    records: list[dict] = []
    lock = threading.Lock()
    start = time.monotonic()

    def send(index: int, at: float, prompt: str, max_tokens: int) -> None:
        time.sleep(max(0.0, start + at - time.monotonic()))
        with httpx.Client(timeout=args.timeout, headers=_headers(args.api_key)) as http:
            record = one_request(http, url, args, images[index % len(images)], prompt, max_tokens)
        with lock:
            records.append(record)

    threads = [threading.Thread(target=send, args=(i, *item), daemon=True) for i, item in enumerate(schedule)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, start + args.duration + args.timeout + 10 - time.monotonic()))
    return records, time.monotonic() - start


def one_request(http: httpx.Client, url: str, args: argparse.Namespace, image: str, prompt: str,
                max_tokens: int) -> dict:
    body = {"model": "paligemma", "max_tokens": max_tokens, "stream": args.stream,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": prompt}]}]}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    started = time.monotonic()
    record = {"ok": False, "latency": None, "ttft": None, "tokens": 0, "error": None, "prompt": prompt,
              "pause": 0.0}  # the longest wait between two content chunks (a stream's stall)
    try:
        if args.stream:
            last = 0.0  # when the previous content chunk came
            with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    record["error"] = f"HTTP {response.status_code}"
                    return record
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if any(c["delta"].get("content") for c in chunk["choices"]):
                        now = time.monotonic() - started
                        if record["ttft"] is None:
                            record["ttft"] = now
                        else:
                            record["pause"] = max(record["pause"], now - last)
                        last = now
                    if chunk.get("usage"):
                        record["tokens"] = chunk["usage"]["completion_tokens"]
        else:
            response = http.post(url + "/v1/chat/completions", json=body)
            if response.status_code != 200:
                record["error"] = f"HTTP {response.status_code}"
                return record
            record["tokens"] = response.json()["usage"]["completion_tokens"]
        record.update(ok=True, latency=time.monotonic() - started)
    except (httpx.HTTPError, ValueError, KeyError) as err:
        record["error"] = type(err).__name__
    return record


def print_report(records: list[dict], wall: float, args: argparse.Namespace, before: dict, after: dict) -> None:
    ok = [r for r in records if r["ok"]]
    latencies = sorted(r["latency"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    errors = collections.Counter(r["error"] for r in records if not r["ok"])
    load = ("clients", args.clients) if args.rate is None else ("arrivals (requests/s)", f"{args.rate:g}")
    rows = [
        load, ("duration (s)", f"{wall:.1f}"), ("requests", len(records)),
        ("succeeded", len(ok)), ("errors", sum(errors.values())),
        ("requests/s", f"{len(ok) / wall:.2f}"),
        ("completion tokens/s", f"{sum(r['tokens'] for r in ok) / wall:.1f}"),
        ("latency p50 (s)", _pct(latencies, 50)), ("latency p90 (s)", _pct(latencies, 90)),
        ("latency p99 (s)", _pct(latencies, 99)),
        ("latency mean (s)", f"{statistics.fmean(latencies):.3f}" if latencies else "-"),
    ]
    if args.stream:
        pauses = sorted(r["pause"] for r in ok)
        rows += [("first token p50 (s)", _pct(ttfts, 50)), ("first token p90 (s)", _pct(ttfts, 90)),
                 ("first token p99 (s)", _pct(ttfts, 99)),
                 ("longest pause in a stream p50 / p99 (s)", f"{_pct(pauses, 50)} / {_pct(pauses, 99)}")]
    prompts = sorted({r["prompt"] for r in ok})
    if len(prompts) > 1:
        for prompt in prompts:
            mine = sorted(r["latency"] for r in ok if r["prompt"] == prompt)
            rows.append((f"'{prompt}' ({len(mine)}) latency p50 / p90 (s)", f"{_pct(mine, 50)} / {_pct(mine, 90)}"))
    # Counters of the server's engine: static batches (older servers) or decode steps (continuous batching).
    for key in ("batches", "prefills", "decode_steps", "max_batch_size", "image_cache_hits", "image_cache_misses"):
        if key in after:
            value = after[key] if key == "max_batch_size" else after[key] - before.get(key, 0)
            rows.append((f"server {key.replace('_', ' ')}", value))
    if after.get("batches", 0) > before.get("batches", 0):
        rows.append(("server mean batch size", f"{len(ok) / (after['batches'] - before.get('batches', 0)):.2f}"))
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    if steps:
        rows.append(("server mean rows per decode step",
                     f"{(after['rows_decoded'] - before.get('rows_decoded', 0)) / steps:.2f}"))
    rows += [(f"error: {kind}", count) for kind, count in errors.most_common()]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 10}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _pct(values: list[float], percent: float) -> str:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return "-"
    rank = max(0, min(len(values) - 1, round(percent / 100 * len(values) + 0.5) - 1))
    return f"{values[rank]:.3f}"


if __name__ == "__main__":
    sys.exit(main())
