#!/usr/bin/env bash
# Benchmark entry point: bench/run.sh [MODE] [options]; see docs/benchmarks.md.
#   modes: plain (default), full, apikey, policies, accesslog, tracing, scale, memory, h2, tls,
#          profile, grpc, upstream-tls            bench/run.sh --help describes each, and the options
#   e.g.   bench/run.sh accesslog --rounds 3 --seconds 6
#          bench/run.sh tracing --rounds 3 --seconds 6     (OTLP to an nginx sink started by the bench)
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" -h "*|*" --help "*) exec python3 bench/bench.py --help ;;
esac
case " $* " in
  *" --hexgate "*|*" --hexgate="*|*" --no-hexgate "*) ;;
  *) [ -x target/release/hexgate ] || cargo build --release --locked ;;
esac
# grpc: the gRPC backend (examples/grpc_backend.rs; rebuilt when its source is newer), unless
# another one is given with --grpc-backend.
if [ "${1:-}" = grpc ]; then
  case " $* " in
    *" --grpc-backend "*|*" --grpc-backend="*) ;;
    *) [ target/release/examples/grpc_backend -nt examples/grpc_backend.rs ] ||
         cargo build --release --locked --example grpc_backend ;;
  esac
fi
exec python3 bench/bench.py "$@"
