"""lmgate seen through the official OpenAI Python SDK (and raw HTTP where the SDK hides the wire).

Model-level tests run twice: `mock-1` goes to the gateway's in-process mock connection, `up-1`
through an `openai` connection over the network to the standalone `lmgate mock`.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from conftest import LIMITED_KEY, TEST_KEY, UPSTREAM_KEY, RawPost

MESSAGES = [{"role": "user", "content": "Tell me something deterministic."}]
PROMPT = "Once upon a time"
EMBEDDING_INPUTS = ["alpha", "beta", "alpha"]
DEFAULT_DIMENSIONS = 1536
DEFAULT_MOCK_CHUNKS = 16


@pytest.fixture(params=["mock-1", "up-1"])
def model(request: pytest.FixtureRequest) -> str:
    return request.param


# --- helpers -----------------------------------------------------------------------------------


def chat(client: openai.OpenAI, model: str, **kwargs: Any):
    return client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)


def chat_stream(client: openai.OpenAI, model: str, **kwargs: Any) -> list[ChatCompletionChunk]:
    with chat(client, model, stream=True, **kwargs) as stream:
        return list(stream)


def streamed_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)


def content_chunk_count(chunks: list[ChatCompletionChunk]) -> int:
    return sum(1 for chunk in chunks if any(choice.delta.content for choice in chunk.choices))


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]


def assert_usage_adds_up(usage: Any) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def embed(client: openai.OpenAI, model: str, **kwargs: Any) -> list[list[float]]:
    response = client.embeddings.create(model=model, input=EMBEDDING_INPUTS, **kwargs)
    assert [item.index for item in response.data] == list(range(len(EMBEDDING_INPUTS)))
    return [list(item.embedding) for item in response.data]


def assert_vectors_close(actual: list[list[float]], expected: list[list[float]]) -> None:
    """Equal up to float32 rounding: base64 carries float32, JSON floats may carry more digits."""
    assert [len(vector) for vector in actual] == [len(vector) for vector in expected]
    for got, want in zip(actual, expected):
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(got, want))


# --- chat completions --------------------------------------------------------------------------


def test_chat_completion_returns_text_usage_and_the_requested_model(client, model):
    response = chat(client, model)

    choice = response.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert_usage_adds_up(response.usage)
    assert response.model == model


def test_chat_stream_without_include_usage_matches_non_stream_text_and_carries_no_usage(client, model):
    expected = chat(client, model).choices[0].message.content

    chunks = chat_stream(client, model)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_text(chunks) == expected
    assert [chunk.usage for chunk in chunks if chunk.usage is not None] == []
    assert finish_reasons(chunks) == ["stop"]
    assert {chunk.model for chunk in chunks} == {model}


def test_chat_stream_with_include_usage_ends_with_a_usage_only_chunk(client, model):
    expected = chat(client, model).choices[0].message.content

    chunks = chat_stream(client, model, stream_options={"include_usage": True})

    *body, last = chunks
    assert last.choices == []
    assert_usage_adds_up(last.usage)
    assert [chunk.usage for chunk in body if chunk.usage is not None] == []
    assert streamed_text(chunks) == expected
    assert finish_reasons(chunks) == ["stop"]


@pytest.mark.parametrize(
    ("headers", "expected_chunks"),
    [({}, DEFAULT_MOCK_CHUNKS), ({"x-mock-chunks": "3"}, 3)],
    ids=["default", "x-mock-chunks-3"],
)
def test_mock_chunks_header_sets_the_number_of_content_chunks(client, model, headers, expected_chunks):
    chunks = chat_stream(client, model, extra_headers=headers)

    assert content_chunk_count(chunks) == expected_chunks


def test_routing_rename_sends_the_target_model_upstream(client):
    response = chat(client, "renamed")

    assert response.model == "real-model"


# --- legacy completions ------------------------------------------------------------------------


def test_legacy_completion_returns_the_same_text_in_stream_and_non_stream(client, model):
    response = client.completions.create(model=model, prompt=PROMPT)
    text = response.choices[0].text
    assert isinstance(text, str) and text
    assert response.choices[0].finish_reason == "stop"
    assert_usage_adds_up(response.usage)

    with client.completions.create(model=model, prompt=PROMPT, stream=True) as stream:
        chunks = list(stream)

    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == text
    assert finish_reasons(chunks) == ["stop"]


# --- embeddings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "dimensions"),
    [({}, DEFAULT_DIMENSIONS), ({"dimensions": 64}, 64)],
    ids=["default-dimensions", "dimensions-64"],
)
def test_float_embeddings_give_one_deterministic_vector_per_input(client, model, extra, dimensions):
    vectors = embed(client, model, encoding_format="float", **extra)

    assert [len(vector) for vector in vectors] == [dimensions] * len(EMBEDDING_INPUTS)
    assert all(isinstance(value, float) for vector in vectors for value in vector)
    assert vectors[0] == vectors[2], "same input, same vector"
    assert vectors[0] != vectors[1], "different inputs, different vectors"


def test_sdk_default_base64_embeddings_decode_to_the_float_vectors(client, model):
    floats = embed(client, model, encoding_format="float")

    decoded = embed(client, model)  # the SDK asks for base64 and decodes it itself

    assert_vectors_close(decoded, floats)


def test_base64_embeddings_are_base64_little_endian_float32_on_the_wire(client, raw_post: RawPost, model):
    floats = embed(client, model, encoding_format="float")

    status, body = raw_post(
        "/v1/embeddings", {"model": model, "input": EMBEDDING_INPUTS, "encoding_format": "base64"}
    )

    assert status == 200, body
    encoded = [item["embedding"] for item in body["data"]]
    assert all(isinstance(value, str) for value in encoded)
    raw = [base64.b64decode(value, validate=True) for value in encoded]
    assert [len(data) for data in raw] == [4 * DEFAULT_DIMENSIONS] * len(EMBEDDING_INPUTS)
    assert_vectors_close([list(struct.unpack(f"<{DEFAULT_DIMENSIONS}f", data)) for data in raw], floats)


# --- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "listed", "not_listed"),
    [
        (TEST_KEY, {"mock-*", "up-*", "renamed"}, set()),
        (LIMITED_KEY, {"mock-*"}, {"up-*", "renamed"}),
    ],
    ids=["all-connections", "mock-only"],
)
def test_models_list_shows_the_routes_the_group_may_use(make_client, api_key, listed, not_listed):
    ids = {entry.id for entry in make_client(api_key).models.list()}

    assert listed <= ids
    assert not (not_listed & ids)


def test_models_retrieve_returns_one_route(client):
    assert client.models.retrieve("renamed").id == "renamed"


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api_key", "model_name", "error", "status"),
    [
        ("sk-unknown-key", "mock-1", openai.AuthenticationError, 401),
        (TEST_KEY, "nope", openai.NotFoundError, 404),
        (LIMITED_KEY, "up-1", openai.PermissionDeniedError, 403),
    ],
    ids=["unknown-key", "unknown-model", "group-may-not-use-connection"],
)
def test_gateway_refusals_raise_the_matching_sdk_error(make_client, api_key, model_name, error, status):
    with pytest.raises(error) as raised:
        chat(make_client(api_key), model_name)

    assert raised.value.status_code == status
    assert isinstance(raised.value.body, dict) and raised.value.body.get("message")


def test_upstream_500_raises_internal_server_error_without_leaking_the_upstream_key(client, model):
    with pytest.raises(openai.InternalServerError) as raised:
        chat(client, model, extra_headers={"x-mock-status": "500"})

    assert raised.value.status_code == 500
    assert UPSTREAM_KEY not in raised.value.response.text


# --- raw HTTP ----------------------------------------------------------------------------------


def test_chat_path_without_v1_prefix_answers_like_the_sdk_path(client, raw_post: RawPost, model):
    expected = chat(client, model).choices[0].message.content

    status, body = raw_post("/chat/completions", {"model": model, "messages": MESSAGES})

    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected
    assert body["model"] == model
