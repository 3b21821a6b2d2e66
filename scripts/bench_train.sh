#!/usr/bin/env bash
# Trainer benchmark: what `features` costs per image (the image tower, run
# once under LiT) and what a `fit` step costs (text tower forward + backward
# through LoRA, GradCache), with the phase breakdown and peak memory.
#
#   cargo build --release --workspace
#   python scripts/gen_fixtures.py --full-size /tmp/capivara-full   # random full-size weights
#   scripts/bench_train.sh /tmp/capivara-full            # CPU
#   DEVICE=cuda DTYPE=bf16 scripts/bench_train.sh DIR    # GPU (a --features cuda build)
#
# Env: DEVICE (cpu), DTYPE (f32), BATCH (32), MICRO (8 16 32), STEPS (4),
# SAMPLES (256), BIN (target/release). Prints one JSON line per measurement.
set -euo pipefail
MODEL=${1:?usage: scripts/bench_train.sh MODEL_DIR}
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-f32}
BATCH=${BATCH:-32}
MICRO=${MICRO:-8 16 32}
STEPS=${STEPS:-4}
SAMPLES=${SAMPLES:-256}
BIN=${BIN:-$(dirname "$0")/../target/release}
T="$BIN/capivara-train"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1

"$T" synth --out "$WORK/data" --shards 1 --per-shard "$SAMPLES" --size 256 --seed 7 >/dev/null
# 1. Features: the frozen image tower over every image, once.
"$T" features --model "$MODEL" --device "$DEVICE" --shards "$WORK/data/00000.tar" \
    --out "$WORK/feats" --batch-size 32 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"measure":"features","device":"'"$DEVICE"'","images":d["embedded"],"images_per_second":round(d["images_per_second"],2)}))'

# 2. fit steps at each micro-batch (the first step is a warm-up and not counted).
for m in $MICRO; do
    rm -rf "$WORK/run"
    "$T" fit --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" \
        --shards "$WORK/data/00000.tar" --features "$WORK/feats" --out "$WORK/run" \
        --batch-size "$BATCH" --micro-batch "$m" --max-steps $((STEPS + 1)) --warmup-steps 0 \
        --lr 1e-5 --checkpoint-every 0 --val-every 0 --no-progress >"$WORK/summary.json" 2>/dev/null
    python3 - "$WORK" "$BATCH" "$m" "$DEVICE" "$DTYPE" <<'EOF'
import json, sys
work, batch, micro, device, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
steps = [json.loads(l) for l in open(f"{work}/run/metrics.jsonl") if '"loss"' in l][1:]
n = len(steps)
mean = lambda k: sum(s["seconds"][k] for s in steps) / n
wall = sum(s["step_seconds"] for s in steps) / n
summary = json.load(open(f"{work}/summary.json"))
print(json.dumps({
    "measure": "fit_step", "device": device, "dtype": dtype, "batch": batch, "micro_batch": micro,
    "steps_timed": n, "seconds_per_step": round(wall, 3), "samples_per_second": round(batch / wall, 2),
    "embed_no_graph": round(mean("embed"), 3), "loss": round(mean("loss"), 4),
    "forward": round(mean("forward"), 3), "backward": round(mean("backward"), 3),
    "peak_rss_mib": round(summary["peak_rss_bytes"] / 2**20),
    "trainable_parameters": summary["trainable_parameters"],
}))
EOF
done
