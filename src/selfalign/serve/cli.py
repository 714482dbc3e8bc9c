"""``selfalign serve INDEX_DIR``: the search service and its web page on uvicorn."""

from __future__ import annotations

import ipaddress
import os
import sys

from selfalign.errors import SelfAlignError

TOKEN_ENV = "SELFALIGN_TOKEN"


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args) -> None:
    try:
        import uvicorn

        from selfalign.serve.app import create_app
    except ImportError as exc:
        raise SelfAlignError(f"serve needs the 'serve' extra: pip install 'selfalign[serve]' ({exc})") from None
    from selfalign.index.gallery import Gallery
    from selfalign.train.trainer import resolve_device

    if not 0 <= args.port <= 65535:
        raise SelfAlignError(f"--port must be 0..65535, got {args.port}")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        print(f"warning: serving on {args.host} without a token: anyone who can reach it can search the gallery "
              f"and read its images (set --token or {TOKEN_ENV})", file=sys.stderr)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    print(f"loading {args.index_dir} ...", file=sys.stderr, flush=True)
    gallery = Gallery.load(args.index_dir, device=resolve_device(args.device), load_extractor=True)
    app = create_app(gallery, token=token)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    fragment = "#token=<your token>" if token else ""
    print(f"serving {len(gallery)} images on http://{shown}:{args.port}/{fragment}  (API docs: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=not args.quiet)


def register(subparsers) -> None:
    """Add the ``serve`` sub-command to the ``selfalign`` parser."""
    p = subparsers.add_parser("serve", help="serve a gallery: search API + web page (FastAPI on uvicorn)")
    p.add_argument("index_dir", help="a gallery built by 'selfalign index'")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' on the API (default: ${TOKEN_ENV})")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=_cmd_serve)
