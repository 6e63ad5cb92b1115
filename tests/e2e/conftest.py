"""Fixtures for the end-to-end tests: a real `lmgate serve` in front of a real `lmgate mock`.

The binary comes from the `LMGATE_BIN` environment variable (tests/run.sh sets it). Both
processes listen on `127.0.0.1:0` and announce their port with one stdout line,
`listening on 127.0.0.1:PORT`. Their stderr goes to a log file whose tail is attached to the
report of every failing test.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import openai
import pytest

TEST_KEY = "sk-test-key"
LIMITED_KEY = "sk-limited"
UPSTREAM_KEY = "sk-upstream-secret"

STARTUP_TIMEOUT_SECS = 30
STOP_TIMEOUT_SECS = 10
CLIENT_TIMEOUT_SECS = 20
LOG_TAIL_CHARS = 8000

LISTENING_LINE = re.compile(r"^listening on (127\.0\.0\.1:\d+)$")

GATEWAY_CONFIG = """\
[server]
listen = "127.0.0.1:0"
shutdown_grace_secs = 2

[connections.mock]
api_type = "mock"

[connections.up]
api_type = "openai"
api_base = "http://{upstream_addr}/v1"
api_key = "{upstream_key}"
forward_headers = ["x-mock-*"]  # the tests steer the upstream mock through the gateway

[routing]
"mock-*" = "mock.*"
"up-*" = "up.*"
"renamed" = "up.real-model"

[groups.team]
api_keys = ["{test_key}"]
allowed_connections = "*"

[groups.limited]
api_keys = ["{limited_key}"]
allowed_connections = ["mock"]
"""

# Every process started by a fixture, so that failing tests can show their logs.
_running: list[LmgateProcess] = []


def lmgate_bin() -> str:
    path = os.environ.get("LMGATE_BIN")
    if not path:
        pytest.fail("LMGATE_BIN is not set; run the suite with `bash tests/run.sh`", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"LMGATE_BIN={path} is not an executable file", pytrace=False)
    return path


class LmgateProcess:
    """One `lmgate` subprocess, started and waited on until it announces its address."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.stderr.log"
        self._log = open(self.log_path, "wb")
        self._extra_stdout: list[str] = []
        self.proc = subprocess.Popen(
            [lmgate_bin(), *args],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,  # None: this process's environment
        )
        try:
            self.addr = self._await_listening_line()
        except Exception:
            self.stop()
            raise

    @property
    def root_url(self) -> str:
        return f"http://{self.addr}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def _await_listening_line(self) -> str:
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump_stdout, args=(lines,), daemon=True).start()
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT_SECS)
        except queue.Empty:
            raise RuntimeError(self._startup_failure(f"no stdout line in {STARTUP_TIMEOUT_SECS}s")) from None
        if line is None:
            raise RuntimeError(self._startup_failure(f"exited with {self.proc.wait(STOP_TIMEOUT_SECS)}"))
        match = LISTENING_LINE.match(line.rstrip("\n"))
        if not match:
            raise RuntimeError(self._startup_failure(f"unexpected first stdout line {line!r}"))
        return match.group(1)

    def _pump_stdout(self, lines: queue.Queue[str | None]) -> None:
        """Hands the first stdout line over, keeps later ones for the log and drains the pipe."""
        assert self.proc.stdout is not None
        first = True
        for line in self.proc.stdout:
            if first:
                lines.put(line)
                first = False
            else:
                self._extra_stdout.append(line)
        if first:
            lines.put(None)

    def _startup_failure(self, what: str) -> str:
        return f"{self.name} did not start: {what}\n{self.log_tail()}"

    def log_tail(self) -> str:
        if not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        extra = "".join(self._extra_stdout)
        return f"--- stderr ({self.log_path}) ---\n{text}" + (f"\n--- later stdout ---\n{extra}" if extra else "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_SECS)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_SECS)
        self._log.close()


def start_process(name: str, args: list[str], workdir: Path, env: dict[str, str] | None = None):
    process = LmgateProcess(name, args, workdir, env)
    _running.append(process)
    try:
        yield process
    finally:
        _running.remove(process)
        process.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.failed:
        for process in _running:
            report.sections.append((f"{process.name} log", process.log_tail()))
    return report


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    """The standalone OpenAI-compatible mock that the `up` connection points at."""
    yield from start_process("lmgate-mock", ["mock", "--listen", "127.0.0.1:0"], tmp_path_factory.mktemp("mock"))


@pytest.fixture(scope="session")
def gateway(upstream: LmgateProcess, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("gateway")
    config = workdir / "lmgate.toml"
    config.write_text(
        GATEWAY_CONFIG.format(
            upstream_addr=upstream.addr,
            upstream_key=UPSTREAM_KEY,
            test_key=TEST_KEY,
            limited_key=LIMITED_KEY,
        )
    )
    yield from start_process("lmgate-serve", ["serve", "--config", str(config), "--env", ""], workdir)


def sdk_client(base_url: str, api_key: str) -> openai.OpenAI:
    """The official SDK client as a user would make it, bounded in time and never retrying."""
    return openai.OpenAI(
        base_url=base_url,
        api_key=api_key,
        timeout=CLIENT_TIMEOUT_SECS,
        max_retries=0,
        # Ignore proxy variables of the environment: the gateway is on loopback.
        http_client=openai.DefaultHttpxClient(timeout=CLIENT_TIMEOUT_SECS, trust_env=False),
    )


@pytest.fixture(scope="session")
def make_client(gateway: LmgateProcess):
    """Returns an `openai.OpenAI` factory for the gateway: one virtual key per client."""
    clients: list[openai.OpenAI] = []

    def make(api_key: str = TEST_KEY) -> openai.OpenAI:
        client = sdk_client(gateway.base_url, api_key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def client(make_client: Callable[..., openai.OpenAI]) -> openai.OpenAI:
    return make_client(TEST_KEY)


RawPost = Callable[..., tuple[int, Any]]


@pytest.fixture(scope="session")
def raw_post(gateway: LmgateProcess) -> RawPost:
    """POSTs JSON to a path of the gateway with urllib; returns (status, decoded JSON body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(path: str, body: dict[str, Any], api_key: str = TEST_KEY) -> tuple[int, Any]:
        request = urllib.request.Request(
            gateway.root_url + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with opener.open(request, timeout=CLIENT_TIMEOUT_SECS) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.load(error)

    return post
