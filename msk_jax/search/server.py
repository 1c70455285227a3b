"""`python -m msk_jax.search serve`: the index, the run's text tower and word vectors loaded once,
answering a web page and a JSON API (Starlette, served by uvicorn).

    GET  /                          the page (page.html): a query box, ranked windows with their
                                    stills, a player that plays a window from its start
    GET  /api/health                {"status": "ok", windows, videos, shards, step, embeddings,
                                     approximate, limits}
    GET  /api/search?q=...&k=10&embedding=v+a[&approximate=1]
                                    one query: what `query --json` prints for it, plus "method"
                                    and "links" (per hit: its still and its video, or null)
    POST /api/search                {"queries": [...], "k", "embedding", "approximate"}:
                                    {"results": [one object per query, as above]}
    GET  /still/<generation>/<window>   a window's JPEG still
    GET  /video/<generation>/<video>    a video file the index lists (byte ranges, so the
                                    player can seek)

Nothing of a request names a file: stills and videos are numbers into what the index lists
(the generation changes when the index does, so a number of an older index is refused rather
than answered with another window). Queries are bounded (characters, queries per request, k,
body bytes); every error is one JSON object {"error": "..."} with its HTTP status, never a
traceback. The server binds 127.0.0.1 unless told otherwise, reads the index again when its
manifest changes (an append or a removal while it runs), and stops cleanly on SIGINT or SIGTERM
(exit status 0).
"""

from __future__ import annotations

import importlib.resources
import json
import mimetypes
import signal
import socket
import sys
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from msk_jax.search.query import Searcher
from msk_jax.search.store import EMBEDDINGS, SearchError

MAX_QUERY_CHARS = 500
MAX_QUERIES = 32
MAX_K = 200
MAX_BODY_BYTES = 64 * 1024
RELOAD_SECONDS = 2.0
VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
               ".mkv": "video/x-matroska", ".ogv": "video/ogg"}
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
               "media-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'")


class BadRequest(HTTPException):
    def __init__(self, detail: str, status: int = 400):
        super().__init__(status, detail)


class State:
    """The searcher and the generation of the index it holds (changed by each reload)."""

    def __init__(self, searcher: Searcher, reload_seconds: float, log):
        self.searcher, self.reload_seconds, self.log = searcher, reload_seconds, log
        self.generation, self.checked, self.lock = 0, time.monotonic(), threading.Lock()

    def refresh(self) -> None:
        """Reads the index again if its manifest changed (checked every `reload_seconds`)."""
        now = time.monotonic()
        if now - self.checked < self.reload_seconds:
            return
        with self.lock:
            self.checked = now
            try:
                if self.searcher.reload_index():
                    self.generation += 1
                    index = self.searcher.index
                    self.log(f"index changed: {len(index)} windows of {index.videos} videos now")
            except SearchError as err:
                self.log(f"index not reloaded: {' '.join(str(err).split())}")


def _page() -> str:
    return importlib.resources.files("msk_jax.search").joinpath("page.html").read_text(encoding="utf-8")


def _int(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}={str(value)[:40]!r}: not a whole number") from None
    if not low <= number <= high:
        raise BadRequest(f"{name}={number}: must be between {low} and {high}")
    return number


def _bool(value, name: str) -> bool:
    if value in (None, "", False, 0, "0", "false", "no", "off"):
        return False
    if value in (True, 1, "1", "true", "yes", "on"):
        return True
    raise BadRequest(f"{name}={str(value)[:40]!r}: expected 1 or 0")


