#!/usr/bin/env bash
# Speculative decoding on one GPU: train a bench-1b target on the bundled corpus, distil the draft
# preset from it, then decode with and without speculation at batch 1, 8 and 32 (bench/speculative.py).
#
#   bash bench/speculative.sh [TARGET_STEPS] [DRAFT_STEPS]
set -euo pipefail
TSTEPS=${1:-600}
DSTEPS=${2:-400}
RUNS=${RUNS:-runs}
MOEKIT=${MOEKIT:-python -m moekit}
$MOEKIT train --preset bench-1b --steps "$TSTEPS" --eval-every 100000 --ckpt-every 100000 --out-dir "$RUNS/spec-target"
$MOEKIT train --preset draft --distill-from "$RUNS/spec-target" --steps "$DSTEPS" --device cuda \
    --eval-every 100000 --ckpt-every 100000 --out-dir "$RUNS/spec-draft"
python bench/speculative.py --target "$RUNS/spec-target" --draft "$RUNS/spec-draft" --k 4 --new-tokens 128 \
    --batches 1,8,32 --kv-budget 4GiB
