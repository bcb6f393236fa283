#!/usr/bin/env bash
# Runs every loom model: raceguard's own (src/**/tests/loom_*.rs, test names
# starting with `loom_`) and the downstream crate in tests/downstream, which
# model-checks user code built on raceguard the way a user's CI would.
#
# Loom is bounded model checking: LOOM_MAX_PREEMPTIONS=3 explores every
# interleaving with at most 3 preemptions per execution.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

export RUSTFLAGS="--cfg raceguard_loom -C debug-assertions"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
# A target dir of its own: switching RUSTFLAGS would otherwise rebuild the
# normal target dir from scratch on every alternation.
export CARGO_TARGET_DIR="${RACEGUARD_LOOM_TARGET_DIR:-$root/target/loom}"

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== loom: raceguard's models (LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS)"
cargo test --release --lib loom 2>&1 | tee -a "$log"

echo "== loom: downstream crate (tests/downstream)"
cargo test --release --manifest-path tests/downstream/Cargo.toml 2>&1 | tee -a "$log"

models=$(grep -E '^test .*loom_.* \.\.\. ok$' "$log" | wc -l)
failed=$(grep -cE '^test .* \.\.\. FAILED$' "$log" || true)
echo "== loom: $models models passed, $failed failed"
if [ "$models" -lt 1 ] || [ "$failed" -ne 0 ]; then
  echo "loom: expected at least one passing model and no failure" >&2
  exit 1
fi
