#!/usr/bin/env bash
# Installs what the test suite and benchmarks need on a Debian machine (run as root, or with sudo).
# Idempotent: does nothing when everything is already present.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have curl          || need_pkgs+=(curl)
have openssl       || need_pkgs+=(openssl)
have redis-server  || need_pkgs+=(redis-server)
have nginx         || need_pkgs+=(nginx-light)
have wrk           || need_pkgs+=(wrk)
have haproxy       || need_pkgs+=(haproxy)
have prometheus    || need_pkgs+=(prometheus)
have docker-compose || need_pkgs+=(docker-compose)
have h2load        || need_pkgs+=(nghttp2-client)
have valgrind      || need_pkgs+=(valgrind)   # bench/run.sh profile
[ -e /etc/ssl/certs/ca-certificates.crt ] || need_pkgs+=(ca-certificates)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# Debian starts some services on install; the tests start their own on free ports.
for svc in nginx redis-server haproxy prometheus prometheus-node-exporter; do
  if have systemctl && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" || true
  fi
done

# consul is not in Debian's current suite: a separate script fetches it from the previous one.
bash "$(dirname "$0")/install-consul.sh"

# tests/it/grpc.rs drives a real gRPC server and client (tests/grpc/*.py) written with grpcio, kept in a
# virtual environment at .venv in the repo root (ignored by git).
GRPCIO_VERSION=1.85.1
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo_root/.venv"
if ! "$venv/bin/python" -c 'import grpc' >/dev/null 2>&1; then
  # Debian's interpreter when there is one (a pyenv or other shim may come and go), else whatever python3 is.
  py=python3
  [ -x /usr/bin/python3 ] && py=/usr/bin/python3
  if ! have "$py" || ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    echo "setup: installing python3-venv"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
  fi
  echo "setup: creating $venv with grpcio $GRPCIO_VERSION"
  # --clear: a half-made or stale .venv (its interpreter gone) is made anew.
  "$py" -m venv --clear "$venv"
  "$venv/bin/pip" install -q "grpcio==$GRPCIO_VERSION"
  "$venv/bin/python" -c 'import grpc' || { echo "setup: grpcio does not import in $venv" >&2; exit 1; }
fi
# tests/it/openmetrics.rs checks the OpenMetrics exposition with prometheus_client's strict parser;
# added to the venv above (kept as it is when it already works).
PROMETHEUS_CLIENT_VERSION=0.26.0
if ! "$venv/bin/python" -c 'import prometheus_client' >/dev/null 2>&1; then
  echo "setup: installing prometheus_client $PROMETHEUS_CLIENT_VERSION in $venv"
  "$venv/bin/pip" install -q "prometheus_client==$PROMETHEUS_CLIENT_VERSION"
  "$venv/bin/python" -c 'import prometheus_client.openmetrics.parser' \
    || { echo "setup: prometheus_client does not import in $venv" >&2; exit 1; }
fi

have cargo || { echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
# `make lint` (run by CI after the tests) needs rustfmt and clippy.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if have rustup; then
    rustup component add rustfmt clippy
  else
    echo "setup: cargo fmt or cargo clippy missing and no rustup to add them" >&2
    exit 1
  fi
fi
echo "setup: ok"
