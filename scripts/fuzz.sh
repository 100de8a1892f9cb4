#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a while each.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Default: 60 s for every target. Installs cargo-fuzz when missing; uses a
# nightly toolchain when rustup has one, else stable with RUSTC_BOOTSTRAP=1
# (cargo-fuzz needs -Z flags). Seeds come from fuzz/corpus/<target>/
# (committed); what libFuzzer finds on the way goes to a scratch corpus under
# the target dir, crashes to fuzz/artifacts/<target>/ (ignored by git).
# Exits non-zero when a target crashes, naming the crashing input.
#
# Environment: CARGO_TARGET_DIR (default fuzz/target), CARGO_BUILD_JOBS
# (default 1: the machine is shared), FUZZ_SANITIZER (default address;
# "none" builds faster and runs faster, finding panics but not memory errors),
# FUZZ_PROFILE (default release; "dev" builds unoptimised, about twice as
# fast to build and slower to run: what CI's short pass uses).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root/fuzz"

seconds=${1:-60}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
all_targets=(json_check http_body pipeline_loader jwt template_path)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

# Longest input per target: JSON bodies a few KiB; pipeline files 4 KiB
# (big enough for real pipelines, small enough that a slow YAML shape shows
# as a timeout rather than an out-of-memory); tokens and templates short.
max_len() {
    case $1 in
        json_check | http_body) echo 8192 ;;
        pipeline_loader) echo 4096 ;;
        jwt) echo 2048 ;;
        template_path) echo 512 ;;
        *) echo 4096 ;;
    esac
}

export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/fuzz/target}
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

toolchain=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

build_flags=(--sanitizer "${FUZZ_SANITIZER:-address}")
case ${FUZZ_PROFILE:-release} in
    release) ;;
    dev) build_flags+=(--dev) ;;
    *)
        echo "fuzz.sh: FUZZ_PROFILE must be release or dev" >&2
        exit 2
        ;;
esac

echo "fuzz.sh: building ${targets[*]} ($(cargo "${toolchain[@]}" --version))" >&2
start=$(date +%s)
for target in "${targets[@]}"; do
    cargo "${toolchain[@]}" fuzz build "${build_flags[@]}" "$target"
done
echo "fuzz.sh: built in $(($(date +%s) - start)) s" >&2

failed=()
for target in "${targets[@]}"; do
    seeds=corpus/$target
    scratch=$CARGO_TARGET_DIR/fuzz-corpus/$target
    artifacts=artifacts/$target
    mkdir -p "$seeds" "$scratch" "$artifacts"
    log=$CARGO_TARGET_DIR/fuzz-$target.log
    echo "fuzz.sh: $target for ${seconds}s (log $log)" >&2
    status=0
    # The scratch corpus comes first: new inputs are written there, never
    # into the committed seeds.
    cargo "${toolchain[@]}" fuzz run "${build_flags[@]}" "$target" "$scratch" "$seeds" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^Done [0-9]+ runs' "$log" | sed "s/^/  $target: /" >&2 || true
    if [ $status -ne 0 ]; then
        crash=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -n 1 | sed 's/Test unit written to //')
        echo "fuzz.sh: $target FAILED (exit $status); crashing input: ${crash:-see $log}" >&2
        grep -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" | head -n 5 | sed "s/^/  /" >&2 || true
        failed+=("$target")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz.sh: crashed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} target(s) ran ${seconds}s each without a crash" >&2
