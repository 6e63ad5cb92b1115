"""lmgate in front of Anthropic, seen through the official OpenAI Python SDK.

A mock Anthropic Messages API (anthropic_upstream.py) stands in for api.anthropic.com; a gateway of
its own routes `claude-*` to it through an `api_type = "anthropic"` connection. The tests check
what the client gets back (stream and non-stream, tool calls, usage, errors) and what the upstream
received (the OpenAI request translated to the Messages API).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any, Iterator

import openai
import pytest

import anthropic_upstream as up
from anthropic_upstream import MockAnthropic
from conftest import CLIENT_TIMEOUT_SECS, TEST_KEY, LmgateProcess, sdk_client, start_process

BAD_KEY_MODEL = "claude-badkey"
WRONG_UPSTREAM_KEY = "sk-ant-wrong"

GATEWAY_CONFIG = """\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[connections.anthropic]
api_type = "anthropic"
api_base = "{base_url}"     # no /v1: like the Anthropic SDK's base_url
api_key = "{api_key}"

[connections.badkey]
api_type = "anthropic"
api_base = "{base_url}"
api_key = "{wrong_key}"

[routing]
"{bad_key_model}" = "badkey.claude-text"
"claude-*" = "anthropic.*"

[groups.team]
api_keys = ["{test_key}"]
allowed_connections = "*"
"""

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
NOARGS_TOOL = {
    "type": "function",
    "function": {"name": up.NOARGS_TOOL_NAME, "description": "The time now.", "parameters": {"type": "object", "properties": {}}},
}

EXPECTED_USAGE = {
    "prompt_tokens": up.PROMPT_TOKENS,  # 11 input + 5 cache read
    "completion_tokens": up.COMPLETION_TOKENS,
    "total_tokens": up.PROMPT_TOKENS + up.COMPLETION_TOKENS,
    "cached_tokens": up.CACHE_READ_TOKENS,
}
assert EXPECTED_USAGE == {"prompt_tokens": 16, "completion_tokens": 7, "total_tokens": 23, "cached_tokens": 5}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mock_anthropic() -> Iterator[MockAnthropic]:
    mock = MockAnthropic().start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def anthropic_gateway(mock_anthropic: MockAnthropic, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("anthropic-gateway")
    config = workdir / "lmgate.toml"
    config.write_text(
        GATEWAY_CONFIG.format(
            base_url=mock_anthropic.base_url,
            api_key=up.API_KEY,
            wrong_key=WRONG_UPSTREAM_KEY,
            bad_key_model=BAD_KEY_MODEL,
            test_key=TEST_KEY,
        )
    )
    yield from start_process("lmgate-serve-anthropic", ["serve", "--config", str(config), "--env", ""], workdir)


@pytest.fixture(scope="module")
def client(anthropic_gateway: LmgateProcess) -> Iterator[openai.OpenAI]:
    client = sdk_client(anthropic_gateway.base_url, TEST_KEY)
    yield client
    client.close()


# --- helpers -----------------------------------------------------------------------------------


def chat(client: openai.OpenAI, model: str, messages: list[dict[str, Any]] = MESSAGES, **kwargs: Any):
    return client.chat.completions.create(model=model, messages=messages, **kwargs)


def chat_stream(client: openai.OpenAI, model: str, **kwargs: Any) -> list[Any]:
    with chat(client, model, stream=True, **kwargs) as stream:
        return list(stream)


def streamed_text(chunks: list[Any]) -> str:
    return "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]


def streamed_tool_calls(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Tool-call deltas merged per `index` the way OpenAI clients do it."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "type": None, "name": None, "arguments": "", "deltas": 0})
                call["deltas"] += 1
                if delta.id:
                    assert call["id"] in (None, delta.id)
                    call["id"] = delta.id
                if delta.type:
                    call["type"] = delta.type
                if delta.function is not None:
                    if delta.function.name:
                        assert call["name"] in (None, delta.function.name)
                        call["name"] = delta.function.name
                    call["arguments"] += delta.function.arguments or ""
    return calls


def assert_usage(usage: Any) -> None:
    assert usage is not None
    assert usage.prompt_tokens == EXPECTED_USAGE["prompt_tokens"]
    assert usage.completion_tokens == EXPECTED_USAGE["completion_tokens"]
    assert usage.total_tokens == EXPECTED_USAGE["total_tokens"]
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == EXPECTED_USAGE["cached_tokens"]


def sse_data(text: str) -> list[str]:
    """The data of each SSE event (WHATWG rules, enough of them for a well-behaved server)."""
    events, data = [], []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
    return events  # an unterminated last event is dropped, as the spec says


def raw_stream(gateway: LmgateProcess, body: dict[str, Any]) -> list[Any]:
    """POSTs a streaming chat request with urllib; returns each data event decoded
    (JSON, or the string "[DONE]")."""
    request = urllib.request.Request(
        gateway.base_url + "/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=CLIENT_TIMEOUT_SECS) as response:
        assert response.status == 200
        assert response.headers.get("content-type", "").startswith("text/event-stream")
        text = response.read().decode("utf-8")
    return [data if data == "[DONE]" else json.loads(data) for data in sse_data(text)]


def text_of(content: Any) -> str:
    """Anthropic text content (a string or a list of blocks) as one string."""
    if isinstance(content, str):
        return content
    assert isinstance(content, list), content
    assert all(block.get("type") == "text" for block in content), content
    return "".join(block["text"] for block in content)


def blocks_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def upstream_body(mock: MockAnthropic) -> dict[str, Any]:
    request = mock.last_request
    assert request["path"] == "/v1/messages"
    assert isinstance(request["body"], dict)
    return request["body"]


# --- responses: text, stream vs non-stream -----------------------------------------------------


@pytest.mark.parametrize("model", ["claude-text", "claude-tool"])
def test_streamed_text_equals_non_stream_text(client, model):
    expected = chat(client, model, tools=[WEATHER_TOOL]).choices[0].message.content

    chunks = chat_stream(client, model, tools=[WEATHER_TOOL])

    assert expected == {"claude-text": up.TEXT_ANSWER, "claude-tool": up.TOOL_PREAMBLE}[model]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_text(chunks) == expected


def test_non_stream_text_answer_has_stop_usage_id_and_model(client):
    response = chat(client, "claude-text")

    assert response.object == "chat.completion"
    assert response.id == up.SCENARIOS["claude-text"]["id"]
    assert response.model == "claude-text"
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == up.TEXT_ANSWER
    assert not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    assert_usage(response.usage)


def test_stream_with_include_usage_ends_with_the_usage_chunk(client):
    chunks = chat_stream(client, "claude-text", stream_options={"include_usage": True})

    assert finish_reasons(chunks) == ["stop"]
    assert streamed_text(chunks) == up.TEXT_ANSWER
    *body, last = chunks
    assert last.choices == []
    assert_usage(last.usage)
    assert [chunk.usage for chunk in body if chunk.usage is not None] == []
    assert {chunk.id for chunk in chunks} == {up.SCENARIOS["claude-text"]["id"]}
    assert {chunk.model for chunk in chunks} == {"claude-text"}
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}


def test_stream_without_include_usage_carries_no_usage(client):
    chunks = chat_stream(client, "claude-text")

    assert [chunk.usage for chunk in chunks if chunk.usage is not None] == []
    assert all(chunk.choices for chunk in chunks)
    assert finish_reasons(chunks) == ["stop"]


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include-usage"])
def test_stream_wire_format(anthropic_gateway, include_usage):
    """What the SDK hides: `usage` keys, one `created`, the final [DONE]."""
    body: dict[str, Any] = {"model": "claude-text", "messages": MESSAGES}
    if include_usage:
        body["stream_options"] = {"include_usage": True}

    events = raw_stream(anthropic_gateway, body)

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(isinstance(chunk, dict) and "error" not in chunk for chunk in chunks)
    assert len({chunk["created"] for chunk in chunks}) == 1
    assert all(isinstance(chunk["created"], int) for chunk in chunks)
    assert {chunk["id"] for chunk in chunks} == {up.SCENARIOS["claude-text"]["id"]}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if include_usage:
        *body_chunks, usage_chunk = chunks
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == {
            "prompt_tokens": 16, "completion_tokens": 7, "total_tokens": 23, "prompt_tokens_details": {"cached_tokens": 5},
        }
        assert all("usage" in chunk and chunk["usage"] is None for chunk in body_chunks)
    else:
        body_chunks = chunks
        assert all("usage" not in chunk for chunk in chunks)
    assert all(len(chunk["choices"]) == 1 for chunk in body_chunks)
    assert [c["choices"][0]["finish_reason"] for c in body_chunks] == [None] * (len(body_chunks) - 1) + ["stop"]
    assert body_chunks[-1]["choices"][0]["delta"] == {}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in body_chunks) == up.TEXT_ANSWER


# --- tool calls --------------------------------------------------------------------------------


def test_streamed_tool_call_reassembles_to_the_non_stream_tool_call(client):
    response = chat(client, "claude-tool", tools=[WEATHER_TOOL])
    chunks = chat_stream(client, "claude-tool", tools=[WEATHER_TOOL])

    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function"
    assert call.id == up.WEATHER_TOOL_ID
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == up.WEATHER_INPUT

    streamed = streamed_tool_calls(chunks)
    # The text block is Anthropic block 0 and the tool block 1, but OpenAI counts tool calls only.
    assert list(streamed) == [0]
    assert streamed[0]["id"] == call.id
    assert streamed[0]["type"] == "function"
    assert streamed[0]["name"] == call.function.name
    assert streamed[0]["deltas"] > 2  # the arguments arrive in pieces
    assert json.loads(streamed[0]["arguments"]) == json.loads(call.function.arguments)
    assert finish_reasons(chunks) == ["tool_calls"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_tool_without_arguments_gives_an_empty_json_object(client, stream):
    if stream:
        chunks = chat_stream(client, "claude-tool-noargs", tools=[NOARGS_TOOL])
        calls = streamed_tool_calls(chunks)
        assert list(calls) == [0]
        name, call_id, arguments = calls[0]["name"], calls[0]["id"], calls[0]["arguments"]
        finish = finish_reasons(chunks)
    else:
        response = chat(client, "claude-tool-noargs", tools=[NOARGS_TOOL])
        assert response.choices[0].message.content in (None, "")
        [call] = response.choices[0].message.tool_calls
        name, call_id, arguments = call.function.name, call.id, call.function.arguments
        finish = [response.choices[0].finish_reason]

    assert (name, call_id) == (up.NOARGS_TOOL_NAME, up.NOARGS_TOOL_ID)
    assert arguments == "{}"
    assert finish == ["tool_calls"]


# --- errors ------------------------------------------------------------------------------------


def test_error_after_the_first_event_raises_api_error_while_iterating(client):
    received: list[Any] = []
    with pytest.raises(openai.APIError) as raised:
        with chat(client, up.MIDSTREAM_ERROR_MODEL, stream=True) as stream:
            for chunk in stream:
                received.append(chunk)

    assert not isinstance(raised.value, openai.APIStatusError)  # the HTTP status was 200
    assert "Overloaded" in raised.value.message
    assert received and received[0].choices[0].delta.role == "assistant"
    assert streamed_text(received) == up.MIDSTREAM_TEXT


def test_error_after_the_first_event_ends_the_wire_stream_without_done(anthropic_gateway):
    events = raw_stream(anthropic_gateway, {"model": up.MIDSTREAM_ERROR_MODEL, "messages": MESSAGES})

    assert "[DONE]" not in events
    last = events[-1]
    assert set(last) == {"error"}
    assert last["error"]["message"] == "Overloaded"
    assert last["error"]["type"] == "overloaded_error"
    assert all("error" not in event for event in events[:-1])


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(
    ("model", "status", "error_type", "message_part"),
    [
        ("claude-invalid-request", 400, "invalid_request_error", "mock: rejected on purpose"),
        ("claude-does-not-exist", 404, "invalid_request_error", "claude-does-not-exist"),
        ("claude-rate-limited", 429, "rate_limit_error", "mock: too many requests"),
        ("claude-overloaded", 503, "api_error", "Anthropic is overloaded: Overloaded"),
        (BAD_KEY_MODEL, 502, "api_error", None),
    ],
    ids=["400-invalid-request", "404-not-found", "429-rate-limit", "529-overloaded", "401-wrong-upstream-key"],
)
def test_upstream_http_errors_map_to_openai_errors(client, mock_anthropic, model, status, error_type, message_part, stream):
    with pytest.raises(openai.APIStatusError) as raised:
        if stream:
            chat_stream(client, model)
        else:
            chat(client, model)

    assert raised.value.status_code == status
    body = raised.value.body
    assert isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]
    assert body.get("type") == error_type
    if message_part is not None:
        assert message_part in body["message"]
    if model == BAD_KEY_MODEL:
        assert mock_anthropic.last_request["headers"].get("x-api-key") == WRONG_UPSTREAM_KEY
        assert WRONG_UPSTREAM_KEY not in body["message"]


def test_n_greater_than_one_is_rejected_before_reaching_anthropic(client, mock_anthropic):
    seen = len(mock_anthropic.requests)

    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, "claude-text", n=2)

    assert raised.value.status_code == 400
    assert re.search(r"\bn\b", raised.value.message)
    assert len(mock_anthropic.requests) == seen


# --- the translated request --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_upstream_request_carries_anthropic_headers_and_not_the_client_key(client, mock_anthropic, stream):
    if stream:
        chat_stream(client, "claude-text", stream_options={"include_usage": True})
    else:
        chat(client, "claude-text")

    request = mock_anthropic.last_request
    assert request["headers"].get("x-api-key") == up.API_KEY
    assert request["headers"].get("anthropic-version")
    assert request["headers"].get("content-type", "").startswith("application/json")
    assert not any(TEST_KEY in value for value in request["headers"].values())
    body = upstream_body(mock_anthropic)
    assert body["model"] == "claude-text"
    assert body.get("stream", False) is stream
    assert text_of(body["messages"][0]["content"]) == MESSAGES[0]["content"]


@pytest.mark.parametrize("role", ["system", "developer"])
def test_system_messages_move_to_the_top_level_system(client, mock_anthropic, role):
    messages = [{"role": role, "content": "You are terse."}, {"role": "user", "content": "Hi"}]

    chat(client, "claude-text", messages=messages)

    body = upstream_body(mock_anthropic)
    assert text_of(body["system"]) == "You are terse."
    assert [message["role"] for message in body["messages"]] == ["user"]
    assert text_of(body["messages"][0]["content"]) == "Hi"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_completion_tokens": 123}, {"max_tokens": 123}),
        ({"max_tokens": 77}, {"max_tokens": 77}),
        ({"stop": "END"}, {"stop_sequences": ["END"]}),
        ({"stop": ["END", "HALT"]}, {"stop_sequences": ["END", "HALT"]}),
        ({"temperature": 0.5}, {"temperature": 0.5}),
        ({"top_p": 0.25}, {"top_p": 0.25}),
    ],
    ids=["max_completion_tokens", "max_tokens", "stop-string", "stop-list", "temperature", "top_p"],
)
def test_openai_parameters_are_translated(client, mock_anthropic, kwargs, expected):
    chat(client, "claude-text", **kwargs)

    body = upstream_body(mock_anthropic)
    assert {key: body.get(key) for key in expected} == expected
    assert isinstance(body["max_tokens"], int) and body["max_tokens"] > 0


def test_max_tokens_default_is_sent_when_the_client_gives_none(client, mock_anthropic):
    chat(client, "claude-text")

    body = upstream_body(mock_anthropic)
    assert isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool)
    assert body["max_tokens"] > 0


def test_tools_become_anthropic_tools_with_input_schema(client, mock_anthropic):
    chat(client, "claude-tool", tools=[WEATHER_TOOL, NOARGS_TOOL])

    tools = upstream_body(mock_anthropic)["tools"]
    assert [tool["name"] for tool in tools] == ["get_weather", up.NOARGS_TOOL_NAME]
    for tool, source in zip(tools, [WEATHER_TOOL, NOARGS_TOOL]):
        assert tool["input_schema"] == source["function"]["parameters"]
        assert tool.get("description") == source["function"]["description"]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
    ids=["auto", "required", "named"],
)
def test_tool_choice_is_translated(client, mock_anthropic, tool_choice, expected):
    chat(client, "claude-tool", tools=[WEATHER_TOOL], tool_choice=tool_choice)

    choice = upstream_body(mock_anthropic)["tool_choice"]
    assert {key: choice.get(key) for key in expected} == expected


@pytest.mark.parametrize("assistant_text", [None, "Let me check both cities."], ids=["no-text", "with-text"])
def test_tool_conversation_becomes_tool_use_and_tool_result_blocks(client, mock_anthropic, assistant_text):
    conversation = [
        {"role": "system", "content": "Answer with the tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": assistant_text,
            "tool_calls": [
                {"id": "toolu_01Paris", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_rome_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "c"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_01Paris", "content": "18 C, cloudy"},
        {"role": "tool", "tool_call_id": "call_rome_2", "content": "24 C, sunny"},
        {"role": "user", "content": "Which one is warmer?"},
    ]

    response = chat(client, "claude-text", messages=conversation, tools=[WEATHER_TOOL])

    assert response.choices[0].message.content == up.TEXT_ANSWER
    body = upstream_body(mock_anthropic)
    assert text_of(body["system"]) == "Answer with the tools."
    assert [message["role"] for message in body["messages"]] == ["user", "assistant", "user"]
    first, assistant, results = body["messages"]
    assert text_of(first["content"]) == "Weather in Paris and Rome?"

    assistant_blocks = blocks_of(assistant)
    texts = [block["text"] for block in assistant_blocks if block["type"] == "text"]
    assert texts == ([assistant_text] if assistant_text else [])
    uses = [block for block in assistant_blocks if block["type"] == "tool_use"]
    assert [(b["id"], b["name"], b["input"]) for b in uses] == [
        ("toolu_01Paris", "get_weather", {"city": "Paris"}),
        ("call_rome_2", "get_weather", {"city": "Rome", "unit": "c"}),
    ]
    if assistant_text:
        assert assistant_blocks[0]["type"] == "text"  # text before the tool calls

    result_blocks = blocks_of(results)
    tool_results = [block for block in result_blocks if block["type"] == "tool_result"]
    assert [(b["tool_use_id"], text_of(b["content"])) for b in tool_results] == [
        ("toolu_01Paris", "18 C, cloudy"),
        ("call_rome_2", "24 C, sunny"),
    ]
    trailing = [block for block in result_blocks if block["type"] != "tool_result"]
    assert [(b["type"], b.get("text")) for b in trailing] == [("text", "Which one is warmer?")]
    assert result_blocks[: len(tool_results)] == tool_results  # results first, then the question


# --- self-checks of the mock (no gateway needed) ----------------------------------------------


def mock_post(mock: MockAnthropic, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(
        mock.base_url + "/v1/messages",
        data=json.dumps(body).encode(),
        headers=headers if headers is not None else {"x-api-key": up.API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers.get("content-type", ""), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers.get("content-type", ""), error.read().decode()


def anthropic_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        if block:
            event_line, data_line = block.split("\n")
            events.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return events


@pytest.mark.parametrize("model", sorted(up.SCENARIOS))
def test_mock_stream_rebuilds_the_non_stream_message(mock_anthropic, model):
    request = {"model": model, "max_tokens": 100, "messages": MESSAGES}
    status, _, text = mock_post(mock_anthropic, request)
    assert status == 200
    message = json.loads(text)

    status, content_type, text = mock_post(mock_anthropic, {**request, "stream": True})
    assert status == 200 and content_type.startswith("text/event-stream")
    events = anthropic_events(text)
    assert all(name == data["type"] for name, data in events)
    rebuilt: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    for _, data in events:
        if data["type"] == "content_block_start":
            rebuilt.append(dict(data["content_block"]))
        elif data["type"] == "content_block_delta" and data["delta"]["type"] == "text_delta":
            rebuilt[data["index"]]["text"] += data["delta"]["text"]
        elif data["type"] == "content_block_delta":
            partial[data["index"]] = partial.get(data["index"], "") + data["delta"]["partial_json"]
        elif data["type"] == "content_block_stop" and data["index"] in partial:
            rebuilt[data["index"]]["input"] = json.loads(partial[data["index"]] or "{}")
    assert rebuilt == message["content"]
    assert [name for name, _ in events][0] == "message_start" and events[-1][0] == "message_stop"
    assert events[-2][1]["delta"]["stop_reason"] == message["stop_reason"]
    assert events[-2][1]["usage"]["output_tokens"] == message["usage"]["output_tokens"]
    assert events[0][1]["message"]["usage"]["input_tokens"] == message["usage"]["input_tokens"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "message_part"),
    [
        ({"max_tokens": 5, "messages": MESSAGES}, None, 400, "model"),
        ({"model": "claude-text", "messages": MESSAGES}, None, 400, "max_tokens"),
        ({"model": "claude-text", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}, *MESSAGES]}, None, 400, "role"),
        ({"model": "claude-text", "max_tokens": 5, "messages": [{"role": "assistant", "content": "x"}]}, None, 400, "first message"),
        ({"model": "claude-text", "max_tokens": 5, "messages": MESSAGES * 2}, None, 400, "alternate"),
        ({"model": "claude-text", "max_tokens": 5, "messages": MESSAGES, "n": 2}, None, 400, "Extra inputs"),
        ({"model": "claude-text", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, None, 400, "non-empty"),
        ({"model": "claude-text", "max_tokens": 5, "messages": MESSAGES, "tools": [WEATHER_TOOL]}, None, 400, "Extra inputs"),
        ({"model": "claude-text", "max_tokens": 5, "messages": MESSAGES}, {"x-api-key": up.API_KEY}, 400, "anthropic-version"),
        ({"model": "claude-text", "max_tokens": 5, "messages": MESSAGES}, {"x-api-key": "nope", "anthropic-version": "2023-06-01"}, 401, "x-api-key"),
    ],
    ids=["no-model", "no-max-tokens", "system-role", "starts-with-assistant", "not-alternating", "extra-field", "empty-text", "openai-tool", "no-version", "bad-key"],
)
def test_mock_rejects_what_anthropic_rejects(mock_anthropic, body, headers, status, message_part):
    got_status, _, text = mock_post(mock_anthropic, body, headers)

    assert got_status == status
    error = json.loads(text)
    assert error["type"] == "error"
    assert message_part in error["error"]["message"]


def test_mock_checks_tool_use_and_tool_result_pairing(mock_anthropic):
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"}
    base = {"model": "claude-text", "max_tokens": 5}

    good = [MESSAGES[0], {"role": "assistant", "content": [use]}, {"role": "user", "content": [result]}]
    assert mock_post(mock_anthropic, {**base, "messages": good})[0] == 200
    unanswered = [MESSAGES[0], {"role": "assistant", "content": [use]}, {"role": "user", "content": "go on"}]
    assert mock_post(mock_anthropic, {**base, "messages": unanswered})[0] == 400
    orphan = [{"role": "user", "content": [result]}]
    assert mock_post(mock_anthropic, {**base, "messages": orphan})[0] == 400
    text_first = [MESSAGES[0], {"role": "assistant", "content": [use]}, {"role": "user", "content": [{"type": "text", "text": "ok"}, result]}]
    assert mock_post(mock_anthropic, {**base, "messages": text_first})[0] == 400
