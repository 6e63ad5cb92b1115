"""Rate limits, concurrency limits and budgets end to end.

Each test starts its own `lmgate serve` (its own config in tmp_path) with the in-process mock
(`api_type = "mock"`, steered by the client's `x-mock-*` headers: `x-mock-chunks` x
`x-mock-delay-us` is how long a stream stays open). Admissions under concurrency are counted with
raw HTTP from threads released together by a barrier; the official `openai` SDK is used where
its behaviour is the point (a 429 is its `RateLimitError`; its own retry waits the gateway's
`Retry-After`; `x-should-retry: false` stops it retrying a spent budget). What is proved:

1. `rpm` (memory): N at once are admitted, the rest are 429 `rate_limit_exceeded` with
   `Retry-After`; `x-ratelimit-*` headers count down. Per-key and per-connection limits, and a
   pool that moves on from a connection over its quota.
2. `max_concurrent`: only that many held streams at once; slots come back when they end.
3. `tpm` reserves `max_tokens` + prompt estimate and settles with real usage; a reservation
   larger than the limit (also from a connection's `default_max_tokens`) is a 400 naming
   `max_tokens`.
4. Redis: two gateways on one Redis share one limit (rpm, max_concurrent); a Redis that never
   answers is a fast 503 `limits_unavailable` (`deny`) or is passed (`allow`).
5. Budgets: spend reaches the budget, then 429 `insufficient_quota` with `x-should-retry:
   false`; spend survives a SIGTERM restart (memory `state_file`, and Redis); a budget group
   cannot use an unpriced model (403 `model_not_priced`).

Redis tests use 127.0.0.1:6379 db 0 under a group name unique to the run (keys deleted after);
with nothing listening there they are skipped, unless `CI` is set, where they fail.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import openai
import pytest

from conftest import CLIENT_TIMEOUT_SECS, LmgateProcess, start_process

KEY = "sk-limits-team"
KEY2 = "sk-limits-team-2"
MESSAGES = [{"role": "user", "content": "hello"}]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# Redis round trips on a loaded two-core machine: generous, so only a dead Redis times out.
REDIS_TIMEOUT_MS = 2000
# A held stream: 15 chunks 100 ms apart, about 1.5 s.
HOLD = {"x-mock-chunks": "15", "x-mock-delay-us": "100000"}
RESET_FORMAT = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s|(\d+)ms)$")


def config(body: str, limits: str = 'backend = "memory"') -> str:
    """A gateway config: loopback on an ephemeral port, `[limits]`, then `body` (connections,
    routing, prices, groups). The in-process mock is always there as `mock`."""
    return f"""\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[limits]
{limits}

{body}
"""


MOCK = """\
[connections.mock]
api_type = "mock"

[routing]
"mock-*" = "mock.*"
"""


# --------------------------------------------------------------------------------------------
# Helpers.


@pytest.fixture
def serve(tmp_path: Path):
    """Starts `lmgate serve` with a config text; every gateway started is stopped after the test.
    Each start gets its own log (`name`); the config file is `config_name` in tmp_path."""
    with contextlib.ExitStack() as stack:

        def start(text: str, name: str = "limits", config_name: str = "lmgate.toml") -> LmgateProcess:
            path = tmp_path / config_name
            path.write_text(text)
            args = ["serve", "--config", str(path), "--env", ""]
            run = contextlib.contextmanager(start_process)
            return stack.enter_context(run(f"lmgate-serve-{name}", args, tmp_path))

        yield start


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: Any  # decoded JSON, or the text of a stream
    head_at: float  # time.monotonic() when the head arrived
    end_at: float  # ... and when the body ended

    def error(self) -> dict[str, Any]:
        assert isinstance(self.body, dict) and "error" in self.body, f"no OpenAI error body: {self.body!r}"
        return self.body["error"]

    def retry_after(self) -> int:
        value = self.headers.get("retry-after")
        assert value is not None, f"no Retry-After on a {self.status}: {self.headers}"
        assert re.fullmatch(r"\d+", value), f"Retry-After is not whole seconds: {value!r}"
        return int(value)


def chat(model: str = "mock-a", max_tokens: int | None = 10, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return body


def post(
    gateway: LmgateProcess,
    body: dict[str, Any],
    key: str = KEY,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
    timeout: float = CLIENT_TIMEOUT_SECS,
) -> Reply:
    """One request on its own connection; reads the whole body (a stream to its end)."""
    host, port = gateway.addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = json.dumps(body).encode()
        conn.request(
            "POST",
            path,
            body=data,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        head_at = time.monotonic()
        raw = response.read()
        end_at = time.monotonic()
        names = {k.lower(): v for k, v in response.getheaders()}
        text = raw.decode(errors="replace")
        decoded: Any = text
        if names.get("content-type", "").startswith("application/json"):
            decoded = json.loads(text)
        return Reply(response.status, names, decoded, head_at, end_at)
    finally:
        conn.close()


def together(calls: list[Callable[[], Reply]]) -> list[Reply]:
    """Runs the calls at once (one thread each, released by a barrier); their replies in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 (reported below)
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=CLIENT_TIMEOUT_SECS + 10)
    assert not any(t.is_alive() for t in threads), "a request thread did not finish"
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def statuses(replies: list[Reply]) -> list[int]:
    return sorted(r.status for r in replies)


