#!/usr/bin/env bash
# The long fuzzing runs whose figures go in the overload issue's closing note (CI only
# replays the corpus: cli/tests/fuzz_smoke.rs). Needs a nightly toolchain and cargo-fuzz:
#
#   cargo install cargo-fuzz
#   fuzz/run.sh                 # every target, 10 million executions each
#   RUNS=100000 fuzz/run.sh frame
#
# Each run grows fuzz/corpus/<target> (kept in the repository, after `cargo fuzz cmin`)
# and leaves any crash in fuzz/artifacts/<target>. Prints executions and crashes per target.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10000000}
TARGETS=${*:-gguf safetensors_header frame control http_request}
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t"
    log=$(mktemp)
    start=$(date +%s)
    if cargo +nightly fuzz run --sanitizer none "$t" "fuzz/corpus/$t" -- \
        -runs="$RUNS" -max_len=65536 -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
    fi
    took=$(( $(date +%s) - start ))
    execs=$(grep -o 'Done [0-9]* runs' "$log" | grep -o '[0-9]*' || echo '?')
    crashes=$(ls "fuzz/artifacts/$t" 2>/dev/null | grep -c '^crash-' || true)
    echo "$t: $status, $execs executions in ${took}s, $crashes crashes"
    [ "$status" = ok ] || tail -40 "$log"
done
