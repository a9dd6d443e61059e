"""The explorer's web server: one page, its script and style, and a small JSON API (stdlib only).

Routes:
    GET  /                  the page (``static/index.html``), /app.js, /style.css
    GET  /api/info          model, methods, sample images, budget ranges
    GET  /api/crop?image=ID PNG of the centre crop the model sees
    POST /api/upload        body: the bytes of an image file -> {"image": ID}
    POST /api/run           {"image", "method", "kind": "keep"|"speedup", "value"} -> picture, tokens, ...
    POST /api/time          the same plus optional "samples" -> measured forward times

Bad input is answered with a 4xx and ``{"error": "<sentence>"}``; an unexpected failure with a 500
and a sentence (the traceback goes to the server's log, never to the page).
"""

from __future__ import annotations

import io
import json
import socket
import sys
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

from .images import MAX_UPLOAD_BYTES, UnknownImage
from .session import Explorer

#: the files the page is made of, served from this package (nothing comes from the network)
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
#: largest JSON request body, in bytes
MAX_JSON_BYTES = 64 * 1024


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a sentence for the page."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def static_file(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class ExploreHandler(BaseHTTPRequestHandler):
    """Answers one request with the server's :class:`Explorer` (``self.server.explorer``)."""

    server_version = "tokenbudget-explore"
    protocol_version = "HTTP/1.1"

    # -- routing ---------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlparse(self.path)
        if url.path in STATIC:
            name, content_type = STATIC[url.path]
            self._send(HTTPStatus.OK, static_file(name), content_type)
            return
        routes: dict[str, Callable[[dict[str, list[str]]], Any]] = {
            "/api/info": lambda query: self.explorer.info(),
            "/api/crop": self._crop,
        }
        self._answer(routes, url.path, lambda: parse_qs(url.query))

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlparse(self.path)
        routes: dict[str, Callable[[Any], Any]] = {
            "/api/upload": lambda body: {"image": self.explorer.add_upload(body)},
            "/api/run": lambda body: self.explorer.run(**_budget_request(body)),
            "/api/time": lambda body: self.explorer.measure_speed(**_budget_request(body, timing=True)),
        }
        self._answer(routes, url.path, lambda: self._body(raw=url.path == "/api/upload"))

    @property
    def explorer(self) -> Explorer:
        return self.server.explorer  # type: ignore[attr-defined]

    def _answer(self, routes: dict[str, Callable[[Any], Any]], path: str, request: Callable[[], Any]) -> None:
        try:
            if path not in routes:
                self.close_connection = True  # a request body, if any, stays unread
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such page: {path}; open / for the explorer")
            result = routes[path](request())
        except RequestError as err:
            self._send_error(err.status, str(err))
            return
        except UnknownImage as err:
            self._send_error(HTTPStatus.NOT_FOUND, str(err.args[0]))
            return
        except ValueError as err:
            self._send_error(HTTPStatus.BAD_REQUEST, str(err))
            return
        except Exception as err:  # noqa: BLE001 - the page gets a sentence, the log the traceback
            traceback.print_exc(file=sys.stderr)
            self._send_error(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"the explorer failed on this request ({type(err).__name__}: {err}); see the server's log",
            )
            return
        if isinstance(result, bytes):
            self._send(HTTPStatus.OK, result, "image/png")
        else:
            self._send(HTTPStatus.OK, json.dumps(result).encode(), "application/json")

    # -- requests --------------------------------------------------------------------------------
    def _body(self, raw: bool) -> Any:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the request needs a Content-Length header")
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_header!r}") from None
        limit = MAX_UPLOAD_BYTES if raw else MAX_JSON_BYTES
        if length < 0 or length > limit:
            # The body is not read: close the connection rather than leave it in the stream.
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request body is {length / 2**20:.1f} MiB; the limit is {limit / 2**20:.2f} MiB"
                + (" (resize the image first)" if raw else ""),
            )
        body = self.rfile.read(length)
        if raw:
            return body
        try:
            data = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return data

    def _crop(self, query: dict[str, list[str]]) -> bytes:
        from PIL import Image

        if "image" not in query:
            raise ValueError("give the image id: /api/crop?image=skimage:astronaut")
        buffer = io.BytesIO()
        Image.fromarray(self.explorer.crop(query["image"][0])).save(buffer, format="PNG")
        return buffer.getvalue()

    # -- responses -------------------------------------------------------------------------------
    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)


def _budget_request(body: dict[str, Any], timing: bool = False) -> dict[str, Any]:
    """The keyword arguments of :meth:`Explorer.run` (or ``measure_speed``) from a JSON body."""
    names = ["image", "method", "kind", "value"]
    missing = [n for n in names if n not in body]
    if missing:
        raise ValueError(
            f"the request lacks {', '.join(missing)}; send e.g. "
            '{"image": "skimage:astronaut", "method": "tome", "kind": "keep", "value": 0.5}'
        )
    args = {"image_id": body["image"], "method": body["method"], "kind": body["kind"], "value": body["value"]}
    if timing and "samples" in body:
        args["samples"] = body["samples"]
    return args


class ExploreServer(ThreadingHTTPServer):
    """One thread per request; request threads never keep the process alive."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A page closed or reloaded while its answer was on the way is no error of the server.
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class ExploreServer6(ExploreServer):
    address_family = socket.AF_INET6


def make_server(
    explorer: Explorer, host: str = "127.0.0.1", port: int = 7860, verbose: bool = False
) -> ExploreServer:
    """A threading HTTP server (not yet serving) answering with ``explorer``; port 0 picks a free
    port (``server.server_address[1]``). An IPv6 ``host`` (``"::1"``) listens on IPv6."""
    server = (ExploreServer6 if ":" in host else ExploreServer)((host, port), ExploreHandler)
    server.explorer = explorer  # type: ignore[attr-defined]
    server.verbose = verbose  # type: ignore[attr-defined]
    return server