def assert_rate_limited(reply: Reply, max_wait: int = 60) -> None:
    assert reply.status == 429, (reply.status, reply.body)
    error = reply.error()
    assert error["code"] == "rate_limit_exceeded", error
    assert error["type"] == "rate_limit_error", error
    assert 1 <= reply.retry_after() <= max_wait, reply.headers


def assert_out_of_budget(reply: Reply) -> None:
    assert reply.status == 429, (reply.status, reply.body)
    error = reply.error()
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota"), error
    assert reply.headers.get("x-should-retry") == "false", reply.headers


def reset_secs(text: str) -> float:
    """`20ms`, `1.5s`, `6m0s`, `1h2m3s` as seconds; fails on anything else."""
    m = RESET_FORMAT.match(text)
    assert m, f"not a reset duration like 1s, 20ms or 6m0s: {text!r}"
    h, mins, s, ms = m.groups()
    return int(h or 0) * 3600 + int(mins or 0) * 60 + float(s or 0) + int(ms or 0) / 1000


def sdk(gateway: LmgateProcess, key: str = KEY, max_retries: int = 0, seen: list[int] | None = None) -> openai.OpenAI:
    """The official client; `seen` collects the status of every HTTP response it gets."""
    hooks = {"response": [lambda r: seen.append(r.status_code)]} if seen is not None else {}
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=key,
        timeout=CLIENT_TIMEOUT_SECS,
        max_retries=max_retries,
        http_client=openai.DefaultHttpxClient(timeout=CLIENT_TIMEOUT_SECS, trust_env=False, event_hooks=hooks),
    )


# --- Redis, spoken directly (RESP), to probe it and to delete this run's keys. -----------------


def _redis(*args: str, port: int = REDIS_PORT, timeout: float = 1.0) -> Any:
    with socket.create_connection((REDIS_HOST, port), timeout=timeout) as s:
        s.sendall(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args))
        reader = s.makefile("rb")

        def read() -> Any:
            line = reader.readline()
            if not line:
                raise ConnectionError("redis closed the connection")
            kind, rest = line[:1], line[1:-2]
            if kind == b"+":
                return rest.decode()
            if kind == b"-":
                raise RuntimeError(f"redis error: {rest.decode()}")
            if kind == b":":
                return int(rest)
            if kind == b"$":
                n = int(rest)
                if n < 0:
                    return None
                data = reader.read(n + 2)[:-2]
                return data.decode()
            if kind == b"*":
                n = int(rest)
                return None if n < 0 else [read() for _ in range(n)]
            raise RuntimeError(f"unexpected redis reply {line!r}")

        return read()


@pytest.fixture
def redis_group():
    """A group name unique to this run; skips (or fails under CI) without a Redis on :6379.
    The group's keys are deleted afterwards."""
    try:
        pong = _redis("PING")
    except (OSError, RuntimeError) as e:
        message = f"no Redis answers on {REDIS_HOST}:{REDIS_PORT} ({e}); the Redis limit tests need one"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    assert pong == "PONG", pong
    name = f"team_{secrets.token_hex(6)}"
    yield name
    with contextlib.suppress(OSError, RuntimeError):
        keys = _redis("KEYS", f"lmgate:g:{name}*")
        if keys:
            _redis("DEL", *keys)


