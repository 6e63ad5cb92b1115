"""lmgate in front of Google's Gemini API, seen through the official OpenAI Python SDK.

A scripted Gemini stands in for https://generativelanguage.googleapis.com: it answers only at
`/v1beta/models/{model}:generateContent`, `:streamGenerateContent?alt=sse` (the recorded streams
in tests/fixtures/gemini, and scripted ones) and `:batchEmbedContents`, and only with the key in
`x-goog-api-key`. The tests check what the client gets and what Gemini received.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import openai
import pytest

from conftest import TEST_KEY, sdk_client, start_process
from recording_server import RecordingServer, ScriptedHandler

GEMINI_KEY = "AIza-gemini-canary-key"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gemini"


def _recorded(name: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in (FIXTURES / name).read_text().splitlines() if line.startswith("data:")]


RECORDED_TEXT = _recorded("stream-text.sse")

GATEWAY_CONFIG = """\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[connections.google]
api_type = "gemini"
api_base = "http://{addr}"
api_key = "{key}"

[routing]
"gemini*" = "google.*"
"gem/*" = "google.*"

[groups.team]
api_keys = ["{test_key}"]
"""


def _event(parts: list[dict[str, Any]], finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate], "usageMetadata": usage or {"promptTokenCount": 12, "totalTokenCount": 12},
            "modelVersion": "gemini-2.5-flash", "responseId": "resp-1"}


FINAL_USAGE = {"promptTokenCount": 12, "candidatesTokenCount": 9, "thoughtsTokenCount": 20, "totalTokenCount": 41}
SCRIPTS: dict[str, list[dict[str, Any]]] = {
    "gemini-text": RECORDED_TEXT,
    "gemini-tools": [
        _event([{"text": "Checking both. "}]),
        _event([{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLTE="}]),
        _event([{"text": "And "}, {"functionCall": {"name": "get_weather", "args": {"city": "Tokyo \"JP\""}}}]),
        _event([{"text": ""}], "STOP", FINAL_USAGE),
    ],
    "gemini-think": [
        _event([{"text": "The user greets. ", "thought": True}]),
        _event([{"text": "Reply briefly.", "thought": True}, {"text": "Hi!"}]),
        _event([{"text": ""}], "MAX_TOKENS", FINAL_USAGE),
    ],
    "gemini-crash": [_event([{"text": "Once upon"}]), {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}],
}


def _whole(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The same answer as one generateContent response."""
    parts = [p for e in events for p in e["candidates"][0]["content"]["parts"]]
    last = events[-1]
    return {**last, "candidates": [{**last["candidates"][0], "content": {"parts": parts, "role": "model"}}]}


