#!/usr/bin/env bash
# Benchmark entry point: bench/run.sh [plain] [options]; see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
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
