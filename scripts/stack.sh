#!/usr/bin/env bash
# The whole HexGate stack on this machine, no Docker:
#   Consul dev agent, Redis, the config pushed to Consul KV, N gateways (self-registered in Consul),
#   nginx with TLS in front of them, Prometheus finding the gateways through Consul (exemplars
#   kept), and (unless --no-backends) the three example backends registered in Consul. Traces: an
#   OTLP collector when one is installed (otelcol-contrib, otelcol, jaeger or jaeger-all-in-one on
#   PATH), started on loopback, or OTLP_ENDPOINT=URL to send them to one already running.
#
#   scripts/stack.sh up [--gateways N] [--no-backends]   start (idempotent), wait until healthy
#   scripts/stack.sh status                              show each part
#   scripts/stack.sh down                                stop exactly what `up` started
#
# Ports (environment): CONSUL_PORT=8500 REDIS_PORT=6379 NGINX_PORT=8443 PROMETHEUS_PORT=9090
#   GATEWAY_BASE_PORT=8001 (gateway i listens on BASE+i-1) ADMIN_BASE_PORT=9911
#   BACKEND_PORTS="8081 8082 8083" (user, user, product)
#   OTLP_PORT (the collector's OTLP/HTTP port; the first free one from 4318 when unset; gRPC on the
#   next free one) JAEGER_UI_PORT=16686
# Traces to a collector already running (nothing started): OTLP_ENDPOINT=http://HOST:4318 (OTLP
#   over HTTP) or grpc://HOST:4317; HEXGATE_STACK_SAMPLE_RATIO=1.0 (the stack samples every request)
# Run directory (pids, logs, rendered configs): HEXGATE_RUN_DIR=./run
# Quota on /users/ per consumer per minute: HEXGATE_STACK_QUOTA=100
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUN="${HEXGATE_RUN_DIR:-$ROOT/run}"
CONSUL_PORT="${CONSUL_PORT:-8500}"
REDIS_PORT="${REDIS_PORT:-6379}"
NGINX_PORT="${NGINX_PORT:-8443}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
GATEWAY_BASE_PORT="${GATEWAY_BASE_PORT:-8001}"
ADMIN_BASE_PORT="${ADMIN_BASE_PORT:-9911}"
BACKEND_PORTS="${BACKEND_PORTS:-8081 8082 8083}"
QUOTA="${HEXGATE_STACK_QUOTA:-100}"
SAMPLE_RATIO="${HEXGATE_STACK_SAMPLE_RATIO:-1.0}"
JAEGER_UI_PORT="${JAEGER_UI_PORT:-16686}"
KEYS="${HEXGATE_KEYS_DIR:-$ROOT/config}"   # private.pem/public.pem and cert.pem/key.pem
HEXGATE="${HEXGATE_BIN:-$ROOT/target/release/hexgate}"
BACKEND_BIN="${HEXGATE_BACKEND_BIN:-$ROOT/target/release/examples/backend}"
# Consul's serf and server ports follow the HTTP port so two stacks can coexist.
SERF_LAN_PORT="${SERF_LAN_PORT:-$((CONSUL_PORT + 1))}"
SERF_WAN_PORT="${SERF_WAN_PORT:-$((CONSUL_PORT + 2))}"
SERVER_PORT="${CONSUL_SERVER_PORT:-$((CONSUL_PORT + 3))}"

export CONSUL_HTTP_ADDR="http://127.0.0.1:$CONSUL_PORT"

log() { printf 'stack: %s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }

# Running, and not a zombie waiting to be reaped.
pid_alive() { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != "Z" ]; }
alive() { [ -f "$RUN/pids/$1.pid" ] && pid_alive "$(cat "$RUN/pids/$1.pid")"; }

# The worker processes of an nginx master (from /proc, so no procps needed).
nginx_workers() {
  local stat pid comm state ppid
  for stat in /proc/[0-9]*/stat; do
    read -r pid comm state ppid _ <"$stat" 2>/dev/null || continue
    [ "$comm" = "(nginx)" ] && [ "$ppid" = "$1" ] && echo "$pid"
  done
  return 0
}

old_workers_gone() { # pids...
  local pid
  for pid in "$@"; do pid_alive "$pid" && return 1; done
  return 0
}

wait_for() { # name, seconds, command...
  local name="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$name did not become healthy in ${secs}s (logs: $RUN/logs/)"
    sleep 0.2
  done
}

