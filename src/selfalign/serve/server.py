"""Run the app with uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0) -> tuple[Any, int]:
    """Start uvicorn for ``app`` in a daemon thread on ``host:port`` (0: a free port); return (server, port).

    Stop it with ``server.should_exit = True`` (then join ``server.thread``).
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    server.thread = thread  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.02)
    return server, port
