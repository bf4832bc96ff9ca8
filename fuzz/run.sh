#!/usr/bin/env bash
# Fuzzes every target for a bounded time: `bash fuzz/run.sh [SECONDS]`
# (default 60 seconds per target). Installs cargo-fuzz if missing, writes the
# seed corpus, builds all targets once, runs each on corpus/<target>, prints
# one line per target with its number of executions, and exits non-zero if
# any target crashed, leaving the crashing input in artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never

secs=${1:-60}
case $secs in '' | *[!0-9]*)
    echo "usage: $0 [SECONDS per target]" >&2
    exit 2
    ;;
esac

# libFuzzer needs a nightly compiler (sanitizers, -Z flags).
if ! cargo +nightly --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# Optimised, with debug assertions and overflow checks (an overflow on
# hostile input is a bug even where release builds would wrap), under ASan.
# `run` must get the same flags, or it rebuilds.
build_flags=(--release --debug-assertions)

logs=target/fuzz-logs
mkdir -p "$logs"

echo "== seeds"
cargo +nightly run --quiet -p ringfence-fuzz-seeds -- corpus

echo "== build"
start=$SECONDS
cargo +nightly fuzz build "${build_flags[@]}"
echo "built in $((SECONDS - start)) s"

mapfile -t targets < <(cargo +nightly fuzz list)
passed=0
failed=0
failures=()
echo "== run, ${secs} s per target"
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="$logs/$t.log"
    # -timeout: one input running this long is a hang, reported like a crash.
    # The outer `timeout` only guards against libFuzzer itself not stopping.
    set +e
    timeout --kill-after=30 $((secs + 600)) \
        cargo +nightly fuzz run "${build_flags[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -n1 | grep -o '[0-9]*$' || true)
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        printf '%-16s ok      %12s execs\n' "$t" "${execs:-?}"
    else
        failed=$((failed + 1))
        failures+=("$t")
        if grep -q 'failed to build fuzz script' "$log"; then
            printf '%-16s FAILED  build failed\n' "$t"
            grep -E -A12 '^error' "$log" | head -n 40 || true
        else
            printf '%-16s FAILED  %12s execs (exit %s)\n' "$t" "${execs:-?}" "$rc"
            # What libFuzzer said about the crash, and where the input is.
            crash=$(grep -E -m1 -A40 '^(==[0-9]+==ERROR|thread .* panicked|ALARM: working on the last Unit)' "$log" || true)
            if [ -n "$crash" ]; then echo "$crash"; else tail -n 30 "$log"; fi
            grep -E 'Test unit written to' "$log" | tail -n 1 || true
        fi
        echo "   full log: fuzz/$log"
    fi
done

echo
if [ "$failed" -gt 0 ]; then
    echo "crashed: ${failures[*]} (inputs in fuzz/artifacts/<target>/)"
fi
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
