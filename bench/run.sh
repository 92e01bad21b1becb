#!/usr/bin/env bash
# Benchmark entry point: bench/run.sh [plain] [options]; see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/hexgate ] || cargo build --release --locked
exec python3 bench/bench.py "$@"
