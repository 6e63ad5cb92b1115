"""Embeddings at volume end to end: split and merge, encodings converted, every input form, the
per-input cache, and errors that never leak a partial list.

Each test starts a scripted OpenAI-compatible embeddings upstream (Python, on 127.0.0.1) and its
own `lmgate serve` with an `openai` connection `tei` to it, configured under
`[connections.tei.embeddings]` (and `[embeddings_cache]`). The upstream:

- refuses (400) a request with more than its `max_inputs` inputs, so a gateway that does not
  split fails loudly;
- records each request's inputs (normalised to a list: strings or token-id lists) and the
  `encoding_format` it asked for;
- answers each input with a vector derived from it (`derived`), as float32 values, in float
  (JSON numbers) or base64 (little-endian float32) as asked, or always float when it is told to
  ignore `encoding_format`;
- lists `data` in reverse order, each item with its `index`, so only a merge by index is right;
- counts 2 prompt tokens per input;
- fails with 500 a request holding the input "boom".

Vectors are compared as float32 bit patterns: a conversion that is not exact fails.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from conftest import CLIENT_TIMEOUT_SECS, LmgateProcess, start_process
from recording_server import RecordingServer, ScriptedHandler

KEY = "sk-embeddings-team"
UPSTREAM_KEY = "sk-embeddings-upstream"
MODEL = "emb-model"
PROMPT_TOKENS_PER_INPUT = 2
FAIL_INPUT = "boom"

# Ten distinct inputs of different lengths, ASCII and not (the vectors depend on UTF-8 bytes).
TEN = [
    "alpha",
    "beta gamma",
    "δέλτα",
    "iota kappa",
    "epsilon zeta eta theta",
    "café ☕",
    "x",
    "the quick brown fox jumps over the lazy dog",
    "日本語のテキスト",
    "omega",
]


# --------------------------------------------------------------------------------------------
# Vectors.


def f32(x: float) -> float:
    """`x` rounded to the nearest float32 (as a Python float)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def units(item: str | list[int]) -> list[int]:
    """A string's UTF-8 bytes, or a token-id array's ids."""
    return list(item.encode()) if isinstance(item, str) else list(item)


def derived(item: str | list[int]) -> list[float]:
    """The vector the upstream returns for one input: float32 values, none of them exact in
    decimal."""
    u = units(item)
    return [f32(v) for v in (len(u), sum(u) / 7, -u[0] / 3, 1 / (len(u) + 3))]


def bits(vector: list[float]) -> bytes:
    """A vector's float32 little-endian bytes: what "equal as float32" compares."""
    return struct.pack(f"<{len(vector)}f", *vector)


def assert_vectors(got: list[list[float]], inputs: list[Any]) -> None:
    assert len(got) == len(inputs), f"{len(got)} vectors for {len(inputs)} inputs"
    for i, (vector, item) in enumerate(zip(got, inputs)):
        want = derived(item)
        assert len(vector) == len(want), f"input {i} {item!r}: {vector} (want {want})"
        assert bits(vector) == bits(want), f"input {i} {item!r}: {vector} != {want} as float32"


def b64_vector(text: str) -> list[float]:
    raw = base64.b64decode(text, validate=True)
    assert len(raw) % 4 == 0, f"base64 vector of {len(raw)} bytes"
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def wire_vectors(body: dict[str, Any], encoding: str) -> list[list[float]]:
    """The vectors of an embeddings list as sent: in order, indexes 0..n-1, every one in
    `encoding` (strings for base64, number arrays for float)."""
    assert body.get("object") == "list", body
    data = body["data"]
    assert [item["index"] for item in data] == list(range(len(data))), [item["index"] for item in data]
    out = []
    for item in data:
        assert item.get("object") == "embedding", item
        vector = item["embedding"]
        if encoding == "base64":
            assert isinstance(vector, str), f"index {item['index']}: not base64 on the wire: {vector!r}"
            out.append(b64_vector(vector))
        else:
            assert isinstance(vector, list), f"index {item['index']}: not a float array on the wire: {vector!r}"
            assert all(isinstance(v, (int, float)) for v in vector), vector
            out.append([float(v) for v in vector])
    return out


