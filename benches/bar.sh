#!/usr/bin/env bash
# The performance bar: lmgate against nginx (the yardstick: a bare, well-tuned proxy hop) in front
# of the same `lmgate mock`, measured by `lmgate bench` with interleaved rounds. Prints each
# comparison table, then one summary with a verdict per bar (PASS; EVEN: worse than nginx by less
# than the A/A noise; MISS); the JSON of every run is kept in $OUT. Needs: a Rust toolchain,
# taskset, python3 (for the summary), and nginx (installed from Debian's packages with apt-get
# when missing). Traffic stays on 127.0.0.1.
#
#   bash benches/bar.sh                 # about 12 minutes
#   DUR=2 ROUNDS=5 bash benches/bar.sh  # quicker, noisier
#   LIMITS=1 bash benches/bar.sh        # lmgate with a key and group limits on every request
#
# Cores: the proxy under test (lmgate or nginx, one worker) runs on core $PROXY_CORE; the bench
# client and the mock share core $CLIENT_CORE. Both proxies stay up all the time and only one is
# under load at any moment. lmgate runs with RUST_LOG=warn (no per-request log line) and nginx
# with access_log off, so neither pays for request logging.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-target/bar}
DUR=${DUR:-3}
WARMUP=${WARMUP:-1}
ROUNDS=${ROUNDS:-5}
PROXY_CORE=${PROXY_CORE:-0}
CLIENT_CORE=${CLIENT_CORE:-1}
PARTS=${PARTS:-classic many} # classic: c=1, rate, streams, max, embeddings; many: S6 and S7
MANY_DUR=${MANY_DUR:-10}
MANY_ROUNDS=${MANY_ROUNDS:-3}
MOCK_PORT=${MOCK_PORT:-4010}
LMGATE_PORT=${LMGATE_PORT:-4100}
NGINX_PORT=${NGINX_PORT:-4300}

DIRECT=http://127.0.0.1:$MOCK_PORT/v1
LMGATE=http://127.0.0.1:$LMGATE_PORT/v1
NGINX=http://127.0.0.1:$NGINX_PORT/v1

# shellcheck source=benches/yardstick.sh
source benches/yardstick.sh
install_missing nginx

taskset -c "$CLIENT_CORE" "$BIN" mock --listen "127.0.0.1:$MOCK_PORT" >"$OUT/mock.log" 2>&1 &
MOCK_PID=$!
pids+=($MOCK_PID)

RUST_LOG=warn taskset -c "$PROXY_CORE" "$BIN" serve --config "$OUT/lmgate.toml" --env "" >"$OUT/lmgate.log" 2>&1 &
LMGATE_PID=$!
pids+=($LMGATE_PID)

nginx_conf ""
taskset -c "$PROXY_CORE" nginx "${NGINX_ARGS[@]}" &
pids+=($!)

wait_port "$MOCK_PORT"
wait_port "$LMGATE_PORT"
wait_port "$NGINX_PORT"

rss() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; } # kB

# bench NAME URL COMPARE_URL ARGS...: one interleaved comparison, table to stdout, JSON kept.
bench() {
    local name=$1 url=$2 direct=$3
    shift 3
    echo
    echo "==> $name: $url vs $direct: $*"
    taskset -c "$CLIENT_CORE" "$BIN" bench --url "$url" --compare "$direct" --rounds "$ROUNDS" \
        --warmup "$WARMUP" --save "$OUT/$name.json" ${KEY_ARGS[@]+"${KEY_ARGS[@]}"} "$@"
}