def redis_limits(timeout_ms: int = REDIS_TIMEOUT_MS, port: int = REDIS_PORT, extra: str = "") -> str:
    return f'backend = "redis"\nredis_url = "redis://{REDIS_HOST}:{port}/0"\nredis_timeout_ms = {timeout_ms}\n{extra}'


# --------------------------------------------------------------------------------------------
# 1. Requests per minute (memory).


def test_rpm_admits_the_whole_limit_at_once_then_429_with_retry_after(serve):
    gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\nrpm = 5\ntpm = 1000000\n'))
    replies = together([lambda: post(gateway, chat()) for _ in range(15)])
    assert statuses(replies) == [200] * 5 + [429] * 10, [(r.status, r.body) for r in replies]

    admitted = [r for r in replies if r.status == 200]
    for r in admitted:
        assert r.headers.get("x-ratelimit-limit-requests") == "5", r.headers
        assert 0 < reset_secs(r.headers["x-ratelimit-reset-requests"]) <= 60, r.headers
        assert r.headers.get("x-ratelimit-limit-tokens") == "1000000", r.headers
        assert 0 < int(r.headers["x-ratelimit-remaining-tokens"]) < 1000000, r.headers
        reset_secs(r.headers["x-ratelimit-reset-tokens"])
    # One per admission, counting down: 4 left after the first, none after the fifth.
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted) == [0, 1, 2, 3, 4]

    for r in replies:
        if r.status == 429:
            # One request every 12 s comes back: the wait is at most that.
            assert_rate_limited(r, max_wait=12)
            assert r.headers.get("x-ratelimit-remaining-requests") == "0", r.headers

    # Still limited a moment later.
    assert_rate_limited(post(gateway, chat()), max_wait=12)


def test_rpm_headers_count_down_request_by_request(serve):
    gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\nrpm = 4\n'))
    remaining, resets = [], []
    for _ in range(4):
        r = post(gateway, chat())
        assert r.status == 200, r.body
        assert r.headers["x-ratelimit-limit-requests"] == "4"
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
        resets.append(reset_secs(r.headers["x-ratelimit-reset-requests"]))
    assert remaining == [3, 2, 1, 0]
    # The time until the limit is whole again grows by 15 s a request.
    assert all(b > a for a, b in zip(resets, resets[1:])), resets
    assert 14 <= resets[0] <= 15 and 55 <= resets[-1] <= 60, resets
    assert_rate_limited(post(gateway, chat()), max_wait=15)


def test_key_rpm_limits_each_key_of_a_group_on_its_own(serve):
    gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}", "{KEY2}"]\nkey_rpm = 2\n'))
    first = together([lambda: post(gateway, chat(), key=KEY) for _ in range(4)])
    assert statuses(first) == [200, 200, 429, 429], [(r.status, r.body) for r in first]
    # The other key of the group has its own two.
    second = [post(gateway, chat(), key=KEY2) for _ in range(3)]
    assert [r.status for r in second] == [200, 200, 429], [(r.status, r.body) for r in second]
    assert_rate_limited(second[-1], max_wait=30)


def test_a_connection_over_its_quota_is_a_429_on_a_plain_route_and_skipped_by_a_pool(serve):
    gateway = serve(
        config(
            """\
[connections.mock]
api_type = "mock"

[connections.solo]
api_type = "mock"
rpm = 2

[connections.first]
api_type = "mock"
rpm = 1

[routing]
"solo-*" = "solo.*"
"pooled" = { targets = ["first.*", "mock.*"], strategy = "ordered" }

[prices]
"first.pooled" = { input = 1000.0, output = 1000.0 }
"mock.pooled" = { input = 2000.0, output = 2000.0 }

[groups.team]
api_keys = ["KEY"]
""".replace("KEY", KEY)
        )
    )
    plain = [post(gateway, chat("solo-a")) for _ in range(3)]
    assert [r.status for r in plain] == [200, 200, 429], [(r.status, r.body) for r in plain]
    assert_rate_limited(plain[-1], max_wait=30)
    assert "solo" in plain[-1].error()["message"], plain[-1].error()

    # The pool's first target takes one a minute; the others go to the second (twice the price).
    pooled = [post(gateway, chat("pooled")) for _ in range(3)]
    assert [r.status for r in pooled] == [200, 200, 200], [(r.status, r.body) for r in pooled]
    costs = [float(r.headers["x-lmgate-cost-usd"]) for r in pooled]
    assert costs[0] > 0 and costs[1] == pytest.approx(2 * costs[0]) and costs[2] == pytest.approx(costs[1]), costs


