"""The shipped config.toml as a user meets it: `lmgate check` on it and on broken files, and
`lmgate serve` on it, driven by the official OpenAI SDK.

The served copy differs from the file in two values only: `listen` becomes 127.0.0.1:0, and the
`openai` connection's `api_base` points at a recording stand-in for api.openai.com on loopback
(openai_upstream.py), so "set OPENAI_API_KEY and gpt* goes to OpenAI" is checked without internet.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

import openai_upstream as up
from conftest import LmgateProcess, lmgate_bin, sdk_client, start_process
from openai_upstream import RecordingOpenAI

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config.toml"
SECRET = "sk-secret-e2e-0123456789abcdef"
CHECK_TIMEOUT_SECS = 30
LOG_WAIT_SECS = 5
MESSAGES = [{"role": "user", "content": "Say something."}]

# Variables the shipped config reads; each test sets exactly the ones it means to.
CONFIG_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "LMGATE_KEY", "OPENAI_ORG")


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without the config's variables, plus `variables`."""
    env = {name: value for name, value in os.environ.items() if name not in CONFIG_VARIABLES}
    env.pop("RUST_LOG", None)  # the default log level: one line per request
    return {**env, **variables}


def run_check(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [lmgate_bin(), "check", *args],
        cwd=cwd,  # a fresh directory: no stray .env is read
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_SECS,
    )


def replace_once(pattern: str, replacement: str, text: str) -> str:
    """`re.sub` that insists on exactly one match, so a reshaped config.toml fails loudly here."""
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} matched {count} times in config.toml"
    return new


def served_copy(openai_base_url: str) -> str:
    """The shipped config with `listen` on a free loopback port and `openai` at `openai_base_url`."""
    text = SHIPPED_CONFIG.read_text()
    text = replace_once(r'^listen = "[^"]*"', 'listen = "127.0.0.1:0"', text)
    head, sep, rest = text.partition("[connections.openai]\n")
    assert sep, "config.toml has no [connections.openai]"
    section, next_table, tail = rest.partition("\n[")
    section = replace_once(r'^api_base = "[^"]*"', f'api_base = "{openai_base_url}"', section)
    return head + sep + section + next_table + tail


# --- lmgate check ------------------------------------------------------------------------------


def test_check_on_the_shipped_config_prints_a_summary_without_secret_values(tmp_path: Path):
    result = run_check(["--config", str(SHIPPED_CONFIG)], tmp_path, environment(OPENAI_API_KEY=SECRET))

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "connections (3):" in out
    assert re.search(r"^  mock \(mock\) in-process$", out, re.MULTILINE), out
    assert re.search(r"^  openai \(openai\) https://api\.openai\.com/v1 key: set$", out, re.MULTILINE), out
    assert re.search(r"^  anthropic \(anthropic\) .* DISABLED: .*`ANTHROPIC_API_KEY`", out, re.MULTILINE), out
    assert "routes (8):" in out and "  mock-* -> mock.*\n" in out and "  gpt* -> openai.*\n" in out
    assert "groups (1):" in out and "OPEN to anyone" in out
    assert out.rstrip().endswith(f"{SHIPPED_CONFIG}: OK")
    assert SECRET not in out + result.stderr
    assert SECRET[:12] not in out + result.stderr, "not even a prefix of the key"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nlisten = "127.0.0.1:0"\nlisen = 3\n', ["line 3", "in [server]", "`lisen`"]),
        (
            '[connections.local]\napi_type = "openai"\napi_bse = "http://127.0.0.1:1/v1"\n',
            ["line 3", "in [connections.local]", "`api_bse`"],
        ),
        ('[server]\nlisten = "127.0.0.1:0\n', ["line 2"]),
        # A syntax error on a line holding a key: the message points at it, never quotes it.
        (f'[connections.o]\napi_type = "openai"\napi_key = "{SECRET}\n', ["line 3"]),
        ('[connections.m]\napi_type = "mock"\n[routing]\n"x" = "nope.y"\n', ['routing."x"', "`nope`"]),
    ],
    ids=[
        "unknown-server-key",
        "unknown-connection-key",
        "unterminated-string",
        "syntax-error-beside-a-key",
        "unknown-connection",
    ],
)
def test_check_on_a_bad_file_exits_non_zero_naming_the_key_and_line(tmp_path: Path, text: str, expected: list[str]):
    config = tmp_path / "bad.toml"
    config.write_text(text)

    result = run_check(["--config", str(config)], tmp_path, environment())

    assert result.returncode != 0
    assert result.stderr.startswith(f"error: {config}: "), result.stderr
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert "OK" not in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_check_reads_keys_from_an_env_file_given_with_env(tmp_path: Path):
    (tmp_path / "keys.env").write_text(f"OPENAI_API_KEY={SECRET}\n")

    result = run_check(["--config", str(SHIPPED_CONFIG), "--env", "keys.env"], tmp_path, environment())

    assert result.returncode == 0, result.stderr
    assert "openai (openai) https://api.openai.com/v1 key: set" in result.stdout
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("env_file", ["missing.env", ".env"])
def test_an_env_file_named_explicitly_must_exist(tmp_path: Path, env_file: str):
    result = run_check(["--config", str(SHIPPED_CONFIG), "--env", env_file], tmp_path, environment())

    assert result.returncode != 0
    assert env_file in result.stderr, result.stderr