rss "$LMGATE_PID" VmRSS >"$OUT/rss-start.kb"
# Each shape three times: each proxy against the mock directly (what the hop adds), then lmgate
# head to head with nginx in interleaved rounds: the verdicts come from that run, because the two
# proxies are measured within seconds of each other and drift on a shared machine cancels.
shapes=(
    "c1|--concurrency 1 --duration $DUR"
    "rate2000|--rate 2000 --duration $DUR"
    "stream1000|--kind chat-stream --chunks 1000 --concurrency 1 --duration $DUR"
    # Unpaced chunks leave the mock in one burst and arrive coalesced (gaps of 0); paced ones
    # (1 ms apart) arrive one by one, so their gaps show what each hop adds per chunk.
    "streampaced|--kind chat-stream --chunks 100 -H x-mock-delay-us:1000 --concurrency 8 --duration $DUR"
)
[[ $PARTS == *classic* ]] || shapes=()
for shape in "${shapes[@]}"; do
    name=${shape%%|*}
    read -r -a args <<<"${shape#*|}"
    bench "$name-lmgate" "$LMGATE" "$DIRECT" "${args[@]}"
    bench "$name-nginx" "$NGINX" "$DIRECT" "${args[@]}"
    bench "$name-lmgate-vs-nginx" "$LMGATE" "$NGINX" "${args[@]}"
done
if [[ $PARTS == *classic* ]]; then
echo 5 >"/proc/$LMGATE_PID/clear_refs"
bench "max-lmgate-vs-nginx" "$LMGATE" "$NGINX" --concurrency 64 --duration "$DUR"
rss "$LMGATE_PID" VmHWM >"$OUT/rss-peak-max.kb"
fi

# Embeddings: lmgate head to head with nginx; lmgate's peak RSS over the run against its RSS
# before (clear_refs 5 resets the peak).
for format in $([[ $PARTS == *classic* ]] && echo float base64); do
    flag=$([ $format = base64 ] && echo --base64 || true)
    sleep 1
    rss "$LMGATE_PID" VmRSS >"$OUT/rss-before-$format.kb"
    echo 5 >"/proc/$LMGATE_PID/clear_refs"
    bench "embed-$format-lmgate-vs-nginx" "$LMGATE" "$NGINX" --kind embeddings --inputs 2048 --dims 1536 \
        $flag --concurrency 1 --requests 10
    rss "$LMGATE_PID" VmHWM >"$OUT/rss-peak-$format.kb"
done

sleep 3
rss "$LMGATE_PID" VmRSS >"$OUT/rss-idle.kb"

# S6 and S7, many streams at once: each proxy alone, since the proxy's CPU time is read from /proc
# around each run; rounds alternate lmgate and nginx. S6: 256 concurrent streams of 100 chunks
# 1 ms apart; S7: 16 concurrent streams of 100 chunks with no delay. Per run: streams/s, stream
# time, and the CPU time (utime + stime) of the proxy's processes per SSE event the client got
# (100 content chunks + role + finish + [DONE] = 103 per stream). The mock's CPU share is kept to
# show it is not the bottleneck.
ticks() { # ticks PID...: utime + stime, in clock ticks, summed
    local sum=0 pid f
    for pid in "$@"; do
        read -r -a f <"/proc/$pid/stat"
        sum=$((sum + f[13] + f[14]))
    done
    echo "$sum"
}
many() { # many SCENARIO PROXY URL ROUND ARGS...
    local scenario=$1 proxy=$2 url=$3 round=$4 pids t0 m0 s0
    shift 4
    if [[ $proxy == nginx ]]; then read -r -a pids <<<"$(pgrep -f 'nginx: worker' | tr '\n' ' ')"; else pids=("$LMGATE_PID"); fi
    t0=$(ticks "${pids[@]}") m0=$(ticks "$MOCK_PID") s0=$(date +%s.%N)
    taskset -c "$CLIENT_CORE" "$BIN" bench --url "$url" --kind chat-stream --chunks 100 --duration "$MANY_DUR" \
        --warmup 0.5 --save "$OUT/$scenario-$proxy-$round.json" ${KEY_ARGS[@]+"${KEY_ARGS[@]}"} "$@" \
        >"$OUT/$scenario-$proxy-$round.txt"
    echo "$(($(ticks "${pids[@]}") - t0)) $(($(ticks "$MOCK_PID") - m0)) $s0 $(date +%s.%N)" \
        >"$OUT/$scenario-$proxy-$round.cpu"
}
for round in $([[ $PARTS == *many* ]] && seq "$MANY_ROUNDS"); do
    for proxy in lmgate nginx; do
        url=$LMGATE && [[ $proxy == nginx ]] && url=$NGINX
        echo "==> S6 $proxy round $round: 256 streams, 100 chunks 1 ms apart, ${MANY_DUR}s"
        many s6 "$proxy" "$url" "$round" --concurrency 256 -H x-mock-delay-us:1000
        echo "==> S7 $proxy round $round: 16 streams, 100 chunks back to back, ${MANY_DUR}s"
        many s7 "$proxy" "$url" "$round" --concurrency 16
    done
