#!/usr/bin/env bash
# The whole test suite of lmgate: Rust unit and integration tests, then the end-to-end tests
# that drive the built binary with the official OpenAI Python SDK.
#
#   bash tests/run.sh            extra arguments are passed to pytest, e.g. -k stream -x
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

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