class _Gemini(ScriptedHandler):
    def do_POST(self) -> None:
        url = urlsplit(self.path)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.owner.record({"path": url.path, "query": parse_qs(url.query), "headers": dict(self.headers), "body": body})
        if self.headers.get("x-goog-api-key") != GEMINI_KEY or "key" in parse_qs(url.query):
            return self._send_json(403, {"error": {"code": 403, "message": "API key not valid.", "status": "PERMISSION_DENIED"}})
        prefix = "/v1beta/models/"
        if not url.path.startswith(prefix) or ":" not in url.path[len(prefix):]:
            return self._send_json(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
        model, method = url.path[len(prefix):].rsplit(":", 1)
        if model == "gemini-missing":
            return self._send_json(404, {"error": {"code": 404, "message": f"models/{model} is not found for API version v1beta.", "status": "NOT_FOUND"}})
        if model == "gemini-busy":
            return self._send_json(429, {"error": {"code": 429, "message": "Resource exhausted.", "status": "RESOURCE_EXHAUSTED",
                                                   "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}})
        if method == "batchEmbedContents":
            vectors = [{"values": [round(0.25 * (i + 1) + 0.125 * d, 4) for d in range(r.get("outputDimensionality", 3))]}
                       for i, r in enumerate(body["requests"])]
            return self._send_json(200, {"embeddings": vectors})
        events = SCRIPTS.get(model, [_event([{"text": f"Hello from {model}."}], "STOP", FINAL_USAGE)])
        if method == "generateContent":
            return self._send_json(200, _whole([e for e in events if "candidates" in e]))
        assert method == "streamGenerateContent" and parse_qs(url.query) == {"alt": ["sse"]}, self.path
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)
        self._send(200, "text/event-stream", data)


@pytest.fixture(scope="module")
def gemini() -> Iterator[RecordingServer]:
    server = RecordingServer(_Gemini, "mock-gemini").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gemini: RecordingServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    workdir = tmp_path_factory.mktemp("gemini-gateway")
    config = workdir / "lmgate.toml"
    config.write_text(GATEWAY_CONFIG.format(addr=gemini.addr, key=GEMINI_KEY, test_key=TEST_KEY))
    for gateway in start_process("lmgate-serve-gemini", ["serve", "--config", str(config), "--env", ""], workdir):
        c = sdk_client(gateway.base_url, TEST_KEY)
        yield c
        c.close()
        assert GEMINI_KEY not in gateway.log_tail(), "the Gemini key reached the gateway's log"


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def stream(client: openai.OpenAI, model: str, **kwargs: Any) -> list[Any]:
    with client.chat.completions.create(model=model, messages=kwargs.pop("messages", MESSAGES), stream=True, **kwargs) as s:
        return list(s)


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_recorded_stream_and_what_gemini_received(client: openai.OpenAI, gemini: RecordingServer) -> None:
    chunks = stream(client, "gemini-text", stream_options={"include_usage": True}, max_tokens=64, temperature=0.3, stop=["END"])
    assert text_of(chunks) == "The capital of France is Paris.\n"
    assert chunks[-1].usage.prompt_tokens == 13 and chunks[-1].usage.completion_tokens == 8
    req = gemini.last_request
    assert req["path"] == "/v1beta/models/gemini-text:streamGenerateContent" and req["query"] == {"alt": ["sse"]}
    assert req["body"]["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert req["body"]["contents"] == [{"role": "user", "parts": [{"text": "Say hello"}]}]
    assert req["body"]["generationConfig"] == {"maxOutputTokens": 64, "temperature": 0.3, "stopSequences": ["END"]}


def test_non_stream(client: openai.OpenAI, gemini: RecordingServer) -> None:
    r = client.chat.completions.create(model="gemini-2.5-flash", messages=MESSAGES)
    assert r.choices[0].message.content == "Hello from gemini-2.5-flash."
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 29, 41)
    assert gemini.last_request["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"


def test_tool_calls_interleaved_with_text_and_the_next_turn_carries_the_signature(client: openai.OpenAI, gemini: RecordingServer) -> None:
    chunks = stream(client, "gemini-tools", tools=[WEATHER])
    assert text_of(chunks) == "Checking both. And "
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [json.loads(t.function.arguments) for t in calls] == [{"city": "Paris"}, {"city": 'Tokyo "JP"'}]
    assert [t.index for t in calls] == [0, 1] and calls[0].id != calls[1].id
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    r = client.chat.completions.create(model="gemini-tools", messages=MESSAGES, tools=[WEATHER])
    got = r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "Checking both. And "
    history = MESSAGES + [r.choices[0].message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": got[0].id, "content": "12C"},
        {"role": "tool", "tool_call_id": got[1].id, "content": '{"temp": 25}'},
    ]
    client.chat.completions.create(model="gemini-next", messages=history, tools=[WEATHER])
    sent = gemini.last_request["body"]["contents"]
    assert sent[1] == {"role": "model", "parts": [
        {"text": "Checking both. And "},
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "c2lnLTE="},
        {"functionCall": {"name": "get_weather", "args": {"city": 'Tokyo "JP"'}}},
    ]}
    assert sent[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"content": "12C"}}},
        {"functionResponse": {"name": "get_weather", "response": {"temp": 25}}},
    ]}
    assert gemini.last_request["body"]["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"


def test_thinking_is_reasoning_content(client: openai.OpenAI) -> None:
    chunks = stream(client, "gemini-think")
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning == "The user greets. Reply briefly." and text_of(chunks) == "Hi!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    r = client.chat.completions.create(model="gemini-think", messages=MESSAGES)
    assert r.choices[0].message.model_extra["reasoning_content"] == "The user greets. Reply briefly."


def test_errors_before_and_during_a_stream(client: openai.OpenAI, gemini: RecordingServer) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        stream(client, "gemini-missing")
    assert "is not found" in e.value.message
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="gemini-busy", messages=MESSAGES)
    assert e.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.APIError) as e:
        stream(client, "gemini-crash")
    assert "Internal error encountered." in str(e.value)
    before = len(gemini.requests)
    for model in ["gem/../x", "gem/a/b", "gem/a?key=x", "gem/a#b", "gem/%2e%2e", "gem/a\r\nHost: evil", "gem/@evil"]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=MESSAGES)
        assert e.value.body["param"] == "model", model
    assert len(gemini.requests) == before, "no model spelling reached the upstream"


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_embeddings(client: openai.OpenAI, gemini: RecordingServer, encoding: str | None) -> None:
    extra = {"encoding_format": encoding} if encoding else {}
    r = client.embeddings.create(model="gemini-embedding-001", input=["a", "b"], dimensions=3, **extra)
    if encoding == "base64":
        got = [list(struct.unpack("<3f", base64.b64decode(d.embedding))) for d in r.data]
    else:
        got = [d.embedding for d in r.data]
    assert got == [[0.25, 0.375, 0.5], [0.5, 0.625, 0.75]]
    assert r.model == "gemini-embedding-001"
    req = gemini.last_request
    assert req["path"] == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert req["body"]["requests"][1] == {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]}, "outputDimensionality": 3}
