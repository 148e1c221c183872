#!/usr/bin/env bash
# Two-stage context recipe on one GPU with bench-1b: pretrain at 2048 tokens, continue at 8192 with
# YaRN x4, then loss by position and passkey retrieval for both (JSON + PNG in $OUT or bench/results).
#
#   bash bench/context_extension.sh [PRETRAIN_STEPS] [EXTEND_STEPS]
set -euo pipefail
PRE=${1:-1200}
EXT=${2:-250}
OUT_DIR=${OUT:-bench/results}
GPU=$(python -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
RUNS=${RUNS:-runs}
MOEKIT=${MOEKIT:-python -m moekit}
mkdir -p "$OUT_DIR"

# the base model's RoPE table covers 8192 positions, so it can be evaluated (and fail) beyond 2048
$MOEKIT train --preset bench-1b --steps "$PRE" --seq-len 2048 --micro-batch 8 --model-max-seq-len 8192 \
    --eval-every 100000 --ckpt-every 100000 --out-dir "$RUNS/ctx-base"
$MOEKIT train --preset bench-1b --init-from "$RUNS/ctx-base" --steps "$EXT" --seq-len 8192 --micro-batch 2 --lr 2e-4 --min-lr 2e-5 \
    --warmup-steps 20 --model-rope-scaling 4 --model-rope-type yarn --model-rope-original-len 2048 \
    --eval-every 100000 --ckpt-every 100000 --compile --out-dir "$RUNS/ctx-8k"
$MOEKIT eval --ckpt "$RUNS/ctx-base" "$RUNS/ctx-8k" --length 8192 --buckets 8 --passkey-lengths 1024,2048,4096,8000 \
    --trials 8 --device cuda --json --png "$OUT_DIR/context_extension_bench1b_$GPU.png" \
    > "$OUT_DIR/context_extension_bench1b_$GPU.json"
python - "$OUT_DIR/context_extension_bench1b_$GPU.json" "$PRE" "$EXT" <<'EOF'
import json, sys, torch
path = sys.argv[1]
d = json.load(open(path))
d.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, pretrain_steps=int(sys.argv[2]),
         extend_steps=int(sys.argv[3]), command="bash bench/context_extension.sh " + " ".join(sys.argv[2:]))
json.dump(d, open(path, "w"), indent=2)
for run, by_src in d["loss_by_position"].items():
    for src, losses in by_src.items():
        print(run, src, " ".join(f"{x:.3f}" for x in losses))
print(json.dumps(d["passkey"], indent=1))
EOF
