#!/usr/bin/env bash
# Teacher vs pruned vs distilled student, full-size architecture, on the
# synthetic benchmark: size on disk, parameters, texts/s (`capivara bench` on
# the benchmark's texts) and quality (retrieval mean recall on held-out
# shards, zero-shot top-1, cosine to the teacher, zero-shot agreement).
#
#   cargo build --release --workspace
#   python scripts/gen_fixtures.py --full-size /tmp/capivara-full   # random full-size weights
#   scripts/distill_bench.sh /tmp/capivara-full [WORKDIR]
#
# The random base is first fine-tuned on the benchmark (LiT + LoRA, `fit`,
# merged) so that the teacher is good at it; the pruned model keeps the
# tokens of the benchmark's captions and prompts; the student is distilled
# from the pruned teacher. REUSE=1 keeps steps 1-3 of an earlier run in
# WORKDIR. Env: FIT_STEPS (120), STAGE1 (400), STAGE2 (100),
# STUDENT (JSON; default 4 of the 12 layers), BATCH (32), BIN (target/release).
# Prints one JSON line per model and the two comparisons; keeps WORKDIR.
set -euo pipefail
BASE=${1:?usage: scripts/distill_bench.sh FULL_SIZE_MODEL_DIR [WORKDIR]}
W=${2:-$(mktemp -d)}
FIT_STEPS=${FIT_STEPS:-120}
STAGE1=${STAGE1:-400}
STAGE2=${STAGE2:-100}
BATCH=${BATCH:-32}
STUDENT=${STUDENT:-'{"num_hidden_layers": 4, "teacher_layers": [0, 4, 8, 11]}'}
BIN=${BIN:-$(dirname "$0")/../target/release}
T="$BIN/capivara-train"
C="$BIN/capivara"
export HF_HUB_OFFLINE=1
mkdir -p "$W"
log() { echo "[$(date +%T)] $*" >&2; }
TRAIN="$W/train/{00000..00001}.tar"

if [ -f "$W/teacher/open_clip_model.safetensors" ] && [ -n "${REUSE:-}" ]; then
log "1-3. REUSE=1: keeping the benchmark, features and teacher in $W"
else
log "1. synthetic benchmark in $W"
"$T" synth --out "$W/train" --shards 2 --per-shard 200 --seed 1 --classes "$W/cls" --per-class 4 >/dev/null
"$T" synth --out "$W/val" --shards 1 --per-shard 96 --seed 2 >/dev/null

log "2. image features (one image tower for all three models)"
"$T" features --model "$BASE" --shards "$TRAIN" --out "$W/feats" --batch-size 32 >/dev/null
"$T" features --model "$BASE" --shards "$W/val/00000.tar" --out "$W/vfeats" --batch-size 32 >/dev/null

log "3. teacher: $FIT_STEPS LiT + LoRA steps on the benchmark, merged"
rm -rf "$W/run" "$W/teacher"
"$T" fit --model "$BASE" --shards "$TRAIN" --features "$W/feats" --out "$W/run" \
    --batch-size "$BATCH" --micro-batch "$BATCH" --max-steps "$FIT_STEPS" --warmup-steps 10 \
    --lr 1e-4 --min-lr 1e-5 --checkpoint-every 0 --val-every 0 --no-progress >/dev/null
"$T" merge --model "$BASE" --lora "$W/run" --out "$W/teacher" >/dev/null
fi

log "4. pruned: the tokens of the benchmark's captions and prompts"
"$T" recipe >"$W/recipe.json"
python3 - "$W" <<'EOF'
import json, sys, tarfile, glob
w = sys.argv[1]
templates = json.load(open(f"{w}/recipe.json"))["zero_shot_templates"]
texts = set()
for line in open(f"{w}/cls/labels.txt"):
    if line.strip() and not line.startswith("#"):
        label = line.rstrip("\n").split("\t")[-1]
        texts.update(t.replace("{}", label, 1) for t in templates)
for shard in glob.glob(f"{w}/train/*.tar") + glob.glob(f"{w}/val/*.tar"):
    with tarfile.open(shard) as t:
        for m in t.getmembers():
            if m.name.endswith(".json"):
                d = json.load(t.extractfile(m))
                texts.update(d.get("captions-pt", []) + d.get("generated-captions-pt", []))
with open(f"{w}/corpus.txt", "w") as f:
    f.write("\n".join(sorted(texts)) + "\n")
EOF
rm -rf "$W/pruned"
"$T" prune-vocab --model "$W/teacher" --corpus "$W/corpus.txt" --out "$W/pruned" >"$W/prune.json"
cat "$W/prune.json"

# Stage 1 learns from the captions of the shards and the corpus (which holds
# the zero-shot prompts: text the deployment will embed, no labels or images).
log "5. student: $STUDENT, distilled from the pruned teacher"
echo "$STUDENT" >"$W/student.json"
rm -rf "$W/student"
"$T" distill --teacher "$W/pruned" --student-config "$W/student.json" --shards "$TRAIN" \
    --texts "$W/corpus.txt" --features "$W/feats" --val-shards "$W/val/00000.tar" --val-features "$W/vfeats" \
    --out "$W/student" --stage1-steps "$STAGE1" --stage2-steps "$STAGE2" --batch-size "$BATCH" \
    --lr 1e-4 --stage2-lr 1e-5 --warmup-steps 20 --no-progress >"$W/distill.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["init"].pop("fresh"); print(json.dumps(d))' "$W/distill.json"

log "6. quality: each model against the teacher on held-out shards and the zero-shot folder"
for m in pruned student; do
    "$T" eval --model "$W/$m" --teacher "$W/teacher" --shards "$W/val/00000.tar" \
        --features "$W/vfeats" --images "$W/cls" --labels "$W/cls/labels.txt" \
        --batch-size "$BATCH" >"$W/eval-$m.json"
    python3 - "$W/eval-$m.json" "$m" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
out = {"compare": sys.argv[2]}
for k in ("teacher", "student"):
    s = d[k]
    out[k] = {"mean_recall": round(s["retrieval"]["mean_recall"], 4),
              "zero_shot_top1": round(s["zero_shot"]["top1"], 4),
              "parameters": s["parameters"], "bytes": s["bytes_on_disk"]}
for k in ("mean_cosine_to_teacher", "min_cosine_to_teacher", "zero_shot_agreement"):
    out[k] = round(d[k], 4)
print(json.dumps(out))
EOF
done

# The corpus as the texts: every model sees the same tokens (the default 16
# prompts have words the pruned vocabulary lacks and would be split finer).
log "7. speed: capivara bench, text tower, batch 1 and 32 (f32 and int8), on the corpus"
for m in teacher pruned student; do
    for q in none int8; do
        "$C" bench --model "$W/$m" --tower text --batch 1,32 --quantize "$q" --seconds 5 --texts "$W/corpus.txt" 2>/dev/null |
            python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"model": sys.argv[1], "quantize": sys.argv[2], "bench": d}))' "$m" "$q"
    done
    du -b "$W/$m/open_clip_model.safetensors" | awk -v m="$m" '{print "{\"model\": \"" m "\", \"weights_bytes\": " $1 "}"}'
done
log "done: $W"
