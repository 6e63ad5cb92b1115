"""TLS and hot reload as an operator meets them, on the real binary: the official `openai` SDK
over https with a private CA (certificates made with the `openssl` command), `SIGHUP` reloading a
changed file without a restart, a bad file leaving the running config alone, and `--watch`.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import openai
import pytest

from conftest import CLIENT_TIMEOUT_SECS, LmgateProcess, start_process

RELOAD_WAIT_SECS = 10
MESSAGES = [{"role": "user", "content": "hello"}]


def routes(*names: str) -> str:
    lines = "".join(f'"{n}" = "mock.*"\n' for n in names)
    return f'[connections.mock]\napi_type = "mock"\n\n[routing]\n{lines}'


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for localhost and 127.0.0.1: (ca, cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    run = lambda *args: subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=lmgate e2e CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", *ec, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf")
    return directory / "ca.pem", directory / "cert.pem", directory / "key.pem"


def https_client(addr: str, ca: Path) -> openai.OpenAI:
    port = addr.rsplit(":", 1)[1]
    return openai.OpenAI(
        base_url=f"https://localhost:{port}/v1",
        api_key="unused",
        timeout=CLIENT_TIMEOUT_SECS,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(
            verify=ssl.create_default_context(cafile=str(ca)), timeout=CLIENT_TIMEOUT_SECS, trust_env=False
        ),
    )


def answers(client: openai.OpenAI, model: str) -> bool:
    try:
        client.chat.completions.create(model=model, messages=MESSAGES)
        return True
    except openai.NotFoundError:
        return False


def eventually(what: str, check) -> None:
    deadline = time.monotonic() + RELOAD_WAIT_SECS
    while not check():
        assert time.monotonic() < deadline, f"not within {RELOAD_WAIT_SECS}s: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_pki(workdir)
    config = workdir / "lmgate.toml"
    server = f'[server]\nlisten = "127.0.0.1:0"\ntls_cert = "{cert}"\ntls_key = "{key}"\n\n'
    config.write_text(server + routes("first"))
    for process in start_process("lmgate-serve-tls", ["serve", "--config", str(config), "--env", ""], workdir):
        yield process, config, server, ca


def test_the_sdk_over_https_and_a_sighup_reload_with_a_bad_file_in_between(tls_gateway):
    process, config, server, ca = tls_gateway
    client = https_client(process.addr, ca)
    try:
        completion = client.chat.completions.create(model="first", messages=MESSAGES)
        assert completion.choices[0].message.content
        chunks = list(client.chat.completions.create(model="first", messages=MESSAGES, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion.choices[0].message.content

        config.write_text(server + routes("second"))
        os.kill(process.proc.pid, signal.SIGHUP)
        eventually("the new route answers after SIGHUP", lambda: answers(client, "second"))
        assert not answers(client, "first"), "the removed route is gone"
        assert process.proc.poll() is None, "SIGHUP must not end the process"

        config.write_text(server + routes("third") + '"broken" = "nowhere.*"\n')
        os.kill(process.proc.pid, signal.SIGHUP)
        eventually("the failed reload is logged", lambda: "configuration reload failed" in process.log_path.read_text())
        assert answers(client, "second") and not answers(client, "third"), "a bad file changes nothing"
        assert "no connection named `nowhere`" in process.log_path.read_text()
    finally:
        client.close()


def test_watch_reloads_when_the_file_changes(tmp_path: Path):
    config = tmp_path / "lmgate.toml"
    server = '[server]\nlisten = "127.0.0.1:0"\n\n'
    config.write_text(server + routes("before"))
    for process in start_process("lmgate-serve-watch", ["serve", "--config", str(config), "--env", "", "--watch"], tmp_path):
        client = openai.OpenAI(base_url=process.base_url, api_key="unused", max_retries=0,
                               http_client=openai.DefaultHttpxClient(timeout=CLIENT_TIMEOUT_SECS, trust_env=False))
        try:
            assert answers(client, "before")
            config.write_text(server + routes("before", "after"))
            eventually("the new route answers after the file changed", lambda: answers(client, "after"))
        finally:
            client.close()
