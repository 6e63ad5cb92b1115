"""A mock of the Anthropic Messages API (`POST /v1/messages`) for lmgate's end-to-end tests.

Standard library only. `MockAnthropic().start()` serves on 127.0.0.1 (port 0: a free port) in a
background thread; `.addr` is `127.0.0.1:PORT`, `.requests` records every request (path, headers
with lower-case names, parsed JSON body) so tests can check what the gateway sent upstream.

It checks a request the way Anthropic does, as far as lmgate's translation is concerned:
`x-api-key` must be API_KEY (else 401), `anthropic-version` is required, the body must have
`model`, an integer `max_tokens`, non-empty `messages` with only `user`/`assistant` roles that
alternate and start with `user`, `system` only at the top level, no empty text blocks, every
`tool_use` answered by `tool_result` blocks in the next (user) message, Anthropic-shaped
`tools`/`tool_choice`, and no fields the Messages API does not know (Anthropic answers those with
"Extra inputs are not permitted", so OpenAI-only fields such as `n`, `stop`, `stream_options` or
`max_completion_tokens` leaking through are caught). A failed check answers 400 with an Anthropic
error body `{"type":"error","error":{"type":"invalid_request_error","message":...}}`.

The answer depends on the model name (see SCENARIOS and ERROR_SCENARIOS). A streamed answer is
synthesised from the very message the non-streamed request returns, so both agree by construction.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Iterator

from recording_server import RecordingServer

API_KEY = "sk-ant-test"

INPUT_TOKENS = 11
CACHE_READ_TOKENS = 5
OUTPUT_TOKENS = 7

# What the OpenAI side must report for every answer below.
PROMPT_TOKENS = INPUT_TOKENS + CACHE_READ_TOKENS  # 16 (no cache creation tokens)
COMPLETION_TOKENS = OUTPUT_TOKENS  # 7

TEXT_PIECE_CHARS = 3
JSON_PIECE_CHARS = 5

# Quotes, a newline and non-ASCII text (one character outside the BMP) exercise JSON escaping.
TEXT_ANSWER = 'Hello from the mock! "Quoted", a newline\nand caf\u00e9 \u2615 \U0001F600 done.'
TOOL_PREAMBLE = "Let me check the weather in Paris."
WEATHER_TOOL_ID = "toolu_01MockWeatherCall000001"
WEATHER_INPUT = {"city": "Paris", "unit": "c"}
NOARGS_TOOL_ID = "toolu_01MockNoArgsCall0000001"
NOARGS_TOOL_NAME = "get_current_time"
MIDSTREAM_TEXT = "Partial answer"

SCENARIOS: dict[str, dict[str, Any]] = {
    "claude-text": {
        "id": "msg_01MockText00000000000001",
        "content": [{"type": "text", "text": TEXT_ANSWER}],
        "stop_reason": "end_turn",
    },
    "claude-tool": {
        "id": "msg_01MockTool00000000000001",
        "content": [
            {"type": "text", "text": TOOL_PREAMBLE},
            {"type": "tool_use", "id": WEATHER_TOOL_ID, "name": "get_weather", "input": WEATHER_INPUT},
        ],
        "stop_reason": "tool_use",
    },
    "claude-tool-noargs": {
        "id": "msg_01MockToolNoArgs00000001",
        "content": [{"type": "tool_use", "id": NOARGS_TOOL_ID, "name": NOARGS_TOOL_NAME, "input": {}}],
        "stop_reason": "tool_use",
    },
}

# Stream only: message_start, one text delta, then an in-band overloaded error and the end.
MIDSTREAM_ERROR_MODEL = "claude-error-midstream"
MIDSTREAM_ERROR_ID = "msg_01MockMidstreamError0001"

# Model name -> (HTTP status, Anthropic error type, message), answered before any event.
ERROR_SCENARIOS: dict[str, tuple[int, str, str]] = {
    "claude-overloaded": (529, "overloaded_error", "Overloaded"),
    "claude-rate-limited": (429, "rate_limit_error", "mock: too many requests"),
    "claude-invalid-request": (400, "invalid_request_error", "mock: rejected on purpose"),
}

# The Messages API's request fields; anything else is an "Extra inputs are not permitted" error.
TOP_LEVEL_FIELDS = {
    "model", "messages", "max_tokens", "system", "stream", "temperature", "top_p", "top_k",
    "stop_sequences", "metadata", "tools", "tool_choice", "thinking", "service_tier",
    "container", "mcp_servers", "context_management",
}
TOOL_FIELDS = {"name", "description", "input_schema", "cache_control", "type"}
TOOL_CHOICE_TYPES = {"auto", "any", "tool", "none"}
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
TOOL_USE_ID = re.compile(r"^[a-zA-Z0-9_-]+$")


def usage(output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": INPUT_TOKENS,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": CACHE_READ_TOKENS,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def message_for(model: str) -> dict[str, Any]:
    """The Anthropic non-streaming response body of a scenario."""
    scenario = SCENARIOS[model]
    return {
        "id": scenario["id"],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": json.loads(json.dumps(scenario["content"])),
        "stop_reason": scenario["stop_reason"],
        "stop_sequence": None,
        "usage": usage(OUTPUT_TOKENS),
    }


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream_events(message: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The Anthropic event stream of `message`, shaped like the recordings in tests/fixtures."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None, usage=usage(1))
    yield {"type": "message_start", "message": start}
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            yield {"type": "ping"}
            for piece in pieces(block["text"], TEXT_PIECE_CHARS):
                yield {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}
        elif block["type"] == "tool_use":
            head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            yield {"type": "content_block_start", "index": index, "content_block": head}
            # Anthropic opens with an empty partial_json; a tool without arguments sends only that.
            yield {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": ""}}
            yield {"type": "ping"}
            if block["input"]:
                for piece in pieces(json.dumps(block["input"]), JSON_PIECE_CHARS):
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    yield {"type": "content_block_delta", "index": index, "delta": delta}
        else:
            raise AssertionError(f"mock cannot stream a {block['type']} block")
        yield {"type": "content_block_stop", "index": index}
    # Only output_tokens here: the input side must be kept from message_start.
    yield {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": OUTPUT_TOKENS},
    }
    yield {"type": "message_stop"}


def midstream_error_events(model: str) -> Iterator[dict[str, Any]]:
    start = {
        "id": MIDSTREAM_ERROR_ID, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage(1),
    }
    yield {"type": "message_start", "message": start}
    yield {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    yield {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": MIDSTREAM_TEXT}}
    yield {"type": "error", "error": {"details": None, "type": "overloaded_error", "message": "Overloaded"}}


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_mock"}


# --- request validation ------------------------------------------------------------------------


class Invalid(Exception):
    """An invalid_request_error (HTTP 400) with Anthropic-like wording."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Invalid(message)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_text_block(block: dict[str, Any], where: str) -> None:
    require(isinstance(block.get("text"), str), f"{where}.text: Field required")
    require(block["text"] != "", f"{where}: text content blocks must be non-empty")
    require(block["text"].strip() != "", f"{where}: text content blocks must contain non-whitespace text")


