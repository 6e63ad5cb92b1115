#!/usr/bin/env bash
# Instructions per request: lmgate and nginx (the yardstick of benches/bar.sh) run under
# `valgrind --tool=callgrind`, in front of the same `lmgate mock`, and are counted over the same
# requests. Instruction counts do not depend on what else the machine is doing, so unlike
# latency they compare well on a shared, noisy box, and a change to the request path shows as a
# repeatable number. Counters are zeroed after a warm-up, so start-up and the first connections
# are not counted.
#
#   bash benches/callgrind.sh            # N=2000 requests of each kind, about 2 minutes
#
# Prints, per proxy and request kind, instructions per request (user space: the proxy's own code
# and its libraries; the kernel is not counted), and leaves the profiles in $OUT for
# `callgrind_annotate $OUT/lmgate-chat.cg`. Needs valgrind and nginx (installed from Debian's
# packages with apt-get when missing). Traffic stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/callgrind}
N=${N:-2000}
WARM=${WARM:-200}
MOCK_PORT=${MOCK_PORT:-4011}
LMGATE_PORT=${LMGATE_PORT:-4101}
NGINX_PORT=${NGINX_PORT:-4301}

# shellcheck source=benches/yardstick.sh
source benches/yardstick.sh
install_missing valgrind nginx

"$BIN" mock --listen "127.0.0.1:$MOCK_PORT" >"$OUT/mock.log" 2>&1 &
pids+=($!)

RUST_LOG=warn valgrind -q --tool=callgrind --callgrind-out-file="$OUT/lmgate.%p" \
    "$BIN" serve --config "$OUT/lmgate.toml" --env "" >"$OUT/lmgate.log" 2>&1 &
pids+=($!)

# The same nginx as benches/bar.sh, in one process (no master) so callgrind sees the worker.
nginx_conf "master_process off;"
valgrind -q --tool=callgrind --callgrind-out-file="$OUT/nginx.%p" \
    nginx "${NGINX_ARGS[@]}" &
pids+=($!)

wait_port "$MOCK_PORT"
wait_port "$LMGATE_PORT"
wait_port "$NGINX_PORT"

# count PROXY PORT KIND ARGS...: warm up, zero the counters, send N requests, dump; prints the
# instructions per request.
count() {
    local proxy=$1 port=$2 kind=$3
    shift 3
    local url=http://127.0.0.1:$port/v1 pid
    pid=$(pgrep -f "valgrind.*--callgrind-out-file=$OUT/$proxy" | head -n 1)
    "$BIN" bench --url "$url" --requests "$WARM" --warmup 0 "$@" >/dev/null 2>&1
    callgrind_control -z "$pid" >/dev/null
    "$BIN" bench --url "$url" --requests "$N" --warmup 0 "$@" >"$OUT/$proxy-$kind.bench" 2>&1
    rm -f "$OUT/$proxy.$pid".*
    callgrind_control -d "$kind" "$pid" >/dev/null
    local file
    file=$(ls -t "$OUT/$proxy.$pid".* | head -n 1)
    mv "$file" "$OUT/$proxy-$kind.cg"
    local total
    total=$(awk '/^totals:/ { print $2 }' "$OUT/$proxy-$kind.cg")
    grep -q "($N ok)" "$OUT/$proxy-$kind.bench" || { echo "$proxy $kind: requests failed" >&2; exit 1; }
    printf '%-8s %-14s %12d instructions per request\n' "$proxy" "$kind" $((total / N))
}

echo
echo "==> instructions per request, $N requests each after $WARM of warm-up, concurrency 1"
for proxy in lmgate nginx; do
    port=$([ $proxy = lmgate ] && echo "$LMGATE_PORT" || echo "$NGINX_PORT")
    count $proxy "$port" chat --concurrency 1
    count $proxy "$port" chat-stream16 --kind chat-stream --chunks 16 --concurrency 1
    count $proxy "$port" embed-64x256 --kind embeddings --inputs 64 --dims 256 --concurrency 1
done