# --------------------------------------------------------------------------------------------
# 2. Requests in flight.


def test_max_concurrent_admits_that_many_held_streams_then_again_when_they_end(serve):
    gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\nmax_concurrent = 2\n'))
    replies = together([lambda: post(gateway, chat(stream=True), headers=HOLD) for _ in range(6)])
    assert statuses(replies) == [200, 200, 429, 429, 429, 429], [(r.status, r.body) for r in replies]
    held = [r for r in replies if r.status == 200]
    for r in held:
        assert r.body.rstrip().endswith("data: [DONE]"), r.body[-200:]
        assert r.end_at - r.head_at >= 1.0, "the stream was not held open"
    first_end = min(r.end_at for r in held)
    for r in replies:
        if r.status == 429:
            assert_rate_limited(r, max_wait=5)
            # Refused while both slots were taken, not after.
            assert r.end_at < first_end

    # Both slots come back once the streams are over (the record is written just after the end).
    deadline = time.monotonic() + 5
    while True:
        again = together([lambda: post(gateway, chat(stream=True), headers={"x-mock-chunks": "2"}) for _ in range(2)])
        if statuses(again) == [200, 200]:
            break
        assert time.monotonic() < deadline, f"slots not given back: {[(r.status, r.body) for r in again]}"
        time.sleep(0.1)
    # And still no more than two at once.
    third = together([lambda: post(gateway, chat(stream=True), headers=HOLD) for _ in range(3)])
    assert statuses(third) == [200, 200, 429], [(r.status, r.body) for r in third]


# --------------------------------------------------------------------------------------------
# 3. Tokens per minute.


def test_tpm_reserves_max_tokens_while_held_and_settles_with_real_usage(serve):
    # tpm 1000: each request reserves about 400 + 10 (prompt bytes / 4); two fit, a third does
    # not. The mock really uses about 20 + 15 tokens: once settled, there is room again.
    gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\ntpm = 1000\n'))
    replies = together([lambda: post(gateway, chat(max_tokens=400, stream=True), headers=HOLD) for _ in range(4)])
    assert statuses(replies) == [200, 200, 429, 429], [(r.status, r.body) for r in replies]
    for r in replies:
        if r.status == 429:
            assert_rate_limited(r, max_wait=60)
            assert r.headers.get("x-ratelimit-limit-tokens") == "1000", r.headers
    # Without settlement 3 x 410 > 1000 + the ~25 tokens refilled meanwhile.
    deadline = time.monotonic() + 5
    while True:
        r = post(gateway, chat(max_tokens=400))
        if r.status == 200:
            break
        assert time.monotonic() < deadline, f"reservations never settled: {r.status} {r.body}"
        time.sleep(0.1)
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    # 2 x ~35 used + this request's ~410 reserved: far more than 1000 - 3 x 410 left.
    assert 400 <= remaining <= 1000 - 410, r.headers


def test_a_reservation_larger_than_tpm_is_a_400_naming_max_tokens(serve):
    gateway = serve(
        config(
            f"""\
[connections.mock]
api_type = "mock"
default_max_tokens = 200

[connections.big]
api_type = "mock"

[routing]
"mock-*" = "mock.*"
"big-*" = "big.*"

[groups.team]
api_keys = ["{KEY}"]
tpm = 1000
"""
        )
    )
    for body in (chat(max_tokens=5000), chat(max_tokens=None, max_completion_tokens=5000)):
        r = post(gateway, body)
        assert r.status == 400, (r.status, r.body)
        assert r.error()["param"] == "max_tokens", r.error()
        assert r.error()["type"] == "invalid_request_error", r.error()
    # Without max_tokens the connection's default is reserved: 200 fits, the default 4096 not.
    assert post(gateway, chat(max_tokens=None)).status == 200
    r = post(gateway, chat("big-a", max_tokens=None))
    assert r.status == 400 and r.error()["param"] == "max_tokens", (r.status, r.body)
    # A reservation that fits is admitted.
    assert post(gateway, chat(max_tokens=500)).status == 200


