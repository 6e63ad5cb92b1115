"""A threaded HTTP server on 127.0.0.1 that records what it receives: the scaffolding shared by
the scripted upstreams of the end-to-end tests (openai_upstream.py, anthropic_upstream.py).

A handler records a request with ``self.server.owner.record({...})``; tests read
``requests`` / ``last_request``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler with helpers to answer a whole body at once."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without this, Nagle's algorithm and the
    # client's delayed ACK hold the body back 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(body).encode(), headers)

    def _send(self, status: int, content_type: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "RecordingServer"


class RecordingServer:
    """Serves ``handler`` on 127.0.0.1 (port 0 unless given) in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str, port: int = 0) -> None:
        self._server = _Server(("127.0.0.1", port), handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []

    @property
    def addr(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def record(self, request: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> dict[str, Any]:
        with self._lock:
            assert self._requests, f"{self._thread.name} received no request"
            return self._requests[-1]
