"""The web layer: a FastAPI search service and its page over a gallery built by ``selfalign index``."""

from __future__ import annotations

from selfalign.serve.server import serve_in_thread

__all__ = ["create_app", "serve_in_thread"]


def __getattr__(name: str):
    # create_app pulls in FastAPI: imported on use, so ``import selfalign.serve`` stays light
    if name == "create_app":
        from selfalign.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'selfalign.serve' has no attribute {name!r}")