def test_an_env_file_that_does_not_parse_is_an_error_that_never_quotes_its_value(tmp_path: Path):
    (tmp_path / ".env").write_text(f'OPENAI_API_KEY="{SECRET}\n')  # unterminated quote

    result = run_check(["--config", str(SHIPPED_CONFIG)], tmp_path, environment())

    assert result.returncode != 0
    assert ".env" in result.stderr and "OPENAI_API_KEY" in result.stderr, result.stderr
    assert SECRET[:12] not in result.stdout + result.stderr


def test_a_missing_default_env_file_is_not_an_error(tmp_path: Path):
    result = run_check(["--config", str(SHIPPED_CONFIG)], tmp_path, environment())

    assert result.returncode == 0, result.stderr
    assert "DISABLED: environment variable `OPENAI_API_KEY`" in result.stdout


# --- lmgate serve on the shipped config --------------------------------------------------------


@pytest.fixture(scope="module")
def openai_upstream() -> Iterator[RecordingOpenAI]:
    upstream = RecordingOpenAI().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def shipped_gateway(openai_upstream: RecordingOpenAI, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("shipped")
    config = workdir / "config.toml"
    config.write_text(served_copy(openai_upstream.base_url))
    # No --env: the default .env, absent from workdir, is skipped quietly.
    yield from start_process(
        "lmgate-serve-shipped", ["serve", "--config", str(config)], workdir, environment(OPENAI_API_KEY=SECRET)
    )


@pytest.fixture(scope="module")
def client(shipped_gateway: LmgateProcess) -> Iterator[openai.OpenAI]:
    # The shipped config names no client keys: the gateway is open and ignores this one.
    client = sdk_client(shipped_gateway.base_url, "sk-client-any")
    yield client
    client.close()


def test_shipped_config_answers_mock_chat_in_stream_and_non_stream(client: openai.OpenAI):
    response = client.chat.completions.create(model="mock-1", messages=MESSAGES)
    text = response.choices[0].message.content
    assert text and response.model == "mock-1"
    assert response.usage is not None and response.usage.completion_tokens > 0

    with client.chat.completions.create(model="mock-1", messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_shipped_config_answers_mock_embeddings_in_float_and_base64(client: openai.OpenAI):
    inputs = ["alpha", "beta"]

    floats = client.embeddings.create(model="mock-embed", input=inputs, encoding_format="float")
    decoded = client.embeddings.create(model="mock-embed", input=inputs)  # the SDK's default: base64

    vectors = [item.embedding for item in floats.data]
    assert [len(v) for v in vectors] == [1536, 1536] and vectors[0] != vectors[1]
    for got, want in zip((item.embedding for item in decoded.data), vectors):
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(got, want))


def test_with_openai_api_key_set_gpt_models_go_to_the_openai_connection_with_that_key(
    client: openai.OpenAI, openai_upstream: RecordingOpenAI, shipped_gateway: LmgateProcess
):
    before = len(openai_upstream.requests)

    response = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)

    assert response.choices[0].message.content == up.ANSWER
    assert response.model == "gpt-4o"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == up.ANSWER
    # The gateway asked for stream usage itself and kept the usage-only chunk from this client.
    assert all(c.usage is None for c in chunks)
    sent = openai_upstream.requests[before:]
    assert [(r["method"], r["path"]) for r in sent] == [("POST", "/v1/chat/completions")] * 2
    for request in sent:
        assert request["headers"]["authorization"] == f"Bearer {SECRET}"
        assert "sk-client-any" not in str(request["headers"])
        assert request["body"]["model"] == "gpt-4o"
    assert sent[1]["body"]["stream_options"] == {"include_usage": True}
    line = r'method=POST path="/v1/chat/completions" .*model="gpt-4o" connection="openai" status=200'
    log = wait_for_log(shipped_gateway, line, count=2)
    assert SECRET not in log


def wait_for_log(process: LmgateProcess, pattern: str, count: int) -> str:
    """The process's log once `pattern` matches `count` lines. A request's line is written when
    its response body is dropped, which may be just after the client has read the last byte."""
    deadline = time.monotonic() + LOG_WAIT_SECS
    while True:
        log = process.log_path.read_text(errors="replace")
        if len(re.findall(pattern, log)) >= count:
            return log
        assert time.monotonic() < deadline, f"{count} lines matching {pattern!r} expected in:\n{log}"
        time.sleep(0.05)


def test_a_model_of_a_connection_without_its_key_is_503_naming_the_variable(client: openai.OpenAI):
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="claude-3-5-haiku-latest", messages=MESSAGES)

    assert raised.value.status_code == 503
    assert "ANTHROPIC_API_KEY" in raised.value.response.text


def test_models_lists_the_usable_routes_of_the_shipped_config(client: openai.OpenAI):
    ids = [model.id for model in client.models.list()]

    assert ids == ["mock-*", "gpt*", "o1*", "o3*", "o4*", "chatgpt-*", "text-embedding-*"], "claude* is hidden: no ANTHROPIC_API_KEY"
