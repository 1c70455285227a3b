"""A Google Cloud Storage JSON API on localhost for the tests: gcp-storage-emulator, plus the
object generations Orbax needs.

gcp-storage-emulator serves the API the clients use, but ignores the generation preconditions
(`ifGenerationMatch`, `ifGenerationNotMatch`) and sends no `x-goog-generation` header with an
object's bytes. TensorStore's OCDBT format (Orbax's checkpoints) updates its manifest by
compare-and-swap on generations, so without them a checkpoint of more than a few arrays fails
("Malformed StorageGeneration"). This module adds what the real service does: the header on
downloads, 304 for a matching `ifGenerationNotMatch` read, 412 for a failed precondition on
reads, uploads and deletes. It also keeps an upload's bytes exact: the emulator reads a
multipart upload (gcsfs's for small objects) with Python's email parser, which drops a final
carriage return of the object (an Orbax manifest ending in 0x0d came back a byte short).
Run it as `python -m tests.gcs_server --port PORT --bucket NAME`.

Like the real service, and unlike the emulator alone, it answers requests concurrently (a thread
per connection) and keeps connections open between reads (HTTP/1.1). For tests and benchmarks of reads against a bucket's latency, each request can
wait a while before it is answered (`--latency-ms`, or `MSK_GCS_LATENCY_MS`; concurrent requests
wait together, not in turn), and the server counts the requests it answers. Both through
`/_msk/` on the same port (clients: `msk_jax.bench.bucket.set_latency`, `request_counts`):

    POST /_msk/latency?ms=20    every request from now on waits 20 ms
    GET  /_msk/counts           {"requests": all requests answered, "ranged_reads": those with a Range header}
    POST /_msk/counts           resets the counts
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import signal
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import ThreadingHTTPServer

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _current_generation(request, storage, object_id):
    try:
        return str(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
    except NotFound:
        return None


def _precondition_failed(request, current) -> HTTPStatus | None:
    """The status a request's generation preconditions call for, None when they hold."""
    match = request.query.get("ifGenerationMatch")
    if match:
        want = match[0]
        if (want == "0" and current is not None) or (want != "0" and current != want):
            return HTTPStatus.PRECONDITION_FAILED
    not_match = request.query.get("ifGenerationNotMatch")
    if not_match and current is not None and current == not_match[0]:
        return HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
    return None


def _with_generations(handler, object_id_of):
    def wrapped(request, response, storage, *args, **kwargs):
        object_id = object_id_of(request)
        current = _current_generation(request, storage, object_id) if object_id else None
        status = _precondition_failed(request, current)
        if status is not None:
            response.status = status
            if status == HTTPStatus.PRECONDITION_FAILED:
                response.json({"error": {"code": 412, "message": "Precondition Failed"}})
            return None
        if current is not None and request.method == "GET":
            response["x-goog-generation"] = current
            response["x-goog-metageneration"] = "1"
        return handler(request, response, storage, *args, **kwargs)

    return wrapped


def _path_object(request):
    return request.params.get("object_id")


def _upload_object(request):
    name = request.query.get("name")
    return name[0] if name else None


def _multipart_related(raw: bytes, content_type: str) -> dict | None:
    """A multipart/related upload's metadata and content, split on its boundary in bytes. The
    line break before each boundary belongs to the boundary (RFC 2046), and it is the one the
    body's first boundary line ends with: gcsfs writes bare LFs, so in its "...\\r\\n--==0=="
    the CR is the object's last byte. None when the body is not the two parts an upload sends."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = b"--" + value.strip().strip('"').encode()
    if not boundary or not raw.startswith(boundary):
        return None
    eol = b"\r\n" if raw[len(boundary):].startswith(b"\r\n") else b"\n"
    parts = raw[len(boundary) + len(eol):].split(eol + boundary)
    if len(parts) != 3 or not parts[2].startswith(b"--"):  # metadata, content, then the closing "--"
        return None
    sections = []
    for part in parts[:2]:
        head, _, body = part.removeprefix(eol).partition(eol + eol)
        headers = dict(line.split(":", 1) for line in head.decode().splitlines() if ":" in line)
        sections.append(({k.strip().lower(): v.strip() for k, v in headers.items()}, body))
    (_, meta), (headers, content) = sections
    if headers.get("content-transfer-encoding", "").lower() == "base64":
        content = base64.b64decode(content)
    return {"meta": json.loads(meta), "content": content,
            "content-type": headers.get("content-type", "application/octet-stream").split(";")[0]}


def _exact_read_data(original):
    def read_data(request_handler, query):
        content_type = request_handler.headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/related"):
            return original(request_handler, query)
        raw = emulator_server._decode_raw_data(emulator_server._read_raw_data(request_handler), request_handler)
        return (raw and _multipart_related(raw, content_type)) or None

    return read_data


def patch_emulator() -> None:
    """Wraps the emulator's object handlers and its reading of multipart uploads (idempotent)."""
    if getattr(objects, "_msk_generations", False):
        return
    emulator_server._read_data = _exact_read_data(emulator_server._read_data)
    replacements = {
        objects.get: _with_generations(objects.get, _path_object),
        objects.download: _with_generations(objects.download, _path_object),
        objects.delete: _with_generations(objects.delete, _path_object),
        objects.insert: _with_generations(objects.insert, _upload_object),
    }
    # `get` calls `download` for alt=media: the inner call finds the preconditions already checked.
    objects.insert = replacements[objects.insert]
    for _, handlers in emulator_server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in replacements:
                handlers[method] = replacements[handler]
    objects._msk_generations = True


