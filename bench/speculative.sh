#!/usr/bin/env bash
# Speculative decoding on one GPU: train a bench-1b target on the bundled corpus, distil the
# bench-draft preset from it, then decode with and without speculation at batch 1, 8 and 32
# (bench/speculative.py), then with prompt lookup next to the draft and instead of it.
#
#   bash bench/speculative.sh [TARGET_STEPS] [DRAFT_STEPS] [K] [ON_POLICY]
#
# ON_POLICY (default 0.5): the share of the draft's micro-batches written by the target itself
# (--distill-on-policy); 0 distils on the corpus only. A model already trained in $RUNS is kept
# and a stage cut short resumes from its last checkpoint, so the stages can run as separate calls.
# TIME_LIMIT=SECONDS: each training stage checkpoints and stops before passing it, and the script
# ends with exit code 75 until the stage is done (run it again to continue).
set -euo pipefail
TSTEPS=${1:-1000}
DSTEPS=${2:-600}
K=${3:-4}
ON_POLICY=${4:-0.5}
RUNS=${RUNS:-runs}
MOEKIT=${MOEKIT:-python -m moekit}
LIMIT=${TIME_LIMIT:+--time-limit $TIME_LIMIT}
# the newest checkpoint's step in a run folder (empty: none)
latest() { { ls -d "$1"/ckpt-* 2>/dev/null || true; } | sort | tail -1 | sed 's/.*ckpt-0*//'; }
# train a stage to STEPS, checkpointing every EVERY steps; a stage cut short resumes where it stopped
stage() {
    local dir=$1 steps=$2 every=$3; shift 3
    local done; done=$(latest "$dir")
    if [ -z "$done" ]; then
        rm -rf "$dir"
        $MOEKIT train "$@" --steps "$steps" --eval-every 100000 --ckpt-every "$every" --out-dir "$dir" $LIMIT
    elif [ "$done" -lt "$steps" ]; then
        $MOEKIT train --resume "$dir" --steps "$steps" $LIMIT
    fi
}
stage "$RUNS/spec-target" "$TSTEPS" 250 --preset bench-1b
stage "$RUNS/spec-draft" "$DSTEPS" 50 --preset bench-draft --distill-from "$RUNS/spec-target" --device cuda \
    --distill-on-policy "$ON_POLICY"
python bench/speculative.py --target "$RUNS/spec-target" --draft "$RUNS/spec-draft" --k "$K" --new-tokens 128 \
    --batches 1,8,32 --kv-budget 4GiB
# the draft with prompt lookup next to it (lookup where every request matches 3+ tokens), lookup
# steps proposing as many as the draft's and 12
python bench/speculative.py --target "$RUNS/spec-target" --draft "$RUNS/spec-draft" --with-lookup \
    --k "$K" --new-tokens 128 --batches 1 --prompts 16 --kv-budget 4GiB --name "speculative_{gpu}_draft_lookup"
python bench/speculative.py --target "$RUNS/spec-target" --draft "$RUNS/spec-draft" --with-lookup \
    --prompt-lookup-tokens 12 --k "$K" --new-tokens 128 --batches 1 --prompts 16 --kv-budget 4GiB \
    --name "speculative_{gpu}_draft_lookup12"
# the same target with prompt lookup instead of a draft model (no training); on an MoE target
# verifying more rows costs little, so longer proposals pay (12 measured best on H200)
python bench/speculative.py --target "$RUNS/spec-target" --draft ngram --k $((K + 1)),12 --new-tokens 128 \
    --batches 1 --prompts 16 --kv-budget 4GiB --name "speculative_{gpu}_ngram"
