"""A recording stand-in for api.openai.com, for the end-to-end tests of the shipped config.toml.

Standard library only. `RecordingOpenAI().start()` serves on 127.0.0.1 (port 0: a free port) in a
background thread; `.base_url` is what an `openai` connection's `api_base` points at (with /v1).
Every request is recorded (method, path, headers with lower-case names, parsed JSON body) so a
test can check what the gateway sent upstream, the Authorization header included.

`POST /v1/chat/completions` answers one fixed chat completion (`ANSWER`, with usage) naming the
requested model, as JSON or, for `"stream": true`, as OpenAI SSE chunks ending in `[DONE]`.
Anything else is a 404 with an OpenAI error body.
"""

from __future__ import annotations

import json
import re
from typing import Any

from recording_server import RecordingServer, ScriptedHandler

ANSWER = "Hello from the recording upstream."
PROMPT_TOKENS = 9
COMPLETION_TOKENS = 6


def _completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-recording-1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        },
    }


def _chunks(model: str, include_usage: bool) -> list[dict[str, Any]]:
    head = {"id": "chatcmpl-recording-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    usage = {"usage": None} if include_usage else {}
    pieces = re.findall(r"\S+\s*", ANSWER)  # words with their trailing spaces: they join to ANSWER
    deltas = [{"role": "assistant", "content": ""}, *({"content": piece} for piece in pieces)]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}], **usage} for delta in deltas
    ]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], **usage})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": _completion(model)["usage"]})
    return chunks


class _Handler(ScriptedHandler):
    def do_GET(self) -> None:
        self._record(None)
        self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        self._record(body)
        if self.path != "/v1/chat/completions" or not isinstance(body, dict):
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        model = str(body.get("model"))
        if not body.get("stream"):
            self._send_json(200, _completion(model))
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        payload = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in _chunks(model, include_usage))
        payload += "data: [DONE]\n\n"
        self._send(200, "text/event-stream", payload.encode())

    def _record(self, body: Any) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.owner.record({"method": self.command, "path": self.path, "headers": headers, "body": body})


class RecordingOpenAI(RecordingServer):
    def __init__(self) -> None:
        super().__init__(_Handler, "recording-openai")

    @property
    def base_url(self) -> str:
        return f"http://{self.addr}/v1"
