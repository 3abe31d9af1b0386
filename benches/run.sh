#!/usr/bin/env bash
# Runs the benches and prints the medians table.
#   benches/run.sh            quick run (the issue's sizes; scaling up to 1 GiB)
#   benches/run.sh full       scaling up to 64 GiB as well
#   benches/run.sh smoke      what CI runs: every benchmark once, small sizes
#   benches/run.sh paired     only the interleaved per-round ratios of the goals (~5 s)
# Extra arguments go to criterion, e.g. `benches/run.sh quick bulk_map` to filter.
#
# glibc returns the top of the heap to the kernel whenever more than 128 KiB is free there,
# so a bench that builds and drops a 1 GiB tree every iteration would otherwise measure page
# faults on the next build (bulk map of 1 GiB: 2.9 ns/page with trimming, 1.0 without). The
# variables below keep freed memory in the process, as a long-running driver's allocator
# would; they change nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-quick}"
shift || true
export MALLOC_TRIM_THRESHOLD_=17179869184 MALLOC_TOP_PAD_=268435456
case "$mode" in
  smoke) exec cargo bench -p iopt-benches --bench '*' -- --test "$@" ;;
  paired) exec cargo run --release -q -p iopt-benches --bin paired -- "$@" ;;
  full) export IOPT_BENCH_FULL=1 ;;
  quick) ;;
  *) echo "usage: $0 [quick|full|smoke|paired] [criterion or paired args]" >&2; exit 2 ;;
esac
# A whole run starts from an empty criterion directory, so the table below holds no rows of
# benchmarks renamed or removed since an earlier run. A filtered run keeps the other rows.
if [ "$#" -eq 0 ]; then
  rm -rf "${CARGO_TARGET_DIR:-target}/criterion"
fi
cargo bench -p iopt-benches --bench '*' -- --warm-up-time 1 --measurement-time 3 "$@"
cargo run -q -p iopt-benches --bin medians
# The goals again, each ratio taken inside interleaved rounds (see src/bin/paired.rs).
if [ "$#" -eq 0 ]; then
  cargo run --release -q -p iopt-benches --bin paired
fi