start() { # name, command... (runs in the background, pid recorded)
  local name="$1"; shift
  if alive "$name"; then log "$name already running (pid $(cat "$RUN/pids/$name.pid"))"; return 0; fi
  nohup "$@" >"$RUN/logs/$name.log" 2>&1 &
  echo $! >"$RUN/pids/$name.pid"
  log "started $name (pid $!)"
}

ensure_tools() {
  local missing=0
  for t in consul redis-server redis-cli nginx prometheus openssl curl; do
    command -v "$t" >/dev/null 2>&1 || missing=1
  done
  if [ $missing = 1 ]; then
    log "installing missing tools with scripts/setup.sh"
    bash "$ROOT/scripts/setup.sh"
  fi
  if [ ! -x "$HEXGATE" ] || [ ! -x "$BACKEND_BIN" ]; then
    log "building hexgate (release)"
    (cd "$ROOT" && cargo build --release --locked --bin hexgate --example backend)
  fi
}

render() { # template, output, then KEY=VALUE pairs
  local tmpl="$1" out="$2"; shift 2
  local text; text="$(cat "$tmpl")"
  for kv in "$@"; do text="${text//@${kv%%=*}@/${kv#*=}}"; done
  printf '%s\n' "$text" >"$out"
}

gateway_count() { cat "$RUN/gateways" 2>/dev/null || echo 0; }

# Something accepts connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The first port from $1 up that nothing listens on and that is not one of the others given.
free_port_from() {
  local p="$1"; shift
  while port_open "$p" || [[ " $* " == *" $p "* ]]; do p=$((p + 1)); done
  echo "$p"
}

# Traces. Sets TRACING (the config's `tracing:` block, empty without a collector) and TRACES (the
# summary's line). OTLP_ENDPOINT: a collector already running, nothing started. Otherwise the first
# collector on PATH, on loopback ports kept in $RUN/collector.ports while it runs (so `up` again
# renders the same endpoint).
collector() {
  TRACING="" TRACES=""
  local endpoint="${OTLP_ENDPOINT:-}" bin="" b
  if [ -z "$endpoint" ]; then
    for b in otelcol-contrib otelcol jaeger jaeger-all-in-one; do
      if command -v "$b" >/dev/null 2>&1; then bin="$b"; break; fi
    done
    if [ -z "$bin" ]; then
      TRACES="off: no OTLP collector on PATH (otelcol-contrib, otelcol, jaeger, jaeger-all-in-one); to use one, run up with OTLP_ENDPOINT=http://HOST:4318"
      return 0
    fi
    local http grpc query
    if alive collector && [ -f "$RUN/collector.ports" ]; then
      read -r http grpc query <"$RUN/collector.ports"
    else
      http="${OTLP_PORT:-$(free_port_from 4318)}"
      grpc="$(free_port_from 4317 "$http")"
      query="$(free_port_from 16685 "$http" "$grpc" "$JAEGER_UI_PORT")"
      echo "$http $grpc $query" >"$RUN/collector.ports"
    fi
    case "$bin" in
      otelcol*)
        render "$ROOT/deploy/stack/otelcol.yaml.tmpl" "$RUN/collector.yaml" OTLP_PORT="$http" OTLP_GRPC_PORT="$grpc"
        start collector "$bin" --config "$RUN/collector.yaml"
        TRACES="$bin on 127.0.0.1:$http (OTLP/HTTP), spans logged to $RUN/logs/collector.log" ;;
      jaeger)  # Jaeger v2: an OpenTelemetry Collector build, configured by file
        render "$ROOT/deploy/stack/jaeger.yaml.tmpl" "$RUN/collector.yaml" OTLP_PORT="$http" OTLP_GRPC_PORT="$grpc" \
          JAEGER_UI_PORT="$JAEGER_UI_PORT" JAEGER_QUERY_GRPC_PORT="$query"
        start collector "$bin" --config "$RUN/collector.yaml"
        TRACES="Jaeger UI http://localhost:$JAEGER_UI_PORT (OTLP/HTTP on 127.0.0.1:$http)" ;;
      jaeger-all-in-one)  # Jaeger v1: flags (its other ports keep their defaults)
        start collector env COLLECTOR_OTLP_ENABLED=true "$bin" --memory.max-traces=100000 \
          --collector.otlp.http.host-port="127.0.0.1:$http" --collector.otlp.grpc.host-port="127.0.0.1:$grpc" \
          --query.http-server.host-port="127.0.0.1:$JAEGER_UI_PORT" --query.grpc-server.host-port="127.0.0.1:$query"
        TRACES="Jaeger UI http://localhost:$JAEGER_UI_PORT (OTLP/HTTP on 127.0.0.1:$http)" ;;
    esac
    wait_for "$bin" 30 port_open "$http"
    endpoint="http://127.0.0.1:$http"
  else
    TRACES="sent to $endpoint (OTLP_ENDPOINT)"
  fi
  TRACING="tracing:
  otlpEndpoint: \"$endpoint\"
  serviceName: hexgate
  sampleRatio: $SAMPLE_RATIO"
}

