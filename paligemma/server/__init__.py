"""HTTP serving: an OpenAI-compatible chat-completions API with request batching, and a web page.

    paligemma serve --model DIR            # then open http://127.0.0.1:8000/

Modules: `schemas` (request validation, errors), `image_sources` (data: URIs, guarded remote
fetching), `batcher` (the batching engine owning the model), `app` (FastAPI routes), `cli`
(`paligemma serve`). FastAPI and uvicorn are optional: only `app` and `cli.run` import them.
Documentation: docs/server.md.
"""
