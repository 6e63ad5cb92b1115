"""lmgate in front of Ollama's native API, seen through the official OpenAI Python SDK.

A scripted Ollama stands in for http://127.0.0.1:11434: `/api/chat` answers NDJSON streams (the
recorded capture in tests/fixtures/ollama for `llama3.2`, scripted lines for tool calls, thinking
and a mid-stream error) or one JSON object with `"stream": false`, and `/api/embed` answers
float vectors. The tests check what the client gets and what Ollama received.
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from conftest import TEST_KEY, sdk_client, start_process
from recording_server import RecordingServer, ScriptedHandler

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ollama" / "api-chat-stream.ndjson"
RECORDED = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
RECORDED_TEXT = "".join(line["message"]["content"] for line in RECORDED)

GATEWAY_CONFIG = """\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[connections.local]
api_type = "ollama"
api_base = "http://{addr}"

[routing]
"llama*" = "local.*"
"qwen*" = "local.*"
"nomic*" = "local.*"

[groups.team]
api_keys = ["{test_key}"]
"""


def _line(model: str, **message: Any) -> dict[str, Any]:
    return {"model": model, "created_at": "2025-02-11T15:33:28.0907887Z", "message": {"role": "assistant", **message}, "done": False}


def _done(model: str, reason: str = "stop") -> dict[str, Any]:
    return {"model": model, "created_at": "2025-02-11T15:33:30Z", "message": {"role": "assistant", "content": ""},
            "done": True, "done_reason": reason, "prompt_eval_count": 21, "eval_count": 9}


TOOL_LINES = [
    _line("qwen-tools", content="Checking both. "),
    _line("qwen-tools", content="", tool_calls=[{"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]),
    _line("qwen-tools", content="And "),
    _line("qwen-tools", content="", tool_calls=[{"function": {"index": 1, "name": "get_weather", "arguments": {"city": "Tokyo \"JP\""}}}]),
    _done("qwen-tools"),
]
THINK_LINES = [
    _line("qwen-think", content="", thinking="The user greets. "),
    _line("qwen-think", content="", thinking="Reply briefly."),
    _line("qwen-think", content="Hi!"),
    _done("qwen-think", "length"),
]


class _Ollama(ScriptedHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.owner.record({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == "/api/embed":
            return self._embed(body)
        if self.path != "/api/chat":
            return self._send_json(404, {"error": "404 page not found"})
        model = body["model"]
        if model == "llama-missing":
            return self._send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
        lines: list[Any] = {
            "llama3.2": RECORDED,
            "qwen-tools": TOOL_LINES,
            "qwen-think": THINK_LINES,
            "llama-crash": [_line(model, content="Once upon"), {"error": "an error was encountered while running the model"}],
        }.get(model, [_line(model, content=f"Hello from {model}."), _done(model)])
        if not body["stream"]:
            return self._send_json(200, self._whole(lines))
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        self._send(200, "application/x-ndjson", data)

    @staticmethod
    def _whole(lines: list[dict[str, Any]]) -> dict[str, Any]:
        """The same answer as one object, as Ollama sends it with "stream": false."""
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        for line in lines:
            m = line.get("message", {})
            message["content"] += m.get("content", "")
            if m.get("thinking"):
                message["thinking"] = message.get("thinking", "") + m["thinking"]
            if m.get("tool_calls"):
                message.setdefault("tool_calls", []).extend(m["tool_calls"])
        return {**lines[-1], "message": message}

    def _embed(self, body: dict[str, Any]) -> None:
        dims = body.get("dimensions", 3)
        vectors = [[round(0.25 * (i + 1) + 0.125 * d, 4) for d in range(dims)] for i, _ in enumerate(body["input"])]
        self._send_json(200, {"model": body["model"], "embeddings": vectors, "total_duration": 1, "prompt_eval_count": 4 * len(vectors)})


@pytest.fixture(scope="module")
def ollama() -> Iterator[RecordingServer]:
    server = RecordingServer(_Ollama, "mock-ollama").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(ollama: RecordingServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    workdir = tmp_path_factory.mktemp("ollama-gateway")
    config = workdir / "lmgate.toml"
    config.write_text(GATEWAY_CONFIG.format(addr=ollama.addr, test_key=TEST_KEY))
    for _ in start_process("lmgate-serve-ollama", ["serve", "--config", str(config), "--env", ""], workdir):
        c = sdk_client(_.base_url, TEST_KEY)
        yield c
        c.close()


MESSAGES = [{"role": "user", "content": "Say hello"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def stream(client: openai.OpenAI, model: str, **kwargs: Any) -> list[Any]:
    with client.chat.completions.create(model=model, messages=kwargs.pop("messages", MESSAGES), stream=True, **kwargs) as s:
        return list(s)


def test_recorded_stream_and_usage(client: openai.OpenAI, ollama: RecordingServer) -> None:
    chunks = stream(client, "llama3.2", stream_options={"include_usage": True}, max_tokens=64, temperature=0.3, seed=5, stop=["END"])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == RECORDED_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (26, 33)
    assert {c.model for c in chunks} == {"llama3.2"} and len({c.id for c in chunks}) == 1
    sent = ollama.last_request["body"]
    assert sent["stream"] is True
    assert sent["options"] == {"num_predict": 64, "temperature": 0.3, "seed": 5, "stop": ["END"]}


def test_non_stream(client: openai.OpenAI, ollama: RecordingServer) -> None:
    r = client.chat.completions.create(model="llama3.1:8b", messages=MESSAGES)
    assert r.choices[0].message.content == "Hello from llama3.1:8b."
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (21, 9, 30)
    assert ollama.last_request["body"]["stream"] is False


def test_parallel_tool_calls_interleaved_with_text_and_the_next_turn(client: openai.OpenAI, ollama: RecordingServer) -> None:
    chunks = stream(client, "qwen-tools", tools=[WEATHER])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking both. And "
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for t in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(t.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += t.id or ""
            call["name"] += t.function.name or ""
            call["arguments"] += t.function.arguments or ""
    assert [json.loads(calls[k]["arguments"]) for k in (0, 1)] == [{"city": "Paris"}, {"city": 'Tokyo "JP"'}]
    assert calls[0]["id"] != calls[1]["id"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert ollama.last_request["body"]["tools"] == [WEATHER]

    # Non-stream, then the results go back named after their calls.
    r = client.chat.completions.create(model="qwen-tools", messages=MESSAGES, tools=[WEATHER])
    got = r.choices[0].message.tool_calls
    assert [json.loads(t.function.arguments) for t in got] == [{"city": "Paris"}, {"city": 'Tokyo "JP"'}]
    assert r.choices[0].finish_reason == "tool_calls"
    history = MESSAGES + [r.choices[0].message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": got[1].id, "content": "25C"},
        {"role": "tool", "tool_call_id": got[0].id, "content": "12C"},
    ]
    client.chat.completions.create(model="qwen-next", messages=history, tools=[WEATHER])
    sent = ollama.last_request["body"]["messages"]
    assert sent[1]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_weather", "arguments": {"city": 'Tokyo "JP"'}}},
    ]
    assert sent[2:] == [
        {"role": "tool", "content": "25C", "tool_name": "get_weather"},
        {"role": "tool", "content": "12C", "tool_name": "get_weather"},
    ]


def test_thinking_is_reasoning_content(client: openai.OpenAI) -> None:
    chunks = stream(client, "qwen-think", reasoning_effort="high")
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert reasoning == "The user greets. Reply briefly."
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    r = client.chat.completions.create(model="qwen-think", messages=MESSAGES)
    assert r.choices[0].message.model_extra["reasoning_content"] == "The user greets. Reply briefly."
    assert r.choices[0].message.content == "Hi!"


def test_images_go_as_raw_base64_and_urls_are_refused(client: openai.OpenAI, ollama: RecordingServer) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]
    client.chat.completions.create(model="llama-vision", messages=[{"role": "user", "content": content}])
    assert ollama.last_request["body"]["messages"] == [{"role": "user", "content": "What is this?", "images": [png]}]
    before = len(ollama.requests)
    with pytest.raises(openai.BadRequestError) as e:
        url = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/cat.png"}}]
        client.chat.completions.create(model="llama-vision", messages=[{"role": "user", "content": url}])
    assert "messages[0].content[0]" in e.value.message
    assert len(ollama.requests) == before, "nothing was sent"


def test_errors_before_and_during_a_stream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        stream(client, "llama-missing")
    assert "not found, try pulling it first" in e.value.message
    with pytest.raises(openai.APIError) as e:
        stream(client, "llama-crash")
    assert "an error was encountered while running the model" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama3.2", prompt="Once upon a time")
    assert e.value.body["param"] == "model" and "/v1/chat/completions" in e.value.message


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_embeddings(client: openai.OpenAI, ollama: RecordingServer, encoding: str | None) -> None:
    extra = {"encoding_format": encoding} if encoding else {}
    r = client.embeddings.create(model="nomic-embed-text", input=["a", "b"], dimensions=3, **extra)
    if encoding == "base64":
        got = [list(struct.unpack("<3f", base64.b64decode(d.embedding))) for d in r.data]
    else:
        got = [d.embedding for d in r.data]
    assert got == [[0.25, 0.375, 0.5], [0.5, 0.625, 0.75]]
    assert [d.index for d in r.data] == [0, 1]
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (8, 8)
    req = ollama.last_request
    assert req["path"] == "/api/embed"
    assert req["body"] == {"model": "nomic-embed-text", "input": ["a", "b"], "dimensions": 3}
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="nomic-embed-text", input=[[1, 2, 3]])
    assert e.value.body["param"] == "input"
