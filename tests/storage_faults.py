"""One process's own view of a bucket, with faults: an HTTP proxy in front of the test's Cloud
Storage API that forwards every request, except reads of objects whose name matches a rule,
which it answers with an error status (always, or the first `times` ones).

A process pointed at it (STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL) sees the same bucket
as the others, and its reads of those objects fail the way the real service fails them: a 404 is
an object this process cannot find, a 503 a transient error.

    python -m tests.storage_faults --port PORT --upstream http://127.0.0.1:UPSTREAM \\
        --fail 'checkpoints/15/=404' --fail 'checkpoints/12/=503x2'
"""

from __future__ import annotations

import argparse
import http.client
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "content-length"}


class Rule:
    """Reads of objects whose name contains `pattern` get `status` (the first `times`, or all)."""

    def __init__(self, spec: str):
        pattern, _, answer = spec.rpartition("=")
        status, _, times = answer.partition("x")
        self.pattern, self.status = re.compile(re.escape(pattern)), int(status)
        self.left = int(times) if times else None
        self.lock = threading.Lock()

    def applies(self, object_name: str) -> bool:
        if not self.pattern.search(object_name):
            return False
        with self.lock:
            if self.left is None:
                return True
            if self.left > 0:
                self.left -= 1
                return True
            return False


def object_name(path: str) -> str | None:
    """The object a JSON API read names (`/storage/v1/b/B/o/NAME` or `/download/storage/v1/...`)."""
    match = re.match(r"^(?:/download)?/storage/v1/b/[^/]+/o/([^?]+)", path)
    return urllib.parse.unquote(match.group(1)) if match else None


def make_handler(upstream: str, rules: list[Rule]):
    target = urllib.parse.urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            name = object_name(self.path)
            if self.command == "GET" and name is not None:
                for rule in rules:
                    if rule.applies(name):
                        message = (b'{"error": {"code": %d, "message": "injected fault"}}' % rule.status)
                        self.send_response(rule.status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(message)))
                        self.end_headers()
                        self.wfile.write(message)
                        return
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            connection.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--fail", action="append", default=[], help="NAME_PART=STATUS[xTIMES]")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args.upstream, [Rule(r) for r in args.fail]))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