# Prometheus keeps exemplars (trace ids on the latency histogram) from 2.26 on, behind a flag.
prometheus_flags() {
  local v; v="$(prometheus --version 2>&1 | sed -n 's/^prometheus, version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p' | head -1)"
  set -- $v
  if [ $# = 2 ] && { [ "$1" -gt 2 ] || { [ "$1" = 2 ] && [ "$2" -ge 26 ]; }; }; then
    echo "--enable-feature=exemplar-storage"
  fi
}

up() {
  local n=2 backends=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --gateways) n="$2"; shift 2 ;;
      --gateways=*) n="${1#*=}"; shift ;;
      --no-backends) backends=0; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  [ "$n" -ge 1 ] 2>/dev/null || die "--gateways needs a number >= 1"
  mkdir -p "$RUN/pids" "$RUN/logs" "$RUN/nginx" "$RUN/prometheus" "$RUN/keys"
  ensure_tools

  # Keys and certificates, if missing.
  [ -f "$KEYS/private.pem" ] || "$HEXGATE" keygen --out "$KEYS"
  [ -f "$KEYS/cert.pem" ] || bash "$ROOT/scripts/gen-certs.sh" "$KEYS"

  start consul consul agent -dev -bind=127.0.0.1 -client=127.0.0.1 -dns-port=-1 -grpc-port=-1 \
    -http-port="$CONSUL_PORT" -serf-lan-port="$SERF_LAN_PORT" -serf-wan-port="$SERF_WAN_PORT" \
    -server-port="$SERVER_PORT"
  wait_for consul 30 sh -c "curl -fsS $CONSUL_HTTP_ADDR/v1/status/leader | grep -q 127.0.0.1"

  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no
  wait_for redis 10 sh -c "redis-cli -p $REDIS_PORT PING | grep -q PONG"

  collector
  render "$ROOT/deploy/stack/config.yaml.tmpl" "$RUN/config.yaml" \
    CONSUL_PORT="$CONSUL_PORT" REDIS_PORT="$REDIS_PORT" KEYS="$KEYS" QUOTA="$QUOTA"
  [ -z "$TRACING" ] || printf '%s\n' "$TRACING" >>"$RUN/config.yaml"
  "$HEXGATE" config push --force --key hexgate/config "$RUN/config.yaml"

  if [ $backends = 1 ]; then
    local i=0 svc
    for p in $BACKEND_PORTS; do
      i=$((i + 1))
      if [ $i -le 2 ]; then svc=user-service; else svc=product-service; fi
      start "backend-$p" "$BACKEND_BIN" --port "$p" --service "$svc" --check-interval 1s
    done
  fi

  local upstreams=""
  for i in $(seq 1 "$n"); do
    local gp=$((GATEWAY_BASE_PORT + i - 1)) ap=$((ADMIN_BASE_PORT + i - 1))
    start "gateway-$i" "$HEXGATE" run --consul-key hexgate/config --gateway-port "$gp" --admin-port "$ap"
    upstreams+="        server 127.0.0.1:$gp max_fails=1 fail_timeout=2s;"$'\n'
  done
  echo "$n" >"$RUN/gateways"
  for i in $(seq 1 "$n"); do
    wait_for "gateway-$i" 30 curl -fsS "http://127.0.0.1:$((ADMIN_BASE_PORT + i - 1))/readyz"
  done

  # Consul checks start critical: wait until every registered check passes.
  wait_for "Consul health checks" 30 sh -c "curl -fsS $CONSUL_HTTP_ADDR/v1/health/state/critical | grep -qx '\[\]'"

  render "$ROOT/deploy/stack/nginx.conf.tmpl" "$RUN/nginx/nginx.conf.new" \
    RUN="$RUN" NGINX_PORT="$NGINX_PORT" CERT="$KEYS/cert.pem" KEY="$KEYS/key.pem" \
    UPSTREAMS="${upstreams%$'\n'}"
  if [ -f "$RUN/nginx/nginx.pid" ] && kill -0 "$(cat "$RUN/nginx/nginx.pid")" 2>/dev/null; then
    local master; master="$(cat "$RUN/nginx/nginx.pid")"
    if cmp -s "$RUN/nginx/nginx.conf.new" "$RUN/nginx/nginx.conf"; then
      rm -f "$RUN/nginx/nginx.conf.new"
      log "nginx already running (pid $master)"
    else
      # A reloaded nginx's old workers close the connections they still accept while they exit
      # (an HTTP/2 client sees a framing error), so wait until they are gone before going on.
      local old; old="$(nginx_workers "$master")"
      mv "$RUN/nginx/nginx.conf.new" "$RUN/nginx/nginx.conf"
      nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -s reload
      wait_for "nginx reload" 20 old_workers_gone $old
      log "nginx reloaded"
    fi
  else
    mv "$RUN/nginx/nginx.conf.new" "$RUN/nginx/nginx.conf"
    nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf"
    log "started nginx (pid $(cat "$RUN/nginx/nginx.pid"))"
  fi
  cp "$RUN/nginx/nginx.pid" "$RUN/pids/nginx.pid"
  wait_for nginx 10 curl -sk -o /dev/null "https://127.0.0.1:$NGINX_PORT/"

  local sd=""
  for i in $(seq 1 "$n"); do
    sd+="      - url: http://127.0.0.1:$((ADMIN_BASE_PORT + i - 1))/admin/sd?service=hexgate"$'\n'
    sd+="        refresh_interval: 2s"$'\n'
  done
  render "$ROOT/deploy/stack/prometheus.yml.tmpl" "$RUN/prometheus/prometheus.yml" \
    CONSUL_PORT="$CONSUL_PORT" PROMETHEUS_PORT="$PROMETHEUS_PORT" SD_URLS="${sd%$'\n'}"
  # shellcheck disable=SC2046  # no flag, or one without spaces
  start prometheus prometheus --config.file="$RUN/prometheus/prometheus.yml" \
    --storage.tsdb.path="$RUN/prometheus/data" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    $(prometheus_flags)
  wait_for prometheus 30 curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"

  cat <<EOF

