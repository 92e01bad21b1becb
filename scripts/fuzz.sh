#!/usr/bin/env bash
# Runs each fuzz target (path normaliser, config reader, token verifier) for SECONDS (default 60)
# with a fresh seed. Usage: scripts/fuzz.sh [SECONDS]. A failure prints the seed and the input;
# rerun with HEXGATE_FUZZ_SEED=N to reproduce, then add the input as a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
seed="${HEXGATE_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
echo "fuzz: ${secs}s per target, HEXGATE_FUZZ_SEED=$seed"
HEXGATE_FUZZ_SECONDS="$secs" HEXGATE_FUZZ_SEED="$seed" \
  cargo test --release --locked --lib -- --test-threads 1 --nocapture fuzz:: mutated_tokens 2>&1 \
  | grep -E "^(normaliser|config|tokens):|^test |test result|panicked|fuzz case failed"
