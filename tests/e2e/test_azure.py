"""lmgate in front of Azure OpenAI, seen through the official OpenAI Python SDK.

A scripted Azure OpenAI resource stands in for https://RESOURCE.openai.azure.com: it answers only
at `/openai/deployments/{deployment}/{endpoint}?api-version=...` with the connection's `api-key`,
streams Azure's recorded chunks (tests/fixtures/azure: a first chunk with empty `choices` and
`prompt_filter_results`, content-filter annotations on the rest) and answers non-stream requests
and embeddings in Azure's shape. The gateway routes `prod-gpt-4o` to a named deployment and
`az-*` by name.
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

from conftest import TEST_KEY, LmgateProcess, sdk_client, start_process
from recording_server import RecordingServer, ScriptedHandler

AZURE_KEY = "az-resource-key-canary"
API_VERSION = "2024-10-21"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "azure" / "chat-stream-model-router.ndjson"
CHUNKS = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
STREAM_TEXT = "".join(c["choices"][0]["delta"].get("content") or "" for c in CHUNKS if c["choices"])
FILTERS = {"hate": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}

GATEWAY_CONFIG = """\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[connections.azure]
api_type = "azure"
api_base = "http://{addr}"
api_key = "{key}"
api_version = "{version}"

[routing]
"prod-gpt-4o" = "azure.gpt4o-deployment"
"az-*" = "azure.*"

[groups.team]
api_keys = ["{test_key}"]
"""


class _Azure(ScriptedHandler):
    def do_POST(self) -> None:
        url = urlsplit(self.path)
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.owner.record({"path": url.path, "query": parse_qs(url.query), "headers": dict(self.headers), "body": body})
        parts = url.path.split("/")
        if self.headers.get("api-key") != AZURE_KEY:
            return self._send_json(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}})
        if parts[:3] != ["", "openai", "deployments"] or parse_qs(url.query).get("api-version") != [API_VERSION]:
            return self._send_json(404, {"error": {"code": "404", "message": "Resource not found"}})
        deployment, endpoint = parts[3], "/".join(parts[4:])
        if deployment == "az-busy":
            return self._send_json(429, {"error": {"code": "429", "message": "Rate limit exceeded."}}, {"retry-after": "1"})
        if endpoint == "embeddings":
            return self._embeddings(body)
        if body.get("stream"):
            return self._stream(body)
        self._send_json(
            200,
            {
                "id": "chatcmpl-az1",
                "object": "chat.completion",
                "created": 1762317021,
                "model": "gpt-4o-2024-11-20",
                "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": FILTERS}],
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": f"Deployment {deployment} says hi.", "refusal": None},
                        "content_filter_results": FILTERS,
                        "logprobs": None,
                    }
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
            },
        )

    def _stream(self, body: dict[str, Any]) -> None:
        usage = (body.get("stream_options") or {}).get("include_usage")
        chunks = CHUNKS if usage else [c for c in CHUNKS if c.get("usage") is None]
        data = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        self._send(200, "text/event-stream", data)

    def _embeddings(self, body: dict[str, Any]) -> None:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = body.get("dimensions", 4)
        data = []
        for i, _ in enumerate(inputs):
            vector = [round(0.25 * (i + 1) + 0.125 * d, 4) for d in range(dims)]
            if body.get("encoding_format") == "base64":
                item: Any = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            else:
                item = vector
            data.append({"object": "embedding", "index": i, "embedding": item})
        usage = {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}
        self._send_json(200, {"object": "list", "model": "text-embedding-3-small", "data": data, "usage": usage})


@pytest.fixture(scope="module")
def azure() -> Iterator[RecordingServer]:
    server = RecordingServer(_Azure, "mock-azure").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(azure: RecordingServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    workdir = tmp_path_factory.mktemp("azure-gateway")
    config = workdir / "lmgate.toml"
    config.write_text(GATEWAY_CONFIG.format(addr=azure.addr, key=AZURE_KEY, version=API_VERSION, test_key=TEST_KEY))
    for gateway in start_process("lmgate-serve-azure", ["serve", "--config", str(config), "--env", ""], workdir):
        client = sdk_client(gateway.base_url, TEST_KEY)
        yield client
        client.close()
        log = gateway.log_tail()
        assert AZURE_KEY not in log, "the Azure key reached the gateway's log"


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_goes_to_the_deployment_with_api_key(client: openai.OpenAI, azure: RecordingServer) -> None:
    r = client.chat.completions.create(model="prod-gpt-4o", messages=MESSAGES)
    assert r.choices[0].message.content == "Deployment gpt4o-deployment says hi."
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (9, 5)
    # Azure's extra fields reach the client untouched.
    assert r.model_extra["prompt_filter_results"][0]["content_filter_results"] == FILTERS
    req = azure.last_request
    assert req["path"] == "/openai/deployments/gpt4o-deployment/chat/completions"
    assert req["query"] == {"api-version": [API_VERSION]}
    assert req["headers"]["api-key"] == AZURE_KEY
    assert "Authorization" not in req["headers"] and "authorization" not in req["headers"]
    assert req["body"]["model"] == "gpt4o-deployment"


def test_stream_with_filter_chunks_and_no_unrequested_usage(client: openai.OpenAI) -> None:
    with client.chat.completions.create(model="az-router", messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)
    assert chunks[0].choices == [] and chunks[0].model_extra["prompt_filter_results"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == STREAM_TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert all(c.usage is None for c in chunks), "the client did not ask for usage"


def test_stream_usage_when_asked(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="az-router", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (15, 78)


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_embeddings_with_dimensions(client: openai.OpenAI, azure: RecordingServer, encoding: str | None) -> None:
    extra = {"encoding_format": encoding} if encoding else {}
    r = client.embeddings.create(model="az-emb", input=["a", "b"], dimensions=3, **extra)
    if encoding == "base64":
        got = [list(struct.unpack("<3f", base64.b64decode(d.embedding))) for d in r.data]
    else:
        got = [d.embedding for d in r.data]
    assert got == [[0.25, 0.375, 0.5], [0.5, 0.625, 0.75]]
    req = azure.last_request
    assert req["path"] == "/openai/deployments/az-emb/embeddings"
    assert req["body"]["dimensions"] == 3


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="az-busy", messages=MESSAGES)
    for model in ["az-../x", "az-a/b", "az-a?x=1", "az-%2e%2e"]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=MESSAGES)
        assert e.value.body["param"] == "model", model