def _query(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{where}: a query is a string, got {type(value).__name__}")
    if len(value) > MAX_QUERY_CHARS:
        raise BadRequest(f"{where}: a query of {len(value)} characters; at most {MAX_QUERY_CHARS}", 413)
    if not value.strip():
        raise BadRequest(f"{where}: empty query")
    return value


def _embedding(value) -> str:
    embedding = "v+a" if value in (None, "") else value
    # A '+' in a query string arrives as a space.
    embedding = "v+a" if embedding == "v a" else embedding
    if embedding not in EMBEDDINGS:
        raise BadRequest(f"embedding={str(embedding)[:40]!r}: expected one of {', '.join(EMBEDDINGS)}")
    return embedding


def create_app(searcher: Searcher, reload_seconds: float = RELOAD_SECONDS, log=None):
    """The application over `searcher` (Starlette's, inside `OneLineErrors`)."""
    log = log or (lambda message: print(f"[serve] {message}", file=sys.stderr, flush=True))
    state = State(searcher, reload_seconds, log)
    page = _page()

    def answer(results, generation) -> list[dict]:
        index = state.searcher.index
        out = []
        for result in results:
            links = []
            for window in result.windows:
                shard, row = index.locate(window)
                number = index.video_number(window)
                links.append({"still": f"/still/{generation}/{window}" if shard.has_still(row) else None,
                              "video": f"/video/{generation}/{number}" if index.video_file(number) else None})
            out.append({**result.to_json(), "method": result.method, "links": links})
        return out

    async def run_search(queries: list[str], k: int, embedding: str, approximate: bool) -> list[dict]:
        await run_in_threadpool(state.refresh)

        def search():
            with state.lock:  # no reload between the search and its links
                try:
                    return answer(state.searcher.search(queries, k, embedding, approximate), state.generation)
                except SearchError as err:
                    raise BadRequest(" ".join(str(err).split())) from None

        return await run_in_threadpool(search)

    async def home(request: Request) -> Response:
        return HTMLResponse(page, headers={**SECURITY_HEADERS, "Content-Security-Policy": PAGE_POLICY,
                                           "Cache-Control": "no-store"})

    async def health(request: Request) -> Response:
        await run_in_threadpool(state.refresh)
        index = state.searcher.index
        return JSONResponse({"status": "ok", "windows": len(index), "videos": index.videos,
                             "shards": len(index.shards), "format": index.format, "step": index.meta["step"],
                             "window": index.meta.get("window"), "stride": index.meta.get("stride"),
                             "embeddings": EMBEDDINGS, "approximate": state.searcher.has_approximate,
                             "generation": state.generation,
                             "limits": {"query_chars": MAX_QUERY_CHARS, "queries": MAX_QUERIES, "k": MAX_K}},
                            headers=SECURITY_HEADERS)

    async def search_get(request: Request) -> Response:
        params = request.query_params
        unknown = sorted(set(params) - {"q", "k", "embedding", "approximate"})
        if unknown:
            raise BadRequest(f"unknown parameter {unknown[0][:40]!r}: expected q, k, embedding, approximate")
        if "q" not in params:
            raise BadRequest("q: missing (the query)")
        query = _query(params["q"], "q")
        k = _int(params.get("k"), "k", 10, 1, MAX_K)
        results = await run_search([query], k, _embedding(params.get("embedding")),
                                   _bool(params.get("approximate"), "approximate"))
        return JSONResponse(results[0], headers=SECURITY_HEADERS)

    async def search_post(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            raise BadRequest(f"a body of {declared[:20]} bytes; at most {MAX_BODY_BYTES}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise BadRequest(f"a body of more than {MAX_BODY_BYTES} bytes", 413)
        try:
            payload = json.loads(bytes(body))
        except ValueError as err:
            raise BadRequest(f"the body is not JSON ({err})") from None
        if not isinstance(payload, dict):
            raise BadRequest("the body is not a JSON object {\"queries\": [...], ...}")
        unknown = sorted(set(payload) - {"queries", "k", "embedding", "approximate"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:40]!r}: expected queries, k, embedding, approximate")
        queries = payload.get("queries")
        if not isinstance(queries, list) or not queries:
            raise BadRequest("queries: a non-empty list of strings")
        if len(queries) > MAX_QUERIES:
            raise BadRequest(f"queries: {len(queries)} queries; at most {MAX_QUERIES} a request", 413)
        queries = [_query(q, f"queries[{i}]") for i, q in enumerate(queries)]
        k = payload.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int):
            raise BadRequest(f"k={str(k)[:40]!r}: not a whole number")
        k = _int(str(k), "k", 10, 1, MAX_K)
        results = await run_search(queries, k, _embedding(payload.get("embedding")),
                                   _bool(payload.get("approximate"), "approximate"))
        return JSONResponse({"results": results}, headers=SECURITY_HEADERS)

    def _current(generation: int) -> None:
        if generation != state.generation:
            raise BadRequest("the index changed since this search: search again", 404)

    async def still(request: Request) -> Response:
        generation, window = request.path_params["generation"], request.path_params["window"]
        _current(generation)
        index = state.searcher.index
        if not 0 <= window < len(index):
            raise BadRequest(f"no window {window} in the index", 404)
        shard, row = index.locate(window)
        data = await run_in_threadpool(shard.still, row)
        if not data:
            raise BadRequest(f"window {window} has no still", 404)
        return Response(data, media_type="image/jpeg", headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})

    async def video(request: Request) -> Response:
        generation, number = request.path_params["generation"], request.path_params["number"]
        _current(generation)
        index = state.searcher.index
        if not 0 <= number < index.videos:
            raise BadRequest(f"no video {number} in the index", 404)
        file = index.video_file(number)
        if file is None:
            raise BadRequest(f"video {number}: the index lists no file for it (or the file is gone)", 404)
        suffix = file[file.rfind("."):].lower() if "." in file else ""
        media_type = VIDEO_TYPES.get(suffix) or mimetypes.guess_type(file)[0] or "application/octet-stream"
        return FileResponse(file, media_type=media_type, headers=SECURITY_HEADERS)

    async def http_error(request: Request, err: HTTPException) -> Response:
        detail = err.detail if isinstance(err.detail, str) else "error"
        if err.status_code == 404 and detail == "Not Found":
            detail = f"no such page: {request.url.path[:80]}"
        elif err.status_code == 405:
            detail = f"{request.method} is not accepted at {request.url.path[:80]}"
        return JSONResponse({"error": detail}, status_code=err.status_code, headers=SECURITY_HEADERS)

    async def server_error(request: Request, err: Exception) -> Response:
        return JSONResponse({"error": f"internal error: {_one_line(err)}"}, status_code=500, headers=SECURITY_HEADERS)

    routes = [Route("/", home), Route("/api/health", health), Route("/api/search", search_get, methods=["GET"]),
              Route("/api/search", search_post, methods=["POST"]),
              Route("/still/{generation:int}/{window:int}", still),
              Route("/video/{generation:int}/{number:int}", video)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    return OneLineErrors(app, log)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


class OneLineErrors:
    """Logs an unexpected error of a request in one line and ends it there. (Starlette answers it
    with the JSON of `server_error`, then raises it again for the server, which would log its
    traceback.)"""

    def __init__(self, app, log):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        started = []

        async def tracked(message):
            if message["type"] == "http.response.start":
                started.append(True)
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as err:
            self.log(f"{scope.get('method', '')} {str(scope.get('path', ''))[:80]}: {_one_line(err)}")
            if scope["type"] == "http" and not started:
                await JSONResponse({"error": f"internal error: {_one_line(err)}"}, status_code=500)(scope, receive,
                                                                                                   send)


def serve(index: str, host: str = "127.0.0.1", port: int = 8080, config=None, out=sys.stderr) -> int:
    """Loads the index and the run, then serves until SIGINT or SIGTERM; returns 0."""
    try:  # the address first: a port in use is said at once, not after the run is loaded
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise SearchError(f"--host={host} --port={port}: cannot listen there ({err.strerror or err})") from None
    except (OverflowError, ValueError) as err:
        raise SearchError(f"--port={port}: {err}") from None
    try:
        searcher = Searcher(index, config)
        searcher.embed_queries(["warm up"])  # compiles the text tower before the first request
    except BaseException:
        sock.close()
        raise
    stopped = []

    def note(signum, frame):  # uvicorn stops gracefully, then raises the signal it caught here again
        stopped.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), log_level="warning", access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=5))
    print(f"[serve] {len(searcher.index)} windows of {searcher.index.videos} videos from {index} at "
          f"http://{shown}:{bound_port}/ (Ctrl-C or SIGTERM stops it)", file=out, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"[serve] stopped{' by ' + stopped[0] if stopped else ''}", file=out, flush=True)
    return 0