# --------------------------------------------------------------------------------------------
# The scripted upstream.


def normalised(value: Any) -> list[Any]:
    """An OpenAI `input` as a list of inputs (strings or token-id lists)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [value]  # one input of token ids
    if isinstance(value, list):
        return list(value)
    raise ValueError(f"unexpected input {value!r}")


class _EmbeddingsHandler(ScriptedHandler):
    server: Any

    def do_POST(self) -> None:
        owner: EmbeddingsUpstream = self.server.owner
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        if self.path != "/v1/embeddings" or not isinstance(body, dict):
            owner.record({"path": self.path, "body": body, "inputs": [], "encoding_format": None})
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        try:
            inputs = normalised(body.get("input"))
        except ValueError as e:
            owner.record({"path": self.path, "body": body, "inputs": [], "encoding_format": None})
            self._send_json(400, {"error": {"message": str(e), "type": "invalid_request_error", "param": "input"}})
            return
        asked = body.get("encoding_format")
        owner.record({"path": self.path, "body": body, "inputs": inputs, "encoding_format": asked})
        if len(inputs) > owner.max_inputs:
            message = f"too many inputs: {len(inputs)} > {owner.max_inputs}"
            self._send_json(400, {"error": {"message": message, "type": "invalid_request_error", "param": "input"}})
            return
        if FAIL_INPUT in inputs:
            self._send_json(500, {"error": {"message": "the model crashed", "type": "server_error"}})
            return
        encoding = "float" if owner.ignore_encoding else (asked or "float")
        data = []
        for index, item in enumerate(inputs):
            vector = derived(item)
            embedding: Any = vector if encoding == "float" else base64.b64encode(bits(vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        data.reverse()  # only a merge by `index` puts them back in order
        tokens = PROMPT_TOKENS_PER_INPUT * len(inputs)
        self._send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )


class EmbeddingsUpstream(RecordingServer):
    def __init__(self, max_inputs: int, ignore_encoding: bool = False) -> None:
        super().__init__(_EmbeddingsHandler, "embeddings-upstream")
        self.max_inputs = max_inputs
        self.ignore_encoding = ignore_encoding


# --------------------------------------------------------------------------------------------
# Fixtures and helpers.


@dataclass
class Setup:
    upstream: EmbeddingsUpstream
    gateway: LmgateProcess


@pytest.fixture
def start(tmp_path: Path):
    """`start(embeddings=..., upstream_max_inputs=..., ignore_encoding=..., cache=...)`: a
    scripted upstream and a gateway in front of it; both stopped after the test."""
    with contextlib.ExitStack() as stack:

        def run(
            embeddings: str,
            upstream_max_inputs: int = 3,
            ignore_encoding: bool = False,
            cache: bool = False,
        ) -> Setup:
            upstream = EmbeddingsUpstream(upstream_max_inputs, ignore_encoding).start()
            stack.callback(upstream.stop)
            cache_table = "[embeddings_cache]\nmax_mb = 16\nttl_secs = 3600\n" if cache else ""
            text = f"""\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[connections.tei]
api_type = "openai"
api_base = "http://{upstream.addr}/v1"
api_key = "{UPSTREAM_KEY}"

[connections.tei.embeddings]
{embeddings}

{cache_table}
[routing]
"*" = "tei.*"

