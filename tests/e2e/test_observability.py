"""Observability end to end: metrics, request ids, the JSON-lines request log and cost.

Each test starts its own `lmgate serve` (its own config in tmp_path) in front of the standalone
`lmgate mock`, drives it with the official `openai` SDK or raw sockets, and reads what the gateway
says about it with a real OpenMetrics parser (`prometheus_client`). What is proved:

1. After a known sequence (successes, a stream read to the end, a stream the client cuts, an
   unknown model, an upstream 503, a bad key) `/metrics` holds exact values: requests by
   (route, connection, group, code), stream outcomes, upstream attempts, tokens equal to the usage
   the client saw, spend equal to the hand-computed cost (also in each non-stream response's
   `x-lmgate-cost-usd`), nothing left in flight, one duration observation per request, and the
   exact OpenMetrics content type.
2. `[log] requests` writes exactly one valid JSON line per request, with the documented fields,
   the client's request id, the group's name and the cost, and never a key (the group's, the
   connection's, or a wrong one a client sent).
3. `[metrics] listen` serves the scrape on its own address only; `enabled = false` serves none.
4. A sane client `x-request-id` is echoed and sent upstream (the upstream's own id comes back as
   `x-upstream-request-id`); an insane one is replaced by a generated 32-hex id, sent upstream too.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import math
import re
import socket
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable

import openai
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import TEST_KEY, LmgateProcess, sdk_client, start_process
from recording_server import RecordingServer

UPSTREAM_CANARY = "sk-upstream-canary-123"
CLIENT_CANARY = "sk-canary-never-logged-9f8e"
CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PRICE = {"input": 2.5, "cached_input": 1.25, "output": 10.0}  # USD per million tokens
POLL_SECS = 10.0
HEX32 = re.compile(r"^[0-9a-f]{32}$")

CONFIG = """\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[connections.up]
api_type = "openai"
api_base = "http://{upstream}/v1"
api_key = "{upstream_key}"
forward_headers = ["x-mock-*"]

[routing]
"up-*" = "up.*"

[groups.team]
api_keys = ["{test_key}"]

[prices]
"up-*" = {{ input = {input}, cached_input = {cached_input}, output = {output} }}

{extra}
"""

MESSAGES = [{"role": "user", "content": "hello"}]


# --------------------------------------------------------------------------------------------
# Helpers.


@pytest.fixture
def serve(tmp_path: Path, upstream: LmgateProcess):
    """Starts `lmgate serve` with CONFIG plus `extra` (TOML tables), in front of `upstream_addr`
    (the standalone mock unless given); every gateway started is stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(extra: str = "", upstream_addr: str | None = None) -> LmgateProcess:
            config = tmp_path / "lmgate.toml"
            config.write_text(
                CONFIG.format(
                    upstream=upstream_addr or upstream.addr,
                    upstream_key=UPSTREAM_CANARY,
                    test_key=TEST_KEY,
                    extra=extra,
                    **PRICE,
                )
            )
            args = ["serve", "--config", str(config), "--env", ""]
            run = contextlib.contextmanager(start_process)
            return stack.enter_context(run("lmgate-serve-observability", args, tmp_path))

        yield start


