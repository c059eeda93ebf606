"""impasto's HTTP server (`impasto serve`): `create_app(backend)` builds the FastAPI app.

The server's dependencies (fastapi, uvicorn, prometheus_client) are the `serve` extra, so the
names below load on first use: `impasto.serve.a1111` (the prompt parser and PNG parameters
writer the CLI shares) imports without them.
"""

__all__ = ["Backend", "LocalBackend", "Settings", "create_app", "run"]


def __getattr__(name):
    if name in ("create_app", "Settings"):
        from . import app

        return getattr(app, name)
    if name in ("Backend", "LocalBackend"):
        from . import backend

        return getattr(backend, name)
    if name == "run":
        from .server import run

        return run
    raise AttributeError(f"module 'impasto.serve' has no attribute {name!r}")
