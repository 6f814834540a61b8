"""`dpokit annotate serve`: the labelling web app, a Starlette application on uvicorn over the annotation database.

Routes (everything else is 404):

* ``GET /`` and ``GET /static/{app.js, style.css}``: the page, a small file with no dependency, shipped with dpokit;
* ``GET /api/session``: who the request is from, the guidelines, whether tokens are required;
* ``GET /api/next``: the next item for the annotator (`Store.next_item`) and their progress;
* ``POST /api/decision`` ``{"item", "choice": left|right|tie|skip, "rationale"}``: one decision, answered only
  once it is committed to the database;
* ``GET /healthz``: ready.

Who is asking. Bound to a loopback address (the default, 127.0.0.1) the server trusts the machine: the page sends
the annotator's name, asked once, in an ``X-Annotator`` header. Bound to any other address, every API request needs
``Authorization: Bearer TOKEN``, a token made per annotator by `dpokit annotate tokens` (the page reads it once from
its link, ``http://HOST:PORT/?token=...``); without one the answer is 401, with an unknown one 403.

Every request is checked before it changes anything: a loopback server answers only requests addressed to a
loopback name (a web page elsewhere cannot reach it by DNS rebinding), a custom header is required (a cross-site
form or simple request cannot carry one without the browser asking, and the server never allows it), a decision
body is JSON of at most `MAX_BODY` bytes with known keys, a known item, an allowed choice and a rationale of at
most `MAX_RATIONALE` characters. A bad request gets a 4xx answer with a one-line reason and changes nothing. The
page shows every text with ``textContent``, never as HTML, under a Content-Security-Policy that allows no inline
script.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from importlib import resources
from typing import Optional

from dpokit.annotate.store import SHOWN_CHOICES, Refused, Store

MAX_BODY = 16 * 1024
MAX_RATIONALE = 2000
MAX_GUIDELINES = 200_000
NAME = re.compile(r"^[\w.@+ -]{1,64}$")
ITEM = re.compile(r"^[0-9a-f]{32}$")
LOOPBACK_NAMES = ("localhost",)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the page's link may carry a token
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Guard:
    """ASGI middleware: the security headers on every answer and, on a loopback server, the Host check."""

    def __init__(self, app, loopback_only: bool):
        self.app, self.loopback_only = app, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.loopback_only:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if not is_loopback(name):
                return await _plain(send, 421, f"this server answers requests to a loopback address, not {host!r}")

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(k.encode(), v.encode()) for k, v in HEADERS.items()]
            await send(message)

        await self.app(scope, receive, with_headers)


async def _plain(send, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *((k.encode(), v.encode()) for k, v in HEADERS.items())]})
    await send({"type": "http.response.body", "body": body})


def create_app(store: Store, *, tokens_required: bool, loopback_only: bool, guidelines: str = ""):
    """The ASGI application (module docstring) over `store`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    pages = {path: (resources.files("dpokit.annotate").joinpath("static", name).read_bytes(), media)
             for path, (name, media) in STATIC.items()}

    def error(status: int, text: str) -> JSONResponse:
        return JSONResponse({"error": text}, status_code=status)

    def who(request: Request) -> tuple[Optional[str], Optional[JSONResponse]]:
        """(annotator, None) or (None, the error answer)."""
        if tokens_required:
            auth = request.headers.get("authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                return None, error(401, "this server needs an annotator token: open the link with ?token=...")
            name = store.annotator_for_token(auth[7:].strip())
            if name is None:
                return None, error(403, "unknown token")
            return name, None
        name = request.headers.get("x-annotator", "").strip()
        if not name:
            return None, error(400, "no annotator name (X-Annotator header)")
        if not NAME.match(name):
            return None, error(400, "an annotator name is 1 to 64 letters, digits, spaces or . @ + - _")
        return name, None

    async def page(request: Request) -> Response:
        body, media = pages[request.url.path]
        return Response(body, media_type=media)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def session(request: Request) -> Response:
        base = {"tokens_required": tokens_required, "guidelines": guidelines, "kind": store.kind}
        has_name = request.headers.get("x-annotator") or request.headers.get("authorization")
        if not has_name:
            return JSONResponse({**base, "annotator": None})
        name, refused = who(request)
        if refused is not None:
            return refused
        return JSONResponse({**base, "annotator": name})

    async def next_item(request: Request) -> Response:
        name, refused = who(request)
        if refused is not None:
            return refused
        item = await run_in_threadpool(store.next_item, name)
        progress = await run_in_threadpool(store.progress, name)
        return JSONResponse({"item": item, "progress": progress})

    async def decision(request: Request) -> Response:
        name, refused = who(request)
        if refused is not None:
            return refused
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "a decision is sent as application/json")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            return error(413, f"a decision is at most {MAX_BODY} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return error(413, f"a decision is at most {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the body is not JSON")
        if not isinstance(data, dict):
            return error(400, "the body must be a JSON object")
        unknown = set(data) - {"item", "choice", "rationale"}
        if unknown:
            return error(400, f"unknown field {sorted(unknown)[0]!r}")
        item, choice, rationale = data.get("item"), data.get("choice"), data.get("rationale", "")
        if not isinstance(item, str) or not ITEM.match(item):
            return error(400, "'item' must be an item id")
        if choice not in SHOWN_CHOICES:
            return error(400, f"'choice' must be one of {', '.join(SHOWN_CHOICES)}")
        if not isinstance(rationale, str) or len(rationale) > MAX_RATIONALE:
            return error(400, f"'rationale' must be text of at most {MAX_RATIONALE} characters")
        try:
            repeated = await run_in_threadpool(store.decide, name, item, choice, rationale)
        except Refused as exc:
            return error(exc.status, str(exc))
        progress = await run_in_threadpool(store.progress, name)
        return JSONResponse({"ok": True, "repeated": repeated, "progress": progress})

    routes = [Route(path, page, methods=["GET"]) for path in STATIC]
    routes += [Route("/healthz", healthz, methods=["GET"]), Route("/api/session", session, methods=["GET"]),
               Route("/api/next", next_item, methods=["GET"]), Route("/api/decision", decision, methods=["POST"])]
    return _Guard(Starlette(routes=routes), loopback_only)


def serve(store: Store, *, host: str, port: int, tokens_required: bool, guidelines: str, announce) -> None:
    """Bind, announce the address (`announce(url)`, port 0 resolved), and serve until interrupted."""
    import uvicorn

    app = create_app(store, tokens_required=tokens_required, loopback_only=is_loopback(host), guidelines=guidelines)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart after a kill binds the same port at once
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from dpokit.errors import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    announce(f"http://{shown}:{bound}/")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
