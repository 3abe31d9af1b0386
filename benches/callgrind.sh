#!/usr/bin/env bash
# Instruction counts per operation (callgrind), immune to the machine's load: builds the
# `profile` example and runs each phase under callgrind, counting only inside `phase_*`.
# Usage: benches/callgrind.sh [OUT_DIR]   (needs valgrind; output files stay in OUT_DIR for
# callgrind_annotate, e.g. `callgrind_annotate --auto=yes OUT_DIR/map_present.alloc_ops.out`)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/callgrind}"
mkdir -p "$out"
cargo build -q --profile bench -p iopt-benches --example profile
bin="${CARGO_TARGET_DIR:-target}/release/examples/profile"
phases="map_new map_present map_reserved unmap lookup bulk_map bulk_map_present bulk_unmap map_2m unmap_2m vm_bind"
backends="alloc_ops prealloc prealloc_mut aarch64-paging"
echo "| phase | $(echo $backends | sed 's/ / | /g') |"
echo "|---|---:|---:|---:|---:|"
for ph in $phases; do
  row="| $ph |"
  for be in $backends; do
    # Reservations are the designs' own: the peer has no such phase, and the exclusive
    # entry points cover map, unmap and lookup only.
    if [ "$be" != alloc_ops ] && [ "$be" != prealloc ] && { [ "$ph" = map_reserved ] || [ "$ph" = vm_bind ]; }; then
      row="$row — |"
      continue
    fi
    ops=$("$bin" "$ph" "$be" | awk '{print $3}')
    ir=$(valgrind --tool=callgrind --callgrind-out-file="$out/$ph.$be.out" \
      --toggle-collect='profile::phase*' "$bin" "$ph" "$be" 2>&1 |
      awk '/Collected/ {print $4}')
    row="$row $(awk -v a="$ir" -v b="$ops" 'BEGIN {printf "%.1f", a / b}') |"
  done
  echo "$row"
done
