#!/usr/bin/env bash
# Speculative decoding on one GPU: train a bench-1b target on the bundled corpus, distil the
# bench-draft preset from it, then decode with and without speculation at batch 1, 8 and 32
# (bench/speculative.py).
#
#   bash bench/speculative.sh [TARGET_STEPS] [DRAFT_STEPS] [K] [ON_POLICY]
#
# ON_POLICY (default 0.25): the share of the draft's micro-batches written by the target itself
# (--distill-on-policy); 0 distils on the corpus only. A model already trained in $RUNS is kept,
# so the three stages can run as separate calls.
set -euo pipefail
TSTEPS=${1:-1200}
DSTEPS=${2:-1000}
K=${3:-4}
ON_POLICY=${4:-0.25}
RUNS=${RUNS:-runs}
MOEKIT=${MOEKIT:-python -m moekit}
[ -f "$RUNS/spec-target/metrics.jsonl" ] && ls -d "$RUNS"/spec-target/ckpt-* >/dev/null 2>&1 ||
    $MOEKIT train --preset bench-1b --steps "$TSTEPS" --eval-every 100000 --ckpt-every 100000 --out-dir "$RUNS/spec-target"
[ -f "$RUNS/spec-draft/metrics.jsonl" ] && ls -d "$RUNS"/spec-draft/ckpt-* >/dev/null 2>&1 ||
    $MOEKIT train --preset bench-draft --distill-from "$RUNS/spec-target" --steps "$DSTEPS" --device cuda \
        --distill-on-policy "$ON_POLICY" --eval-every 100000 --ckpt-every 100000 --out-dir "$RUNS/spec-draft"
python bench/speculative.py --target "$RUNS/spec-target" --draft "$RUNS/spec-draft" --k "$K" --new-tokens 128 \
    --batches 1,8,32 --kv-budget 4GiB