@pytest.fixture
def clients():
    """Makes SDK clients for a gateway, closed after the test."""
    made: list[openai.OpenAI] = []

    def make(gateway: LmgateProcess, api_key: str = TEST_KEY) -> openai.OpenAI:
        client = sdk_client(gateway.base_url, api_key)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def poll(what: str, probe: Callable[[], Any], done: Callable[[Any], bool], within: float = POLL_SECS) -> Any:
    """Calls `probe` until `done(result)`, at most `within` seconds; returns the last result."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {within}s; last value: {value!r}")
        time.sleep(0.05)


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies


def http_get(url: str) -> tuple[int, dict[str, str], str]:
    """GET without a key; returns (status, headers with lower-case names, body)."""
    try:
        with _opener.open(url, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read().decode()


class Scrape:
    """One parsed scrape: samples by name, each a list of (labels, value)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples.setdefault(s.name, []).append((s.labels, s.value))

    def by(self, name: str, keys: tuple[str, ...], **match: str) -> dict[tuple[str, ...], float]:
        """Sample `name`'s values keyed by the `keys` labels, over the samples whose labels
        include `match`."""
        out: dict[tuple[str, ...], float] = {}
        for labels, value in self.samples.get(name, []):
            if all(labels.get(k) == v for k, v in match.items()):
                key = tuple(labels[k] for k in keys)
                assert key not in out, f"{name}: two samples for {key}"
                out[key] = value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the sample of `name` with exactly these labels, or None."""
        found = [v for l, v in self.samples.get(name, []) if l == labels]
        assert len(found) <= 1, f"{name}{labels}: {found}"
        return found[0] if found else None


def scrape(url: str) -> Scrape:
    status, headers, body = http_get(url)
    assert status == 200, body
    assert headers["content-type"] == CONTENT_TYPE
    return Scrape(body)


def cost(prompt: int, completion: int, cached: int = 0) -> float:
    """The documented cost formula, in the order the gateway adds its terms."""
    fresh = prompt - cached
    return (fresh * PRICE["input"] + cached * PRICE["cached_input"] + 0.0 + completion * PRICE["output"]) / 1e6


def cut_stream(gateway: LmgateProcess, model: str) -> bytes:
    """Starts a long, slow stream over a raw socket, reads up to its first SSE event, and closes
    the socket. The client never asks for usage and never reaches the end. Returns what it read."""
    body = json.dumps({"model": model, "messages": MESSAGES, "stream": True}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\n"
        f"Host: {gateway.addr}\r\n"
        f"Authorization: Bearer {TEST_KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "x-mock-chunks: 2000\r\n"
        "x-mock-delay-us: 2000\r\n"
        "\r\n"
    ).encode()
    host, port = gateway.addr.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        seen = b""
        while b"\ndata:" not in seen:
            more = sock.recv(4096)
            assert more, f"the gateway closed before the first event: {seen!r}"
            seen += more
    return seen


# --------------------------------------------------------------------------------------------
# 1. Exact counters.


def test_metrics_count_a_known_sequence_exactly(serve, clients):
    started = time.time()
    gateway = serve()
    running = time.time()
    client = clients(gateway)
    chat = client.chat.completions

    # Two non-stream successes with different usages, each with its cost in a header.
    usages: list[tuple[int, int]] = []
    for content, chunks in [("hello", "16"), ("a somewhat longer question " * 8, "5")]:
        raw = chat.with_raw_response.create(
            model="up-chat",
            messages=[{"role": "user", "content": content}],
            extra_headers={"x-mock-chunks": chunks},
        )
        usage = raw.parse().usage
        assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens == int(chunks)
        usages.append((usage.prompt_tokens, usage.completion_tokens))
        header = raw.headers["x-lmgate-cost-usd"]
        assert re.fullmatch(r"\d+\.\d{9}", header), header
        assert header == f"{cost(*usages[-1]):.9f}"
        assert HEX32.match(raw.headers["x-request-id"])
    assert usages[0] != usages[1]

    # A stream with usage, read to the end: no cost header (its usage comes last).
    raw = chat.with_raw_response.create(
        model="up-stream", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    assert "x-lmgate-cost-usd" not in raw.headers
    events = list(raw.parse())
    stream_usage = [e.usage for e in events if e.usage is not None]
    assert len(stream_usage) == 1 and stream_usage[0].completion_tokens > 0
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    usages.append((stream_usage[0].prompt_tokens, stream_usage[0].completion_tokens))

    # An unknown model, an upstream 503, a wrong key.
    with pytest.raises(openai.NotFoundError) as unknown:
        chat.create(model="nowhere-model", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError) as failed:
        chat.create(model="up-chat", messages=MESSAGES, extra_headers={"x-mock-status": "503"})
    assert failed.value.status_code == 503
    with pytest.raises(openai.AuthenticationError) as refused:
        clients(gateway, CLIENT_CANARY).chat.completions.create(model="up-chat", messages=MESSAGES)
    for error in (unknown, failed, refused):  # errors have an id too, and no cost
        assert HEX32.match(error.value.response.headers["x-request-id"])
        assert "x-lmgate-cost-usd" not in error.value.response.headers

    # A stream the client leaves after its first event.
    assert b"200 OK" in cut_stream(gateway, "up-cut").split(b"\r\n", 1)[0]

    # Records are written when a body ends or is dropped: wait (bounded) until all 7 are in.
    metrics_url = gateway.root_url + "/metrics"

    def settled(s: Scrape) -> bool:
        chat_total = sum(s.by("lmgate_requests_total", ("code",), endpoint="chat").values())
        gone = s.value("lmgate_stream_outcomes_total", outcome="client_gone")
        # The in-flight count drops just after a record is counted: wait for it too.
        return chat_total >= 7 and gone == 1 and s.value("lmgate_upstream_in_flight", connection="up") == 0

    s = poll("all 7 chat requests counted", lambda: scrape(metrics_url), settled)

    requests = s.by("lmgate_requests_total", ("route", "connection", "group", "code"), endpoint="chat")
    assert requests == {
        ("up-*", "up", "team", "200"): 4,  # 2 non-stream, the full stream, the cut stream
        ("up-*", "up", "team", "503"): 1,
        ("", "", "team", "404"): 1,  # no route matched, but authenticated
        ("", "", "", "401"): 1,  # refused before any group is known
    }
    assert s.by("lmgate_stream_outcomes_total", ("outcome",)) == {
        ("complete",): 1,
        ("client_gone",): 1,
        ("upstream_error",): 0,
        ("idle_timeout",): 0,
        ("client_stalled",): 0,
    }
    assert s.by("lmgate_upstream_attempts_total", ("outcome",), connection="up") == {("ok",): 4, ("5xx",): 1}
    assert s.value("lmgate_upstream_in_flight", connection="up") == 0

    # Tokens: exactly the usage the client saw (the cut stream never got to its usage).
    tokens = s.by("lmgate_tokens_total", ("kind",), route="up-*", connection="up", group="team")
    assert tokens == {
        ("prompt",): sum(p for p, _ in usages),
        ("completion",): sum(c for _, c in usages),
    }, "no cached tokens reported: no `cached` series"
    assert sum(s.by("lmgate_tokens_total", ("kind",)).values()) == sum(p + c for p, c in usages)

    # Spend: the gateway adds per-request costs in nano-USD.
    want = sum(round(cost(p, c) * 1e9) for p, c in usages) / 1e9
    assert want > 0
    spent = s.value("lmgate_cost_usd_total", route="up-*", group="team")
    assert spent is not None and math.isclose(spent, want, rel_tol=0, abs_tol=1e-9), (spent, want)
    assert "lmgate_unpriced_requests_total" not in s.samples

    # Latency: one observation per request, under (endpoint, route).
    assert s.value("lmgate_request_duration_seconds_count", endpoint="chat", route="up-*") == 5
    assert s.value("lmgate_request_duration_seconds_count", endpoint="chat", route="") == 2
    assert s.value("lmgate_time_to_first_token_seconds_count", route="up-*") == 2
    assert s.value("lmgate_overhead_seconds_count", endpoint="chat") == 7
    assert 0 < s.value("lmgate_request_duration_seconds_sum", endpoint="chat", route="up-*") < 60

    # Always present, zero here.
    assert s.by("lmgate_log_records_lost_total", ("reason",)) == {("dropped",): 0, ("failed",): 0}
    assert s.by("lmgate_config_reloads_total", ("result",)) == {("ok",): 0, ("failed",): 0}
    # The process metrics.
    assert s.value("process_resident_memory_bytes") > 1e6
    assert s.value("process_open_fds") >= 3
    assert s.value("process_cpu_seconds_total") >= 0
    assert started - 2 <= s.value("process_start_time_seconds") <= running + 2  # /proc: whole-second boot time


# --------------------------------------------------------------------------------------------
# 2. The request log.

LOG_FIELDS = {
    "time": str,
    "request_id": str,
    "endpoint": str,
    "group": (str, type(None)),
    "model": (str, type(None)),
    "route": (str, type(None)),
    "connection": (str, type(None)),
    "upstream_model": (str, type(None)),
    "status": int,
    "outcome": str,
    "stream": bool,
    "attempts": int,
    "duration_ms": (int, float),
    "ttfb_ms": (int, float, type(None)),
    "ttft_ms": (int, float, type(None)),
    "overhead_ms": (int, float),
    "prompt_tokens": (int, type(None)),
    "completion_tokens": (int, type(None)),
    "cached_tokens": (int, type(None)),
    "cost_usd": (int, float, type(None)),
    "bytes_in": int,
    "bytes_out": int,
    "error": (str, type(None)),
    "error_kind": (str, type(None)),
}
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_the_request_log_has_one_line_per_request_and_no_secret(serve, clients, tmp_path: Path):
    log = tmp_path / "requests.jsonl"
    gateway = serve(f'[log]\nrequests = "{log}"\n')
    chat = clients(gateway).chat.completions

    raw = chat.with_raw_response.create(model="up-chat", messages=MESSAGES, extra_headers={"x-request-id": "e2e-trace-1"})
    assert raw.headers["x-request-id"] == "e2e-trace-1"
    header_cost = float(raw.headers["x-lmgate-cost-usd"])
    usage = raw.parse().usage
    stream = chat.create(
        model="up-stream",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-request-id": "e2e-trace-2"},
    )
    stream_usage = [c.usage for c in stream if c.usage is not None][0]
    with pytest.raises(openai.NotFoundError):
        chat.create(model="nowhere-model", messages=MESSAGES, extra_headers={"x-request-id": "e2e-trace-3"})
    with pytest.raises(openai.AuthenticationError):
        clients(gateway, CLIENT_CANARY).chat.completions.create(
            model="up-chat", messages=MESSAGES, extra_headers={"x-request-id": "e2e-trace-4"}
        )

    lines = poll("4 request-log lines", lambda: read_lines(log), lambda l: len(l) >= 4)
    records = [json.loads(line) for line in lines]
    by_id = {r["request_id"]: r for r in records}
    assert len(records) == 4 and sorted(by_id) == ["e2e-trace-1", "e2e-trace-2", "e2e-trace-3", "e2e-trace-4"]

    now = time.time()
    for r in records:
        assert set(r) == set(LOG_FIELDS), r
        for field, kind in LOG_FIELDS.items():
            assert isinstance(r[field], kind) and not (kind is int and isinstance(r[field], bool)), (field, r)
        assert RFC3339_MS.match(r["time"]), r["time"]
        logged_at = calendar.timegm(time.strptime(r["time"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert abs(logged_at - now) < 300, (r["time"], "is not UTC now")
        assert r["endpoint"] == "chat"
        assert r["outcome"] == "complete"
        assert 0 <= r["overhead_ms"] <= r["duration_ms"] < 30_000
        assert r["bytes_out"] > 0
        assert (r["bytes_in"] > 0) == (r["status"] != 401), "the body is not read before the key is checked"

    one = by_id["e2e-trace-1"]
    assert (one["group"], one["model"], one["route"], one["connection"], one["upstream_model"]) == (
        "team", "up-chat", "up-*", "up", "up-chat"
    )
    assert (one["status"], one["stream"], one["attempts"], one["ttft_ms"]) == (200, False, 1, None)
    assert (one["prompt_tokens"], one["completion_tokens"], one["cached_tokens"]) == (
        usage.prompt_tokens, usage.completion_tokens, 0
    )
    assert one["cost_usd"] > 0 and math.isclose(one["cost_usd"], header_cost, abs_tol=1e-9)
    assert math.isclose(one["cost_usd"], cost(usage.prompt_tokens, usage.completion_tokens), abs_tol=1e-12)
    assert (one["error"], one["error_kind"]) == (None, None)

    two = by_id["e2e-trace-2"]
    assert (two["status"], two["stream"], two["group"]) == (200, True, "team")
    assert two["ttft_ms"] is not None and 0 <= two["ttft_ms"] <= two["duration_ms"]
    assert (two["prompt_tokens"], two["completion_tokens"]) == (stream_usage.prompt_tokens, stream_usage.completion_tokens)
    assert math.isclose(two["cost_usd"], cost(stream_usage.prompt_tokens, stream_usage.completion_tokens), abs_tol=1e-12)

    three = by_id["e2e-trace-3"]
    assert (three["status"], three["group"], three["route"], three["connection"]) == (404, "team", None, None)
    assert (three["model"], three["attempts"], three["cost_usd"]) == ("nowhere-model", 0, None)
    assert three["error"] and three["error_kind"]

    four = by_id["e2e-trace-4"]
    assert (four["status"], four["group"], four["model"]) == (401, None, None)
    assert four["error"] and four["error_kind"]

    text = log.read_text()
    for secret in (TEST_KEY, UPSTREAM_CANARY, CLIENT_CANARY):
        assert secret not in text, f"{secret} is in the request log"
    assert read_lines(log) == lines, "no further line was written"


# --------------------------------------------------------------------------------------------
# 3. Where the scrape is served.


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_listen_serves_the_scrape_only_on_its_own_address(serve, clients):
    port = free_loopback_port()
    gateway = serve(f'[metrics]\nenabled = true\npath = "/metrics"\nlisten = "127.0.0.1:{port}"\n')
    private = f"http://127.0.0.1:{port}"

    status, headers, body = http_get(gateway.root_url + "/metrics")
    assert status == 404, body[:300]
    assert "openmetrics" not in headers.get("content-type", "")

    # The private scrape counts what the main listener answered (404 included).
    clients(gateway).chat.completions.create(model="up-chat", messages=MESSAGES)

    def counted(s: Scrape) -> bool:
        return s.by("lmgate_requests_total", ("endpoint", "route", "connection", "group", "code")) == {
            ("unknown", "", "", "", "404"): 1,
            ("chat", "up-*", "up", "team", "200"): 1,
        }

    s = poll("both requests on the private scrape", lambda: scrape(private + "/metrics"), counted)
    assert s.value("process_resident_memory_bytes") > 0
    # Nothing but the scrape there.
    assert http_get(private + "/v1/models")[0] == 404
    assert http_get(private + "/metricsx")[0] == 404


def test_metrics_disabled_are_not_served(serve):
    gateway = serve("[metrics]\nenabled = false\n")
    status, headers, body = http_get(gateway.root_url + "/metrics")
    assert status == 404, body[:300]
    assert "openmetrics" not in headers.get("content-type", "")
    # The gateway itself is up.
    assert http_get(gateway.root_url + "/health")[0] == 200


# --------------------------------------------------------------------------------------------
# 4. Request ids, end to end.

UPSTREAM_ID = "req_upstream_7f3a"


class _IdUpstream(BaseHTTPRequestHandler):
    """A chat upstream that records the headers it got and answers with its own x-request-id."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        self.server.owner.record({"headers": {k.lower(): v for k, v in self.headers.items()}})
        body = json.dumps(
            {
                "id": "chatcmpl-ids",
                "object": "chat.completion",
                "created": 1,
                "model": request.get("model"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-request-id", UPSTREAM_ID)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def id_upstream():
    server = RecordingServer(_IdUpstream, "id-upstream").start()
    yield server
    server.stop()


def test_request_ids_are_kept_when_sane_and_generated_otherwise(serve, clients, id_upstream: RecordingServer):
    gateway = serve(upstream_addr=id_upstream.addr)
    chat = clients(gateway).chat.completions.with_raw_response

    def send(request_id: str | None) -> tuple[str, str]:
        """The id the client got back and the one the upstream received."""
        before = len(id_upstream.requests)
        headers = {} if request_id is None else {"x-request-id": request_id}
        raw = chat.create(model="up-chat", messages=MESSAGES, extra_headers=headers)
        assert raw.headers["x-upstream-request-id"] == UPSTREAM_ID
        assert float(raw.headers["x-lmgate-cost-usd"]) == pytest.approx(cost(3, 1), abs=1e-9)
        assert len(id_upstream.requests) == before + 1
        return raw.headers["x-request-id"], id_upstream.last_request["headers"].get("x-request-id")

    for sane in ["e2e-trace-42_a.b:c/~!", "z" * 128]:  # visible ASCII, at most 128 bytes
        assert send(sane) == (sane, sane)

    generated = []
    for insane in ["y" * 200, "z" * 129, "has a space", None]:
        back, upstream_got = send(insane)
        assert HEX32.match(back), (insane, back)
        assert upstream_got == back, "the generated id is the one sent upstream"
        generated.append(back)
    assert len(set(generated)) == len(generated)