# --------------------------------------------------------------------------------------------
# 4. The official SDK.


def test_the_sdk_raises_rate_limit_error_without_retries(serve):
    gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\nrpm = 1\n'))
    with sdk(gateway) as client:
        raw = client.chat.completions.with_raw_response.create(model="mock-a", messages=MESSAGES)
        assert raw.headers["x-ratelimit-limit-requests"] == "1"
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        assert raw.parse().choices[0].message.content
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(model="mock-a", messages=MESSAGES)
    assert raised.value.status_code == 429
    assert raised.value.code == "rate_limit_exceeded"
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60


def test_the_sdks_own_retry_waits_the_retry_after_and_then_succeeds(serve):
    # rpm 60: one request a second comes back, so Retry-After is 1 s.
    gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\nrpm = 60\n'))
    for _ in range(3):
        # Empty the bucket: 72 at once, 60 admitted (a few more if a second passes).
        drained = together([lambda: post(gateway, chat()) for _ in range(72)])
        assert 429 in statuses(drained), statuses(drained)
        seen: list[int] = []
        with sdk(gateway, max_retries=1, seen=seen) as client:
            started = time.monotonic()
            completion = client.chat.completions.create(model="mock-a", messages=MESSAGES)
            elapsed = time.monotonic() - started
        assert completion.choices[0].message.content
        if seen == [200]:
            continue  # a second passed between draining and the call: drain again
        assert seen == [429, 200], seen
        # The SDK's own back-off would be at most 0.5 s; Retry-After said 1 s.
        assert 0.9 <= elapsed <= 5, elapsed
        return
    pytest.fail("could not catch the bucket empty in three tries")


# --------------------------------------------------------------------------------------------
# 5. Redis: limits shared by replicas; a dead Redis.


def test_two_gateways_on_one_redis_share_one_rpm(serve, redis_group):
    text = config(MOCK + f'[groups.{redis_group}]\napi_keys = ["{KEY}"]\nrpm = 6\n', limits=redis_limits())
    a = serve(text, name="redis-a", config_name="a.toml")
    b = serve(text, name="redis-b", config_name="b.toml")
    replies = together([lambda g=g: post(g, chat()) for g in [a, b] * 9])
    assert statuses(replies) == [200] * 6 + [429] * 12, [(r.status, r.body) for r in replies]
    for r in replies:
        if r.status == 429:
            assert_rate_limited(r, max_wait=10)
        else:
            assert r.headers["x-ratelimit-limit-requests"] == "6"
    # Both replicas took part and both now refuse.
    assert_rate_limited(post(a, chat()), max_wait=10)
    assert_rate_limited(post(b, chat()), max_wait=10)


def test_two_gateways_on_one_redis_share_max_concurrent(serve, redis_group):
    text = config(MOCK + f'[groups.{redis_group}]\napi_keys = ["{KEY}"]\nmax_concurrent = 2\n', limits=redis_limits())
    a = serve(text, name="redis-a", config_name="a.toml")
    b = serve(text, name="redis-b", config_name="b.toml")
    replies = together([lambda g=g: post(g, chat(stream=True), headers=HOLD) for g in [a, b] * 3])
    assert statuses(replies) == [200, 200, 429, 429, 429, 429], [(r.status, r.body) for r in replies]
    deadline = time.monotonic() + 5
    while True:
        again = [post(a, chat()), post(b, chat())]
        if all(r.status == 200 for r in again):
            break
        assert time.monotonic() < deadline, f"leases not released: {[(r.status, r.body) for r in again]}"
        time.sleep(0.1)