def check_block(block: Any, role: str, where: str) -> None:
    require(isinstance(block, dict), f"{where}: Input should be a valid dictionary")
    kind = block.get("type")
    if kind == "text":
        check_text_block(block, where)
    elif kind == "image":
        source = block.get("source")
        require(isinstance(source, dict) and source.get("type") in {"base64", "url"}, f"{where}.source: invalid image source")
    elif kind == "document":
        require(isinstance(block.get("source"), dict), f"{where}.source: Field required")
    elif kind == "tool_use":
        require(role == "assistant", f"{where}: tool_use blocks are only allowed in assistant messages")
        require(isinstance(block.get("id"), str) and bool(TOOL_USE_ID.match(block["id"])), f"{where}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        require(isinstance(block.get("name"), str) and block["name"] != "", f"{where}.name: Field required")
        require(isinstance(block.get("input"), dict), f"{where}.input: Input should be a valid dictionary")
    elif kind == "tool_result":
        require(role == "user", f"{where}: tool_result blocks are only allowed in user messages")
        require(isinstance(block.get("tool_use_id"), str), f"{where}.tool_use_id: Field required")
        content = block.get("content")
        if isinstance(content, list):
            for k, inner in enumerate(content):
                require(isinstance(inner, dict) and inner.get("type") in {"text", "image", "document"}, f"{where}.content.{k}: invalid tool_result content block")
                if inner["type"] == "text":
                    check_text_block(inner, f"{where}.content.{k}")
        else:
            require(content is None or isinstance(content, str), f"{where}.content: Input should be a valid string or list")
        require(isinstance(block.get("is_error", False), bool), f"{where}.is_error: Input should be a valid boolean")
    elif kind in {"thinking", "redacted_thinking"}:
        require(role == "assistant", f"{where}: {kind} blocks are only allowed in assistant messages")
    else:
        raise Invalid(f"{where}.type: Input tag {kind!r} does not match any of the expected tags")


def blocks_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def check_messages(messages: Any) -> None:
    require(isinstance(messages, list), "messages: Field required")
    require(len(messages) > 0, "messages: at least one message is required")
    previous_role = None
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        require(isinstance(message, dict), f"{where}: Input should be a valid dictionary")
        extra = sorted(set(message) - {"role", "content"})
        require(not extra, f"{where}.{extra[0] if extra else ''}: Extra inputs are not permitted")
        role = message.get("role")
        require(role in {"user", "assistant"}, f"{where}.role: Input should be 'user' or 'assistant'")
        if previous_role is None:
            require(role == "user", 'messages: first message must use the "user" role')
        require(role != previous_role, f'messages: roles must alternate between "user" and "assistant", but found multiple "{role}" roles in a row')
        previous_role = role
        content = message.get("content")
        if isinstance(content, str):
            require(content.strip() != "", f"{where}: text content blocks must be non-empty")
        else:
            require(isinstance(content, list) and len(content) > 0, f"{where}.content: Input should be a non-empty string or list")
            for j, block in enumerate(content):
                check_block(block, role, f"{where}.content.{j}")
    # tool_use ids must be answered by tool_result blocks in the next message, and only those.
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        used = [b["id"] for b in blocks_of(message) if b.get("type") == "tool_use"]
        following = messages[i + 1] if i + 1 < len(messages) else None
        answered = [b["tool_use_id"] for b in blocks_of(following) if b.get("type") == "tool_result"] if following else []
        missing = [tool_id for tool_id in used if tool_id not in answered]
        require(not missing, f"messages.{i + 1}: `tool_use` ids were found without `tool_result` blocks immediately after: {', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.")
    for i, message in enumerate(messages):
        if message["role"] != "user":
            continue
        previous = messages[i - 1] if i > 0 else None
        used = {b["id"] for b in blocks_of(previous) if b.get("type") == "tool_use"} if previous else set()
        seen_other = False
        for j, block in enumerate(blocks_of(message)):
            if block.get("type") != "tool_result":
                seen_other = True
                continue
            require(not seen_other, f"messages.{i}.content.{j}: `tool_result` blocks must come first in the user message content, before any other block")
            require(block["tool_use_id"] in used, f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: {block['tool_use_id']}. Each `tool_result` block must have a corresponding `tool_use` block in the previous message.")


def check_body(body: Any) -> None:
    require(isinstance(body, dict), "body: Input should be a valid dictionary")
    extra = sorted(set(body) - TOP_LEVEL_FIELDS)
    require(not extra, f"{extra[0] if extra else ''}: Extra inputs are not permitted")
    require(isinstance(body.get("model"), str) and body["model"] != "", "model: Field required")
    require("max_tokens" in body, "max_tokens: Field required")
    require(is_int(body["max_tokens"]) and body["max_tokens"] >= 1, "max_tokens: Input should be a valid integer greater than 0")
    check_messages(body.get("messages"))
    if "system" in body:
        system = body["system"]
        if isinstance(system, list):
            for i, block in enumerate(system):
                require(isinstance(block, dict) and block.get("type") == "text", f"system.{i}: Input should be a text block")
                check_text_block(block, f"system.{i}")
        else:
            require(isinstance(system, str), "system: Input should be a valid string or list of text blocks")
    if "stream" in body:
        require(isinstance(body["stream"], bool), "stream: Input should be a valid boolean")
    if "stop_sequences" in body:
        stops = body["stop_sequences"]
        require(isinstance(stops, list) and all(isinstance(s, str) for s in stops), "stop_sequences: Input should be a valid list of strings")
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        if name in body:
            require(is_number(body[name]) and low <= body[name] <= high, f"{name}: Input should be between {low} and {high}")
    if "top_k" in body:
        require(is_int(body["top_k"]), "top_k: Input should be a valid integer")
    if "metadata" in body:
        require(isinstance(body["metadata"], dict) and set(body["metadata"]) <= {"user_id"}, "metadata: only user_id is permitted")
    if "tools" in body:
        tools = body["tools"]
        require(isinstance(tools, list), "tools: Input should be a valid list")
        for i, tool in enumerate(tools):
            require(isinstance(tool, dict), f"tools.{i}: Input should be a valid dictionary")
            extra = sorted(set(tool) - TOOL_FIELDS)
            require(not extra, f"tools.{i}.custom.{extra[0] if extra else ''}: Extra inputs are not permitted")
            require(tool.get("type", "custom") == "custom", f"tools.{i}.type: Input tag {tool.get('type')!r} does not match any of the expected tags")
            require(isinstance(tool.get("name"), str) and bool(TOOL_NAME.match(tool["name"])), f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
            schema = tool.get("input_schema")
            require(isinstance(schema, dict), f"tools.{i}.custom.input_schema: Field required")
            require(schema.get("type") == "object", f"tools.{i}.custom.input_schema.type: Input should be 'object'")
    if "tool_choice" in body:
        choice = body["tool_choice"]
        require(isinstance(choice, dict) and choice.get("type") in TOOL_CHOICE_TYPES, "tool_choice: Input should be an object with type auto, any, tool or none")
        require(set(choice) <= {"type", "name", "disable_parallel_tool_use"}, "tool_choice: Extra inputs are not permitted")
        if choice["type"] == "tool":
            require(isinstance(choice.get("name"), str), "tool_choice.tool.name: Field required")


# --- the server --------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._read_body()
        self._send_json(404, error_body("not_found_error", "Not Found"))

    def do_POST(self) -> None:  # noqa: N802
        raw = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        self.server.owner.record({"method": "POST", "path": self.path, "headers": headers, "body": body})

        if self.path.split("?", 1)[0] != "/v1/messages":
            self._send_json(404, error_body("not_found_error", "Not Found"))
            return
        if headers.get("x-api-key") != API_KEY:
            self._send_json(401, error_body("authentication_error", "invalid x-api-key"))
            return
        if not headers.get("anthropic-version"):
            self._send_json(400, error_body("invalid_request_error", "anthropic-version: header is required"))
            return
        if not isinstance(body, dict):
            self._send_json(400, error_body("invalid_request_error", "The request body is not valid JSON."))
            return
        try:
            check_body(body)
        except Invalid as invalid:
            self._send_json(400, error_body("invalid_request_error", str(invalid)))
            return

        model = body["model"]
        stream = body.get("stream") is True
        if model in ERROR_SCENARIOS:
            status, error_type, message = ERROR_SCENARIOS[model]
            self._send_json(status, error_body(error_type, message))
        elif model == MIDSTREAM_ERROR_MODEL:
            if stream:
                self._send_events(midstream_error_events(model))
            else:
                self._send_json(529, error_body("overloaded_error", "Overloaded"))
        elif model in SCENARIOS:
            message = message_for(model)
            if stream:
                self._send_events(stream_events(message))
            else:
                self._send_json(200, message)
        else:
            self._send_json(404, error_body("not_found_error", f"model: {model}"))

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("request-id", "req_mock")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _send_events(self, events: Iterator[dict[str, Any]]) -> None:
        """SSE over chunked transfer encoding, one event per chunk, flushed one by one."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("request-id", "req_mock")
        self.send_header("transfer-encoding", "chunked")
        self.send_header("connection", "close")
        self.end_headers()
        for event in events:
            frame = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True


class MockAnthropic(RecordingServer):
    def __init__(self, port: int = 0) -> None:
        super().__init__(Handler, "mock-anthropic", port)

    @property
    def base_url(self) -> str:
        """Like the Anthropic SDK's base_url: no /v1."""
        return f"http://{self.addr}"


if __name__ == "__main__":  # manual use: python3 tests/e2e/anthropic_upstream.py
    mock = MockAnthropic().start()
    print(f"listening on {mock.addr}", flush=True)
    threading.Event().wait()