done

if [[ $PARTS == *many* ]]; then
    sleep 3
    rss "$LMGATE_PID" VmRSS >"$OUT/rss-after-many.kb"
fi

echo
echo "==> machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'),"\
    "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r),"\
    "$(systemd-detect-virt 2>/dev/null || echo 'virtualisation unknown')"
echo "==> cores: proxy under test on core $PROXY_CORE; bench client and mock on core $CLIENT_CORE"
echo "==> lmgate $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nginx -v 2>&1)"
python3 - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name): return json.loads((out / f"{name}.json").read_text())
def kb(name): return int((out / f"{name}.kb").read_text())
def row(c, measure, pct):
    return next(a for a in c[measure] if a["percentile"] == pct)
def errors(c):
    return sum(s["transport_errors"] + s["missed"] + sum(s["errors_by_status"].values()) for s in c["gateway"])
rows = []
def bar(what, verdict, detail): rows.append((what, verdict, detail))
def ms(us): return f"{us/1000:+.3f} ms"
def vs_nginx(name, measure, pct, label):
    # Added over direct, per proxy, for the record; the verdict is lmgate - nginx, head to head.
    l = row(load(f"{name}-lmgate"), measure, pct)["added_us"]["median"]
    n = row(load(f"{name}-nginx"), measure, pct)["added_us"]["median"]
    h = row(load(f"{name}-lmgate-vs-nginx"), measure, pct)
    d, noise = h["added_us"]["median"], max(abs(h["noise_us"]["min"]), abs(h["noise_us"]["max"]))
    verdict = "PASS" if d <= 0 else "EVEN" if d <= noise else "MISS"
    bar(label, verdict, f"lmgate - nginx {ms(d)} (A/A noise ±{noise/1000:.3f}); added over direct: lmgate {ms(l)}, nginx {ms(n)}")
