#!/usr/bin/env bash
# Fuzzes the untrusted-input paths: the path normaliser, host canonicalisation, the header-name
# policy, the config reader and the token verifier.
#
#   scripts/fuzz.sh [SECONDS]            coverage-guided (cargo-fuzz, libFuzzer), SECONDS per target
#                                        (default 60); installs cargo-fuzz if it is missing
#   scripts/fuzz.sh --budget [SECONDS]   the bounded random-mutation targets of `cargo test`, with a
#                                        fresh seed (HEXGATE_FUZZ_SEED=N to repeat one)
#
# cargo-fuzz runs on the stable toolchain with `--sanitizer none` (Rust's own checks still catch
# overflows and bounds in the optimised build with debug assertions). Corpora grow in
# fuzz/corpus/TARGET; a failing input is saved in fuzz/artifacts/TARGET/ and the script exits 1:
# reproduce with `cargo fuzz run --sanitizer none TARGET FILE`, then add the input as a regression
# case in the module's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--budget" ]; then
  secs="${2:-60}"
  seed="${HEXGATE_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
  echo "fuzz (budget): ${secs}s per target, HEXGATE_FUZZ_SEED=$seed"
  HEXGATE_FUZZ_SECONDS="$secs" HEXGATE_FUZZ_SEED="$seed" \
    cargo test --release --locked --lib -- --test-threads 1 --nocapture fuzz:: mutated_tokens 2>&1 \
    | grep -E "^(normaliser|hosts|headers|config|tokens):|^test |test result|panicked|fuzz case failed"
  exit "${PIPESTATUS[0]}"
fi

secs="${1:-60}"
case "$secs" in ''|*[!0-9]*) echo "usage: scripts/fuzz.sh [SECONDS] | --budget [SECONDS]" >&2; exit 2 ;; esac
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi

# Seeds: the repository's configs, and request paths from the tests' tricky cases.
mkdir -p fuzz/corpus/path fuzz/corpus/host fuzz/corpus/headers fuzz/corpus/config fuzz/corpus/token
for f in config/*.yaml deploy/*/*.yaml; do
  [ -f "$f" ] && cp "$f" "fuzz/corpus/config/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
done
i=0
for p in /users/1 /public/../private/x /%2e%2e/admin //users//1 /./a/%2F/b /%75sers/ /a/%c0%ae%c0%ae/b \
         "/x;y?z#w" /%25%32%65/; do
  i=$((i + 1)); printf '%s' "$p" >"fuzz/corpus/path/seed-$i"
done

i=0
for h in admin.example.com admin.example.com. ADMIN.EXAMPLE.COM.:80 "[::1]:8080" evil@x x:80:80 a..b; do
  i=$((i + 1)); printf '%s' "$h" >"fuzz/corpus/host/seed-$i"
done
printf 'x-consumer-id\nx_consumer_id\ntransfer_encoding\nauthorization' >fuzz/corpus/headers/seed-1

cargo fuzz build --sanitizer none -O --debug-assertions
failed=0
for target in path host headers config token; do
  log="fuzz/artifacts/$target.log"
  mkdir -p "fuzz/artifacts/$target"
  if cargo fuzz run --sanitizer none -O --debug-assertions "$target" "fuzz/corpus/$target" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    runs="$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | awk '{print $2}')"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}')"
    echo "fuzz: $target: ${runs:-?} runs in ${secs}s, coverage ${cov:-?} edges, corpus $(ls "fuzz/corpus/$target" | wc -l) inputs, no failure"
  else
    failed=1
    echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/, the log in $log"
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" | head -5 || true
  fi
done
exit "$failed"
