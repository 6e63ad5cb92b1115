# Shared by benches/bar.sh and benches/callgrind.sh (sourced, not run): the release build, the
# process list with its cleanup, port waits, and the configs of the two proxies under test —
# lmgate with one `openai` connection to the mock, and nginx (the yardstick: a bare proxy_pass
# with an upstream keepalive pool and proxy_buffering off). Traffic stays on 127.0.0.1.
#
# Needs OUT, MOCK_PORT, LMGATE_PORT and NGINX_PORT set by the caller.

# install_missing TOOL...: installs Debian packages of the same names when missing (needs root).
install_missing() {
    local missing=()
    for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    if ((${#missing[@]})); then
        echo "==> installing ${missing[*]} (Debian packages)"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
}

# BIN names a prebuilt binary to measure instead (e.g. one built with debug line tables for
# callgrind_annotate); otherwise the release build is made and used.
if [[ -z ${BIN:-} ]]; then
    echo "==> cargo build --release"
    cargo build --release --quiet
    BIN=$PWD/target/release/lmgate
fi

rm -rf "$OUT" && mkdir -p "$OUT/nginx/logs"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

# wait_port PORT: until something accepts on 127.0.0.1:PORT (30 s at most).
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

cat >"$OUT/lmgate.toml" <<EOF
[server]
listen = "127.0.0.1:$LMGATE_PORT"
[connections.up]
api_type = "openai"
api_base = "http://127.0.0.1:$MOCK_PORT/v1"
forward_headers = ["x-mock-*"]
[routing]
"*" = "up.*"
# Observability on, as it runs in production: metrics (on by default) and the request log.
[log]
requests = "$OUT/requests.jsonl"
EOF
# LIMITS=1: every request authenticates and is admitted against group and key limits (memory
# backend) set high enough never to refuse, so the bar measures what admission costs.
KEY_ARGS=()
if [[ ${LIMITS:-0} == 1 ]]; then
    cat >>"$OUT/lmgate.toml" <<EOF
[groups.bench]
api_keys = ["sk-bench"]
rpm = 1000000000
tpm = 1000000000000
max_concurrent = 100000
key_rpm = 1000000000
EOF
    KEY_ARGS=(-H "authorization:Bearer sk-bench")
fi

# nginx_conf EXTRA: one worker; EXTRA adds main-context lines (e.g. `master_process off;`).
nginx_conf() {
    cat >"$OUT/nginx/nginx.conf" <<EOF
worker_processes 1;
$1
daemon off;
pid nginx.pid;
error_log logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path tmp_body;
    proxy_temp_path tmp_proxy;
    fastcgi_temp_path tmp_fastcgi;
    uwsgi_temp_path tmp_uwsgi;
    scgi_temp_path tmp_scgi;
    keepalive_requests 1000000;
    upstream mock {
        server 127.0.0.1:$MOCK_PORT;
        keepalive 256;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        client_max_body_size 32m;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
EOF
}
NGINX_ARGS=(-p "$PWD/$OUT/nginx" -c "$PWD/$OUT/nginx/nginx.conf" -e "$PWD/$OUT/nginx/logs/error.log")