class _Served:
    """What the `/_msk/` endpoints set and read: the latency and the counts of this process."""

    lock = threading.Lock()
    latency_s = 0.0
    requests = 0
    ranged_reads = 0


CONTROL = "/_msk/"


def _control(handler, method: str, url) -> None:
    """Answers a `/_msk/` request (latency, counts) at once."""
    query = urllib.parse.parse_qs(url.query)
    status, body = HTTPStatus.OK, None
    with _Served.lock:
        if url.path == CONTROL + "latency":
            if method == "POST":
                _Served.latency_s = float(query.get("ms", ["0"])[0]) / 1e3
            body = {"latency_ms": _Served.latency_s * 1e3}
        elif url.path == CONTROL + "counts":
            if method == "POST":
                _Served.requests = _Served.ranged_reads = 0
            body = {"requests": _Served.requests, "ranged_reads": _Served.ranged_reads}
        else:
            status, body = HTTPStatus.NOT_FOUND, {"error": f"no {url.path}"}
    data = json.dumps(body).encode()
    handler.send_response(status.value, status.phrase)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _handle(router, method, original):
    """The emulator's request routing, after the request's latency (outside any lock, so
    concurrent requests wait together); `/_msk/` requests are answered here."""
    handler = router._request_handler
    url = urllib.parse.urlsplit(handler.path)
    if url.path.startswith(CONTROL):
        return _control(handler, method, url)
    with _Served.lock:
        _Served.requests += 1
        _Served.ranged_reads += handler.headers.get("range") is not None
        latency = _Served.latency_s
    if latency:
        time.sleep(latency)
    return original(router, method)


def _serialised(handler, lock):
    """The emulator's handler run under `lock`: its storage is not made for concurrent use (the
    requests still wait out their latency and send their answers concurrently)."""
    def wrapped(*args, **kwargs):
        with lock:
            return handler(*args, **kwargs)

    return wrapped


class _ThreadingServer(ThreadingHTTPServer):
    """A thread per connection; a long queue of connections, as many readers open them at once."""

    daemon_threads = True
    request_queue_size = 1024


class _RequestHandler(emulator_server.RequestHandler):
    """Keeps connections open between reads, as the real service does (HTTP/1.1): a GET has no
    body, so the next request starts where it ends. Other requests close theirs, since the
    emulator may answer them without reading their body (a failed precondition)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # a response's header and body go out at once

    def end_headers(self):
        if self.command != "GET" or self.headers.get("Content-Length", "0") != "0" \
                or self.headers.get("Transfer-Encoding"):
            self.send_header("Connection", "close")
        super().end_headers()


def _run_api(api) -> None:
    """`APIThread.run` with a threaded HTTP server."""
    api._httpd = _ThreadingServer((api._host, api._port), functools.partial(_RequestHandler, api._storage))
    api.is_running.set()
    api._httpd.serve_forever()


def serve_concurrently() -> None:
    """Makes the emulator answer requests concurrently, with the latency and counts of `/_msk/`
    (idempotent)."""
    if getattr(emulator_server, "_msk_concurrent", False):
        return
    lock = threading.RLock()  # `get` calls `download`
    for _, handlers in emulator_server.HANDLERS:
        for method, handler in list(handlers.items()):
            handlers[method] = _serialised(handler, lock)
    objects.insert = _serialised(objects.insert, lock)  # the router's fallback for uploads
    original = emulator_server.Router.handle
    emulator_server.Router.handle = lambda router, method: _handle(router, method, original)
    emulator_server.APIThread.run = _run_api
    emulator_server._msk_concurrent = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--latency-ms", type=float, default=float(os.environ.get("MSK_GCS_LATENCY_MS", 0)),
                        help="wait this long before answering each request (concurrent requests wait together)")
    args = parser.parse_args()
    patch_emulator()
    serve_concurrently()
    _Served.latency_s = args.latency_ms / 1e3
    server = emulator_server.create_server(args.host, args.port, in_memory=True, default_bucket=args.bucket)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    os._exit(0)  # the emulator's HTTP thread does not stop by itself


if __name__ == "__main__":
    main()