med = lambda xs: sorted(xs)[len(xs) // 2]
def classic():
    vs_nginx("c1", "latency", "p50", "c=1 chat: added p50 <= nginx")
    vs_nginx("c1", "latency", "p99", "c=1 chat: added p99 <= nginx")
    vs_nginx("rate2000", "latency", "p99", "2000 req/s: added p99 <= nginx")
    e = errors(load("rate2000-lmgate")) + errors(load("rate2000-lmgate-vs-nginx"))
    bar("2000 req/s: zero errors through lmgate", "PASS" if e == 0 else "MISS", f"{e} errors or missed sends")
    vs_nginx("stream1000", "ttft", "p50", "1000-chunk stream: added TTFT p50 <= nginx")
    vs_nginx("stream1000", "gap", "p99", "1000-chunk stream: added p99 gap <= nginx")
    vs_nginx("streampaced", "gap", "p99", "paced stream (1 ms chunks): added p99 gap <= nginx")
    m = load("max-lmgate-vs-nginx")
    r = m["throughput_ratio"]
    rps = f"lmgate {med([s['ok_per_s'] for s in m['gateway']]):.0f} req/s, nginx {med([s['ok_per_s'] for s in m['direct']]):.0f} req/s"
    bar("max throughput: lmgate >= 0.9x nginx", "PASS" if r["median"] >= 0.9 else "MISS", f"lmgate/nginx {r['median']:.3f} (rounds {r['min']:.3f}..{r['max']:.3f}); {rps}")
    for fmt in ("float", "base64"):
        c = load(f"embed-{fmt}-lmgate-vs-nginx")
        h = row(c, "latency", "p50")
        d, noise = h["added_us"]["median"], max(abs(h["noise_us"]["min"]), abs(h["noise_us"]["max"]))
        growth = (kb(f"rss-peak-{fmt}") - kb(f"rss-before-{fmt}")) / 1024
        mb = c["gateway"][0]["bytes"] / max(c["gateway"][0]["requests"], 1) / 1e6
        lat = c["gateway"][0]["latency_us"]["p50"] / 1000
        bar(f"embeddings {fmt} ({mb:.1f} MB): RSS growth < 16 MB", "PASS" if growth < 16 else "MISS", f"{growth:.1f} MB")
        bar(f"embeddings {fmt}: wall time <= nginx", "PASS" if d <= 0 else "EVEN" if d <= noise else "MISS",
            f"lmgate - nginx p50 {ms(d)} (lmgate {lat:.1f} ms; A/A noise ±{noise/1000:.3f})")
    bar("RSS under load (64 connections, for the record)", "INFO", f"peak {kb('rss-peak-max')/1024:.1f} MB")
HZ, EVENTS = 100, 103  # clock ticks per second (getconf CLK_TCK); SSE events per 100-chunk stream
def many(scenario, proxy):
    runs = []
    for f in sorted(out.glob(f"{scenario}-{proxy}-*.json")):
        s = json.loads(f.read_text())
        proxy_ticks, mock_ticks, start, end = f.with_suffix(".cpu").read_text().split()
        wall = float(end) - float(start)
        runs.append({"rate": s["ok_per_s"], "p50": s["latency_us"]["p50"], "p99": s["latency_us"]["p99"],
                     "cpu_us": int(proxy_ticks) * 1e6 / HZ / max(s["ok"] * EVENTS, 1),
                     "proxy_busy": int(proxy_ticks) / HZ / wall, "mock_busy": int(mock_ticks) / HZ / wall})
    return {k: med([r[k] for r in runs]) for k in runs[0]}
def streams():
    busy = lambda r: f"proxy core {r['proxy_busy']*100:.0f}% busy, mock {r['mock_busy']*100:.0f}%"
    l6, n6 = many("s6", "lmgate"), many("s6", "nginx")
    bar("S6 256 paced streams: CPU per event <= nginx", "PASS" if l6["cpu_us"] <= n6["cpu_us"] else "MISS",
        f"lmgate {l6['cpu_us']:.2f} us ({busy(l6)}), nginx {n6['cpu_us']:.2f} us ({busy(n6)})")
    bar("S6 256 paced streams: p99 stream time <= nginx + 5%", "PASS" if l6["p99"] <= n6["p99"] * 1.05 else "MISS",
        f"p50/p99 lmgate {l6['p50']/1000:.1f}/{l6['p99']/1000:.1f} ms, nginx {n6['p50']/1000:.1f}/{n6['p99']/1000:.1f} ms; "
        f"streams/s lmgate {l6['rate']:.0f}, nginx {n6['rate']:.0f}")
    l7, n7 = many("s7", "lmgate"), many("s7", "nginx")
    bar("S7 16 unpaced streams: streams/s >= nginx", "PASS" if l7["rate"] >= n7["rate"] else "MISS",
        f"lmgate {l7['rate']:.0f}, nginx {n7['rate']:.0f} ({l7['rate']/n7['rate']:.2f}x); CPU per event "
        f"lmgate {l7['cpu_us']:.2f} us ({busy(l7)}), nginx {n7['cpu_us']:.2f} us ({busy(n7)})")
if (out / "c1-lmgate.json").exists():
    classic()
if (out / "s6-lmgate-1.json").exists():
    streams()
    bar("RSS after S6/S7 (512 pooled connections, for the record)", "INFO", f"{kb('rss-after-many')/1024:.1f} MB")
idle = kb("rss-idle") / 1024
bar("idle RSS after load < 20 MB", "PASS" if idle < 20 else "MISS", f"{idle:.1f} MB (at start {kb('rss-start')/1024:.1f} MB)")
w = max(len(r[0]) for r in rows)
print()
for what, verdict, detail in rows:
    print(f"{what:<{w}}  {verdict}  {detail}")
EOF
