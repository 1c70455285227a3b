"""A Google Cloud Storage JSON API on localhost for the tests: gcp-storage-emulator, plus the
object generations Orbax needs.

gcp-storage-emulator serves the API the clients use, but ignores the generation preconditions
(`ifGenerationMatch`, `ifGenerationNotMatch`) and sends no `x-goog-generation` header with an
object's bytes. TensorStore's OCDBT format (Orbax's checkpoints) updates its manifest by
compare-and-swap on generations, so without them a checkpoint of more than a few arrays fails
("Malformed StorageGeneration"). This module adds what the real service does: the header on
downloads, 304 for a matching `ifGenerationNotMatch` read, 412 for a failed precondition on
reads, uploads and deletes. Run it as `python -m tests.gcs_server --port PORT --bucket NAME`.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from http import HTTPStatus

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


def patch_emulator() -> None:
    """Wraps the emulator's object handlers (idempotent)."""
    if getattr(objects, "_msk_generations", False):
        return
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    args = parser.parse_args()
    patch_emulator()
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
