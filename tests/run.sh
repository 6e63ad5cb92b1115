#!/usr/bin/env bash
# The whole test suite of lmgate: Rust unit and integration tests, then the end-to-end tests
# that drive the built binary with the official OpenAI Python SDK.
#
#   bash tests/run.sh            extra arguments are passed to pytest, e.g. -k stream -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

# The limit tests share counters through Redis: make sure one answers on 127.0.0.1:6379
# (started here if none does, installed first if missing). Outside CI a test that finds none
# skips loudly; under CI (CI set) it fails.
redis_answers() { (exec 3<>/dev/tcp/127.0.0.1/6379 && printf 'PING\r\n' >&3 && head -c 5 <&3 | grep -q PONG) 2>/dev/null; }
step "redis on 127.0.0.1:6379"
if ! redis_answers; then
    if ! command -v redis-server >/dev/null; then
        sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
        $sudo apt-get install -y -qq redis-server >/dev/null || { apt-get update -qq && $sudo apt-get install -y -qq redis-server >/dev/null; }
    fi
    redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --daemonize yes >/dev/null
    for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
fi
if redis_answers; then echo "redis answers"; else echo "warning: no redis on 127.0.0.1:6379; the Redis tests will skip (or fail under CI)" >&2; fi

step "cargo build"
cargo build --quiet --bin lmgate

step "cargo test --all-targets"
cargo test --quiet --all-targets

venv=target/e2e-venv
step "python test environment ($venv)"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt

step "end-to-end tests (pytest)"
export LMGATE_BIN="$PWD/target/debug/lmgate"
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/e2e "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "error: pytest collected no end-to-end tests" >&2
fi
exit "$status"
