#!/usr/bin/env bash
# Fuzzes the rules parser, the request handlers' input validation and the module's conversation
# inputs, each for a fixed time (default 600 s): `scripts/fuzz.sh [SECONDS] [TARGET...]`.
# A benchmark-style tool, not part of CI. Needs the nightly toolchain (fuzzing only; the build
# and tests stay on stable) and cargo-fuzz, installed from crates.io if missing. Crashes land in
# fuzz/artifacts/TARGET/; each one found is fixed and kept as a test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(rules requests module)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Seeds: the shipped rules and the examples.
mkdir -p fuzz/corpus/rules
cp packaging/rules.toml fuzz/corpus/rules/shipped.toml
cp packaging/examples/soffid-rules.toml fuzz/corpus/rules/soffid.toml

for t in "${targets[@]}"; do
  echo "== $t for ${seconds}s"
  start=$(date +%s)
  cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
    2>&1 | tail -n 5
  echo "$t: $(( $(date +%s) - start ))s, corpus $(ls fuzz/corpus/"$t" 2>/dev/null | wc -l) inputs, artifacts $(ls fuzz/artifacts/"$t" 2>/dev/null | wc -l)"
done