[groups.team]
api_keys = ["{KEY}"]
"""
            path = tmp_path / "lmgate.toml"
            path.write_text(text)
            args = ["serve", "--config", str(path), "--env", ""]
            gateway = stack.enter_context(contextlib.contextmanager(start_process)("lmgate-serve-embeddings", args, tmp_path))
            return Setup(upstream, gateway)

        yield run


SPLIT = """\
max_inputs = 3
max_tokens = 16384
parallel = 2
"""


def sdk(gateway: LmgateProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=KEY,
        timeout=CLIENT_TIMEOUT_SECS,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(timeout=CLIENT_TIMEOUT_SECS, trust_env=False),
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: Any


def post(gateway: LmgateProcess, body: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    """POST /v1/embeddings with raw HTTP: the status, headers and JSON body as sent."""
    host, port = gateway.addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=CLIENT_TIMEOUT_SECS)
    try:
        conn.request(
            "POST",
            "/v1/embeddings",
            body=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        raw = response.read()
        names = {k.lower(): v for k, v in response.getheaders()}
        try:
            decoded = json.loads(raw)
        except ValueError:
            decoded = raw.decode(errors="replace")
        return Reply(response.status, names, decoded)
    finally:
        conn.close()


def assert_consecutive_runs(requests: list[dict[str, Any]], inputs: list[Any], max_inputs: int) -> None:
    """The upstream requests carry the client's inputs as consecutive runs of at most
    `max_inputs`, which put together (in any order of arrival) are all of them, once."""
    runs = [r["inputs"] for r in requests]
    assert all(1 <= len(run) <= max_inputs for run in runs), [len(run) for run in runs]
    starts = []
    for run in runs:
        matches = [i for i in range(len(inputs)) if inputs[i : i + len(run)] == run]
        assert matches, f"an upstream request is not a consecutive run of the client's inputs: {run!r}"
        starts.append(matches[0])
    ordered = [run for _, run in sorted(zip(starts, runs), key=lambda p: p[0])]
    assert [item for run in ordered for item in run] == inputs, ordered


# --------------------------------------------------------------------------------------------
# 1-2. The official SDK, split over max_inputs and merged.


def test_sdk_default_base64_is_split_over_max_inputs_and_merged_in_order(start):
    setup = start(SPLIT)
    with sdk(setup.gateway) as client:
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEN)
        wire = raw.http_response.json()
        result = raw.parse()

    # On the wire: base64 (what the SDK asked for by default), in order, indexes 0..9.
    assert_vectors(wire_vectors(wire, "base64"), TEN)
    # What the SDK gives the user: decoded (base64 + array, no numpy) to the same float32s.
    assert [d.index for d in result.data] == list(range(10))
    assert_vectors([d.embedding for d in result.data], TEN)
    assert result.usage.prompt_tokens == PROMPT_TOKENS_PER_INPUT * 10
    assert result.usage.total_tokens == PROMPT_TOKENS_PER_INPUT * 10
    assert result.model == MODEL

    requests = setup.upstream.requests
    assert len(requests) == 4, [r["inputs"] for r in requests]
    assert_consecutive_runs(requests, TEN, 3)
    # The upstream gives base64 (default `encodings`): it is asked for what the client wants.
    assert {r["encoding_format"] for r in requests} == {"base64"}, [r["encoding_format"] for r in requests]
    assert {r["body"]["model"] for r in requests} == {MODEL}


@pytest.mark.parametrize("upstream_encoding", [None, "base64"])
def test_sdk_explicit_float_is_split_and_merged(start, upstream_encoding):
    # With `upstream_encoding = "base64"` the upstream is always asked for base64 and the gateway
    # converts to float for this client.
    extra = f'upstream_encoding = "{upstream_encoding}"\n' if upstream_encoding else ""
    setup = start(SPLIT + extra)
    with sdk(setup.gateway) as client:
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=TEN, encoding_format="float")
        wire = raw.http_response.json()
        result = raw.parse()

    assert_vectors(wire_vectors(wire, "float"), TEN)
    assert [d.index for d in result.data] == list(range(10))
    assert_vectors([d.embedding for d in result.data], TEN)
    assert result.usage.prompt_tokens == PROMPT_TOKENS_PER_INPUT * 10

    requests = setup.upstream.requests
    assert len(requests) == 4, [r["inputs"] for r in requests]
    assert_consecutive_runs(requests, TEN, 3)
    asked = upstream_encoding or "float"
    assert {r["encoding_format"] for r in requests} == {asked}, [r["encoding_format"] for r in requests]


# --------------------------------------------------------------------------------------------
# 3. An upstream that only returns floats, a base64 client.


@pytest.mark.parametrize("count", [10, 2], ids=["split", "one-request"])
def test_float_only_upstream_gives_an_sdk_base64_client_exact_vectors(start, count):
    setup = start(SPLIT + 'encodings = ["float"]\n', ignore_encoding=True)
    inputs = TEN[:count]
    with sdk(setup.gateway) as client:
        raw = client.embeddings.with_raw_response.create(model=MODEL, input=inputs)
        wire = raw.http_response.json()
        result = raw.parse()

    # The gateway converted: the client got base64 strings (the SDK passes float arrays through
    # untouched, so the wire is checked too), carrying the upstream's float32 bits exactly.
    assert_vectors(wire_vectors(wire, "base64"), inputs)
    assert_vectors([d.embedding for d in result.data], inputs)
    assert result.usage.prompt_tokens == PROMPT_TOKENS_PER_INPUT * count

    requests = setup.upstream.requests
    assert len(requests) == (count + 2) // 3, [r["inputs"] for r in requests]
    assert_consecutive_runs(requests, inputs, 3)
    # It cannot give base64, so it is asked for float.
    assert {r["encoding_format"] for r in requests} == {"float"}, [r["encoding_format"] for r in requests]


# --------------------------------------------------------------------------------------------
# 4. Token-id arrays (LangChain's OpenAIEmbeddings).


def test_token_id_arrays_are_split_and_answered_in_order(start):
    setup = start(SPLIT + 'encodings = ["float"]\n')
    arrays = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    r = post(setup.gateway, {"model": MODEL, "input": arrays})
    assert r.status == 200, (r.status, r.body)
    assert_vectors(wire_vectors(r.body, "float"), arrays)
    assert r.body["usage"]["prompt_tokens"] == PROMPT_TOKENS_PER_INPUT * 4, r.body["usage"]

    requests = setup.upstream.requests
    assert len(requests) == 2, [r["inputs"] for r in requests]
    assert_consecutive_runs(requests, arrays, 3)
    # Sent as arrays of token-id arrays, not as strings or flattened.
    for request in requests:
        value = request["body"]["input"]
        assert isinstance(value, list) and all(isinstance(v, list) for v in value), value

    # One input of token ids (`[11, 12, 13]`) converted to base64 (the upstream gives only
    # float): still one input, and its vector is the one for those ids.
    before = len(setup.upstream.requests)
    r = post(setup.gateway, {"model": MODEL, "input": [11, 12, 13], "encoding_format": "base64"})
    assert r.status == 200, (r.status, r.body)
    assert_vectors(wire_vectors(r.body, "base64"), [[11, 12, 13]])
    new = setup.upstream.requests[before:]
    assert [q["inputs"] for q in new] == [[[11, 12, 13]]], [q["body"] for q in new]
    assert new[0]["encoding_format"] == "float"


# --------------------------------------------------------------------------------------------
# 5. The per-input cache.


def test_cache_serves_repeats_without_the_upstream_and_no_cache_bypasses_it(start):
    setup = start(SPLIT, cache=True)
    inputs = TEN[:5]
    body = {"model": MODEL, "input": inputs}

    first = post(setup.gateway, body)
    assert first.status == 200, (first.status, first.body)
    assert first.headers.get("x-lmgate-cache") == "hits=0 misses=5", first.headers
    assert_vectors(wire_vectors(first.body, "float"), inputs)
    assert first.body["usage"]["prompt_tokens"] == PROMPT_TOKENS_PER_INPUT * 5
    sent = len(setup.upstream.requests)
    assert sent == 2, [r["inputs"] for r in setup.upstream.requests]

    # The same again: every vector from the cache, nothing sent, the same vectors and model.
    second = post(setup.gateway, body)
    assert second.status == 200, (second.status, second.body)
    assert second.headers.get("x-lmgate-cache") == "hits=5 misses=0", second.headers
    assert len(setup.upstream.requests) == sent, [r["inputs"] for r in setup.upstream.requests[sent:]]
    assert_vectors(wire_vectors(second.body, "float"), inputs)
    assert second.body["data"] == first.body["data"]
    assert second.body["model"] == MODEL, second.body["model"]
    assert second.body["usage"]["prompt_tokens"] == 0, second.body["usage"]  # nothing was sent

    # Served from the cache in the other encoding, exactly.
    b64 = post(setup.gateway, {**body, "encoding_format": "base64"})
    assert b64.status == 200, (b64.status, b64.body)
    assert b64.headers.get("x-lmgate-cache") == "hits=5 misses=0", b64.headers
    assert len(setup.upstream.requests) == sent
    assert_vectors(wire_vectors(b64.body, "base64"), inputs)

    # `cache-control: no-cache`: the upstream is asked again.
    fresh = post(setup.gateway, body, headers={"cache-control": "no-cache"})
    assert fresh.status == 200, (fresh.status, fresh.body)
    assert_vectors(wire_vectors(fresh.body, "float"), inputs)
    again = setup.upstream.requests[sent:]
    assert len(again) == 2, [r["inputs"] for r in again]
    assert_consecutive_runs(again, inputs, 3)
    assert not fresh.headers.get("x-lmgate-cache", "hits=0").startswith("hits=5"), fresh.headers
    sent = len(setup.upstream.requests)

    # Partly cached: only the misses go upstream, and come back at their indexes.
    mixed = [inputs[0], "new one", inputs[2], "another new one", inputs[4]]
    part = post(setup.gateway, {"model": MODEL, "input": mixed})
    assert part.status == 200, (part.status, part.body)
    assert part.headers.get("x-lmgate-cache") == "hits=3 misses=2", part.headers
    assert_vectors(wire_vectors(part.body, "float"), mixed)
    assert [r["inputs"] for r in setup.upstream.requests[sent:]] == [["new one", "another new one"]]
    assert part.body["usage"]["prompt_tokens"] == PROMPT_TOKENS_PER_INPUT * 2, part.body["usage"]

    # A member that can change a vector (`dimensions`) is part of the key: a miss.
    sent = len(setup.upstream.requests)
    other = post(setup.gateway, {**body, "dimensions": 4})
    assert other.status == 200, (other.status, other.body)
    assert other.headers.get("x-lmgate-cache") == "hits=0 misses=5", other.headers
    assert len(setup.upstream.requests) == sent + 2


# --------------------------------------------------------------------------------------------
# 6. Errors.


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
@pytest.mark.parametrize("value", ["", [], ["alpha", "beta", "gamma", ""]], ids=["empty-string", "empty-array", "empty-item"])
def test_empty_input_is_a_400_naming_input(start, cache, value):
    setup = start(SPLIT, cache=cache)
    r = post(setup.gateway, {"model": MODEL, "input": value})
    assert r.status == 400, (r.status, r.body)
    assert isinstance(r.body, dict) and "error" in r.body, r.body
    assert r.body["error"]["param"] == "input", r.body["error"]
    assert r.body["error"]["type"] == "invalid_request_error", r.body["error"]
    assert "data" not in r.body
    assert setup.upstream.requests == [], "the upstream was asked"


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_a_failed_sub_request_fails_the_whole_request_without_partial_data(start, encoding):
    setup = start(SPLIT)
    inputs = TEN[:4] + [FAIL_INPUT] + TEN[4:6]  # sub-requests [0..3) [3..6) [6..7): the second fails
    r = post(setup.gateway, {"model": MODEL, "input": inputs, "encoding_format": encoding})
    assert r.status >= 500, (r.status, r.body)
    assert isinstance(r.body, dict) and "error" in r.body, r.body
    assert "data" not in r.body, r.body
    assert any(FAIL_INPUT in q["inputs"] for q in setup.upstream.requests)

    # The SDK sees an error too, not a list.
    with sdk(setup.gateway) as client:
        with pytest.raises(openai.APIStatusError) as raised:
            client.embeddings.create(model=MODEL, input=inputs)
    assert raised.value.status_code >= 500, raised.value

    # And the gateway still serves the good inputs.
    ok = post(setup.gateway, {"model": MODEL, "input": TEN[:4], "encoding_format": encoding})
    assert ok.status == 200, (ok.status, ok.body)
    assert_vectors(wire_vectors(ok.body, encoding), TEN[:4])