HexGate stack is up ($n gateways).
  HTTPS (nginx)  https://localhost:$NGINX_PORT      e.g. curl -k https://localhost:$NGINX_PORT/products/abc
  Consul UI      http://localhost:$CONSUL_PORT
  Prometheus     http://localhost:$PROMETHEUS_PORT
  Redis          127.0.0.1:$REDIS_PORT
  Traces         $TRACES
  Gateways       $(for i in $(seq 1 "$n"); do printf 'http://127.0.0.1:%s (admin %s)  ' $((GATEWAY_BASE_PORT + i - 1)) $((ADMIN_BASE_PORT + i - 1)); done)
  Token          TOKEN=\$($HEXGATE token --key $KEYS/private.pem --sub alice)
  Logs and pids  $RUN/logs, $RUN/pids
Stop with: scripts/stack.sh down
EOF
}

stop_pid() { # name
  local f="$RUN/pids/$1.pid"
  [ -f "$f" ] || return 0
  local pid; pid="$(cat "$f")"
  if pid_alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.1; done
    if pid_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    log "stopped $1 (pid $pid)"
  fi
  rm -f "$f"
}

down() {
  [ -d "$RUN/pids" ] || { log "nothing to stop"; return 0; }
  stop_pid prometheus
  if [ -f "$RUN/nginx/nginx.pid" ] && kill -0 "$(cat "$RUN/nginx/nginx.pid")" 2>/dev/null; then
    nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -s quit 2>/dev/null || true
    for _ in $(seq 1 50); do [ -f "$RUN/nginx/nginx.pid" ] || break; sleep 0.1; done
  fi
  stop_pid nginx
  for f in "$RUN"/pids/gateway-*.pid; do [ -e "$f" ] && stop_pid "$(basename "$f" .pid)"; done
  for f in "$RUN"/pids/backend-*.pid; do [ -e "$f" ] && stop_pid "$(basename "$f" .pid)"; done
  stop_pid collector   # after the gateways, which send their last spans as they stop
  rm -f "$RUN/collector.ports"
  stop_pid redis
  stop_pid consul
  rm -f "$RUN/gateways"
}

status() {
  local any=0
  for f in "$RUN"/pids/*.pid; do
    [ -e "$f" ] || continue
    any=1
    local name; name="$(basename "$f" .pid)"
    if alive "$name"; then printf '%-14s running (pid %s)\n' "$name" "$(cat "$f")"
    else printf '%-14s STOPPED\n' "$name"; fi
  done
  [ $any = 1 ] || echo "stack is down"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  up) up "$@" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: scripts/stack.sh up [--gateways N] [--no-backends] | status | down" >&2; exit 2 ;;
esac