@contextlib.contextmanager
def silent_redis():
    """A port whose connections are accepted (by the kernel) and never answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield s.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dead", ["silent", "closed"])
def test_a_redis_that_does_not_answer_is_a_fast_503_when_denying(serve, dead):
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(silent_redis()) if dead == "silent" else closed_port()
        limits = redis_limits(timeout_ms=100, port=port, extra='on_backend_error = "deny"')
        gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\nrpm = 100\n', limits=limits))
        for _ in range(2):  # the first (connecting) and a later one
            started = time.monotonic()
            r = post(gateway, chat(), timeout=5)
            elapsed = time.monotonic() - started
            assert r.status == 503, (r.status, r.body)
            assert r.error()["code"] == "limits_unavailable", r.error()
            assert r.retry_after() >= 1
            assert elapsed < 1.0, f"503 took {elapsed:.2f} s"


@pytest.mark.parametrize("dead", ["silent", "closed"])
def test_a_redis_that_does_not_answer_is_passed_when_allowing(serve, dead):
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(silent_redis()) if dead == "silent" else closed_port()
        limits = redis_limits(timeout_ms=100, port=port, extra='on_backend_error = "allow"')
        gateway = serve(config(MOCK + f'[groups.team]\napi_keys = ["{KEY}"]\nrpm = 1\n', limits=limits))
        # rpm = 1 is never checked: every request passes.
        for _ in range(3):
            started = time.monotonic()
            r = post(gateway, chat(), timeout=5)
            assert r.status == 200, (r.status, r.body)
            assert r.body["choices"][0]["message"]["content"]
            assert time.monotonic() - started < 1.0


# --------------------------------------------------------------------------------------------
# 6. Budgets.

# $1000 per million tokens: a token costs $0.001. A request reserves (38 prompt bytes / 4 = 10)
# + 100 max_tokens = 110 tokens = $0.110 and really costs about (body bytes / 4 = 20) + 16
# = 36 tokens = $0.036. With $0.20: three requests fit (0.072 + 0.110 <= 0.2), the fourth not.
PRICE_PER_TOKEN = 0.001
BUDGET_PRICES = '[prices]\n"mock-*" = { input = 1000.0, output = 1000.0 }\n'
BUDGET_USD = 0.2
BUDGET_MAX_TOKENS = 100
RESERVED = (math.ceil(len(json.dumps(MESSAGES)) / 4) + BUDGET_MAX_TOKENS) * PRICE_PER_TOKEN


def spend_until_refused(gateway: LmgateProcess, pause: float = 0.0) -> float:
    """Sends one request after another until the budget refuses; returns the spend (from each
    response's `x-lmgate-cost-usd`), checking each admission against the reservation rule.
    `pause` between requests: the Redis backend settles in the background, so a request sent
    the instant the previous one ended may still see that one's whole reservation."""
    spent = 0.0
    for i in range(10):
        if i and pause:
            time.sleep(pause)
        r = post(gateway, chat(max_tokens=BUDGET_MAX_TOKENS))
        if r.status != 200:
            assert_out_of_budget(r)
            assert spent + RESERVED > BUDGET_USD - 1e-9, f"refused at ${spent:.4f} spent: {r.body}"
            assert spent >= 2 * 0.03, f"refused after too little spend: ${spent}"
            return spent
        assert spent + RESERVED <= BUDGET_USD + 0.01, f"admitted at ${spent:.4f} spent"
        cost = float(r.headers["x-lmgate-cost-usd"])
        assert 0 < cost < RESERVED, r.headers
        spent += cost
    pytest.fail(f"the budget of ${BUDGET_USD} never refused (spent ${spent:.4f})")


def test_budget_refuses_when_spent_and_the_spend_survives_a_restart_memory(serve, tmp_path):
    state = tmp_path / "limits-state.json"
    text = config(
        MOCK + BUDGET_PRICES + f'[groups.team]\napi_keys = ["{KEY}"]\nbudget_usd = {BUDGET_USD}\nbudget_period = "total"\n',
        limits=f'backend = "memory"\nstate_file = "{state}"\n',
    )
    first = serve(text, name="budget-before")
    spent = spend_until_refused(first)

    # The SDK does not retry a spent budget (x-should-retry: false), even when allowed to.
    seen: list[int] = []
    with sdk(first, max_retries=2, seen=seen) as client:
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(model="mock-a", messages=MESSAGES, max_tokens=BUDGET_MAX_TOKENS)
    assert raised.value.code == "insufficient_quota"
    assert seen == [429], seen

    first.stop()  # SIGTERM
    assert first.proc.returncode == 0, first.log_tail()
    saved = json.loads(state.read_text())
    assert saved["spend"]["g:team"]["spent_usd"] == pytest.approx(spent, abs=1e-6), saved

    second = serve(text, name="budget-after")
    assert_out_of_budget(post(second, chat(max_tokens=BUDGET_MAX_TOKENS)))


def test_memory_spend_is_saved_at_shutdown_without_waiting_for_the_periodic_write(serve, tmp_path):
    state = tmp_path / "limits-state.json"
    text = config(
        MOCK + BUDGET_PRICES + f'[groups.team]\napi_keys = ["{KEY}"]\nbudget_usd = {BUDGET_USD}\nbudget_period = "total"\n',
        limits=f'backend = "memory"\nstate_file = "{state}"\n',
    )
    gateway = serve(text, name="budget-shutdown")
    r = post(gateway, chat(max_tokens=BUDGET_MAX_TOKENS))
    assert r.status == 200, r.body
    # A short pause first: a SIGTERM within milliseconds of the `listening on` line can come
    # before the gateway has its signal handler (it then dies of it, or the signal is lost).
    time.sleep(0.3)
    # The periodic write comes at most a second after the change: normally not yet.
    written_before = state.exists()
    gateway.stop()
    assert gateway.proc.returncode == 0, gateway.log_tail()
    assert state.exists(), "no state file after SIGTERM"
    saved = json.loads(state.read_text())
    assert saved["spend"]["g:team"]["spent_usd"] == pytest.approx(float(r.headers["x-lmgate-cost-usd"]), abs=1e-6)
    if written_before:
        print("note: the periodic write came before SIGTERM; the shutdown write was not isolated")


def test_budget_refuses_when_spent_and_the_spend_survives_a_restart_redis(serve, redis_group):
    text = config(
        MOCK
        + BUDGET_PRICES
        + f'[groups.{redis_group}]\napi_keys = ["{KEY}"]\nbudget_usd = {BUDGET_USD}\nbudget_period = "month"\n',
        limits=redis_limits(),
    )
    first = serve(text, name="redis-budget-before")
    spend_until_refused(first, pause=0.2)
    refused = post(first, chat(max_tokens=BUDGET_MAX_TOKENS))
    assert_out_of_budget(refused)
    # A monthly budget comes back at the start of next month.
    assert 1 <= refused.retry_after() <= 31 * 86_400, refused.headers
    first.stop()
    assert first.proc.returncode == 0, first.log_tail()

    second = serve(text, name="redis-budget-after")
    assert_out_of_budget(post(second, chat(max_tokens=BUDGET_MAX_TOKENS)))


def test_a_reservation_larger_than_the_budget_is_a_400_naming_max_tokens(serve):
    gateway = serve(
        config(MOCK + BUDGET_PRICES + f'[groups.team]\napi_keys = ["{KEY}"]\nbudget_usd = {BUDGET_USD}\n')
    )
    r = post(gateway, chat(max_tokens=1000))  # $1.01 reserved > $0.20
    assert r.status == 400, (r.status, r.body)
    assert r.error()["param"] == "max_tokens", r.error()
    assert post(gateway, chat(max_tokens=BUDGET_MAX_TOKENS)).status == 200


def test_a_group_with_a_budget_cannot_use_an_unpriced_model(serve):
    gateway = serve(
        config(
            MOCK
            + '[prices]\n"mock-priced*" = { input = 1.0, output = 2.0 }\n'
            + f'[groups.team]\napi_keys = ["{KEY}"]\nbudget_usd = 10.0\n'
            + f'[groups.free]\napi_keys = ["{KEY2}"]\n'
        )
    )
    r = post(gateway, chat("mock-unpriced"))
    assert r.status == 403, (r.status, r.body)
    assert r.error()["code"] == "model_not_priced", r.error()
    assert r.error()["type"] == "permission_error", r.error()
    assert "mock-unpriced" in r.error()["message"]
    # Priced: fine; and a group without a budget may use the unpriced model.
    assert post(gateway, chat("mock-priced-1")).status == 200
    assert post(gateway, chat("mock-unpriced"), key=KEY2).status == 200
