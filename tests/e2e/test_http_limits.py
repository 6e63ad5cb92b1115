"""HTTP-level limits as a plain client meets them: an oversized body gets a readable 413."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import CLIENT_TIMEOUT_SECS, LmgateProcess, start_process

LIMIT = 1 << 20

CONFIG = f"""\
[server]
listen = "127.0.0.1:0"
max_request_bytes = {LIMIT}

[connections.mock]
api_type = "mock"

[routing]
"*" = "mock.*"
"""


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("limits")
    config = workdir / "lmgate.toml"
    config.write_text(CONFIG)
    yield from start_process("lmgate-serve-limits", ["serve", "--config", str(config), "--env", ""], workdir)


@pytest.mark.parametrize("size", [2_000_000, 16_000_000])
def test_urllib_posting_a_body_over_the_limit_reads_the_413(small_gateway: LmgateProcess, size: int):
    # urllib writes the whole body before it reads the answer: the gateway must read (and drop)
    # the rest, or the client gets "broken pipe" / "connection reset" instead of the 413.
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * size}]}).encode()
    request = urllib.request.Request(
        small_gateway.base_url + "/chat/completions",
        data=body,
        headers={"content-type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_SECS)
    assert raised.value.code == 413
    error = json.loads(raised.value.read())["error"]
    assert error["code"] == "request_too_large"
