"""Serving: a FastAPI app with the generation API, a view inside the model, and its web pages.

    from glassgpt.serve import serve
    serve("runs/demo")                      # http://127.0.0.1:8000
    serve(model, tokenizer=tokenizer, port=8001, max_running=2)
"""

from __future__ import annotations

import logging

import uvicorn

from glassgpt.serve.app import ServeSettings, create_app
from glassgpt.serve.site import write_site

__all__ = ["ServeSettings", "create_app", "serve", "write_site"]


def serve(model="runs/demo", host: str = "127.0.0.1", port: int = 8000, tokenizer=None,
          log_level: str = "info", **settings) -> None:
    """Serve `model` (checkpoint dir, preset name, or GPT object with `tokenizer`) until Ctrl-C.

    Binds to loopback unless `host` says otherwise. `settings` are `ServeSettings` fields.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("glassgpt.serve.access")  # JSON lines, one per request, as they are
    if not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.propagate = False
    app = create_app(model, tokenizer, **settings)
    print(f"glassgpt: serving {app.state.host.name} on http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    # Our AccessLog middleware writes one JSON line per request instead of uvicorn's access log.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
