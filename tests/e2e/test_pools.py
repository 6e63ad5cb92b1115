"""Pools as the official `openai` SDK meets them, with its own retries off (`max_retries=0`), so
what is tested is the gateway's: a refused target is retried on the next one, a stream fails over
before its first byte, a pool exhausted by an upstream's 429 answers 429 with Retry-After (the
SDK's RateLimitError), and a fallback route answers under its own name.
"""

from __future__ import annotations

import json
import socket
from http.server import BaseHTTPRequestHandler

import openai
import pytest

from conftest import LmgateProcess, sdk_client, start_process
from recording_server import RecordingServer


class _Refusing(BaseHTTPRequestHandler):
    """Answers every request with the status and headers of its server's owner."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        owner = self.server.owner
        length = int(self.headers.get("content-length", "0"))
        owner.record({"path": self.path, "body": json.loads(self.rfile.read(length) or b"{}")})
        body = json.dumps({"error": {"message": "not now", "type": "rate_limit_error"}}).encode()
        self.send_response(owner.status)
        for name, value in owner.extra_headers:
            self.send_header(name, value)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def refusing(status: int, headers: list[tuple[str, str]]) -> RecordingServer:
    server = RecordingServer(_Refusing, f"refusing-{status}")
    server.status = status
    server.extra_headers = headers
    return server.start()


def dead_addr() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


CONFIG = """\
[server]
listen = "127.0.0.1:0"

[connections.mock]
api_type = "mock"

[connections.up]
api_type = "openai"
api_base = "http://{upstream}/v1"

[connections.dead]
api_type = "openai"
api_base = "http://{dead}/v1"
connect_timeout_secs = 2

[connections.limited]
api_type = "openai"
api_base = "http://{limited}/v1"

[routing]
"pooled" = {{ targets = ["dead.*", "up.*"], strategy = "ordered" }}
"rate-limited" = {{ targets = ["limited.*"], retry_after_max_secs = 1 }}
"with-fallback" = {{ targets = ["dead.*"], attempts = 1, fallbacks = ["mock-fallback"] }}
"mock-fallback" = "mock.*"
"""


@pytest.fixture(scope="module")
def limited():
    server = refusing(429, [("retry-after", "30")])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pool_gateway(upstream: LmgateProcess, limited: RecordingServer, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("pools")
    config = workdir / "lmgate.toml"
    config.write_text(CONFIG.format(upstream=upstream.addr, dead=dead_addr(), limited=limited.addr))
    yield from start_process("lmgate-serve-pools", ["serve", "--config", str(config), "--env", ""], workdir)


@pytest.fixture(scope="module")
def pool_client(pool_gateway: LmgateProcess):
    client = sdk_client(pool_gateway.base_url, "unused")
    yield client
    client.close()


MESSAGES = [{"role": "user", "content": "hello"}]


def test_a_refused_target_is_retried_on_the_next_and_the_sdk_sees_one_answer(pool_client: openai.OpenAI):
    raw = pool_client.chat.completions.with_raw_response.create(model="pooled", messages=MESSAGES)
    assert raw.headers["x-lmgate-attempts"] == "2"
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == "pooled"


def test_a_stream_fails_over_before_its_first_byte(pool_client: openai.OpenAI):
    expected = pool_client.chat.completions.create(model="pooled", messages=MESSAGES).choices[0].message.content
    chunks = list(pool_client.chat.completions.create(model="pooled", messages=MESSAGES, stream=True))
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role]
    assert len(roles) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_a_pool_exhausted_by_429s_raises_the_sdks_rate_limit_error_with_retry_after(
    pool_client: openai.OpenAI, limited: RecordingServer
):
    before = len(limited.requests)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as raised:
            pool_client.chat.completions.create(model="rate-limited", messages=MESSAGES)
        assert 1 <= int(raised.value.response.headers["retry-after"]) <= 30
    # The second request waited on the cooldown, not on the upstream.
    assert len(limited.requests) - before <= 1


def test_a_fallback_route_answers_under_its_own_name(pool_client: openai.OpenAI):
    completion = pool_client.chat.completions.create(model="with-fallback", messages=MESSAGES)
    assert completion.model == "mock-fallback"
    assert completion.choices[0].message.content
