"""HTTP serving: an OpenAI-compatible chat-completions API with continuous batching, metrics, and a web page.

    paligemma serve --model DIR            # then open http://127.0.0.1:8000/

Modules: `schemas` (request validation, errors), `image_sources` (data: URIs, guarded remote
fetching), `batcher` (the engine owning the model: queue, scheduling, per-row text),
`running_batch` (the decode batch rows join and leave, tensor-level), `metrics` (Prometheus),
`app` (FastAPI routes), `cli` (`paligemma serve`). FastAPI, uvicorn and prometheus-client are
optional: only `app`, `metrics` and `cli.run` import them. Documentation: docs/server.md.
"""
