#!/usr/bin/env bash
# The GPU check: one prepared command for a machine with an NVIDIA GPU,
# PyTorch and nvcc but no Rust and no network. It takes the CUDA build made
# on a machine that has Rust (or builds it there when cargo is present), and
#
#   1. generates the full-size random-weight model with PyTorch there
#      (scripts/gen_fixtures.py's generate_full, as compare_torch.py does);
#   2. checks parity: capivara f32 on the GPU vs open_clip fp32 (max |diff|
#      <= 1e-4), capivara f16 and bf16 vs open_clip fp32 (cosine >= 0.999);
#   3. measures throughput per tower and batch, capivara vs PyTorch fp16 and
#      bf16 on the same GPU (scripts/compare_torch.py --device cuda);
#   4. runs one trainer fit step on the GPU (synthetic shards, features with
#      the frozen image tower, `fit --max-steps 1`, bf16 frozen weights).
#
# Everything it prints and writes lands in $OUT (default ./gpu-check-out):
# gpu_check.log, compare.md, compare.json, fit.json, summary.txt. It exits
# non-zero when a step fails; each step has its own time limit and the whole
# runs in about 5 minutes on one H200 (budget: 8).
#
#   scripts/gpu_check.sh --prepare   # here (Rust, network to PyPI): the CUDA
#                                    # build (scripts/build_cuda.sh) and the
#                                    # Python wheels the GPU machine lacks,
#                                    # into .gpu-bundle/ (about 40 MB)
#   scripts/gpu_check.sh             # there, with .gpu-bundle/ beside it
#
# Env: GPU_CHECK_DEVICE (cuda; `cpu` runs the same steps on the CPU as a dry
# run of the script itself), GPU_CHECK_MODEL (a model directory instead of
# the generated full-size one), CAPIVARA_BIN_DIR (a directory with capivara
# and capivara-train instead of the bundle's), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BUNDLE=$REPO/.gpu-bundle
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
    # Here: a CUDA 13 build (runs where the driver is >= 580 and CUDA 13
    # libraries are present: PyTorch's cu130 wheels bring them) and the
    # pure-Python wheels compare_torch.py needs beyond the GPU image's
    # packages (open_clip and ftfy with its wcwidth).
    # Always through cargo (incremental: quick when nothing changed), so
    # that the bundle is this checkout's code.
    scripts/build_cuda.sh target-cuda/bin
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels"
    for b in capivara capivara-train; do
        gzip -9 -c "target-cuda/bin/$b" >"$BUNDLE/$b.gz"
    done
    $PY -m pip download -q --no-deps --only-binary=:all: -d "$BUNDLE/wheels" \
        "$(grep -E '^open_clip_torch==' scripts/requirements.txt)" \
        "$(grep -E '^ftfy==' scripts/requirements.txt)" wcwidth==0.2.14
    (cd "$BUNDLE" && git -C "$REPO" rev-parse HEAD >commit && sha256sum capivara.gz capivara-train.gz >SHA256SUMS)
    du -sh "$BUNDLE"
    echo "ready: carry .gpu-bundle and run scripts/gpu_check.sh on the GPU machine"
    exit 0
fi

DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
declare -a RESULTS=()
failed=0
step() { # step NAME SECONDS CMD...: runs CMD under a time limit, records the outcome
    local name=$1 limit=$2 t0 rc=0
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${limit}s) [$(($(date +%s) - START)) s in]"
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    RESULTS+=("$name: $([ $rc = 0 ] && echo ok || echo "FAILED (exit $rc)") in $(($(date +%s) - t0)) s")
    [ $rc = 0 ] || failed=1
    return $rc
}
summary() {
    {
        echo "gpu_check on $(hostname), $(date -u +%FT%TZ), commit $(cat "$BUNDLE/commit" 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo '?')"
        printf '%s\n' "${RESULTS[@]}"
        echo "total $(($(date +%s) - START)) s"
    } | tee "$OUT/summary.txt"
}
trap summary EXIT

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || [ "$DEVICE" = cpu ]
$PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

# Python packages the GPU image lacks, from the bundle's wheels.
if ! $PY -c 'import open_clip, ftfy' 2>/dev/null; then
    [ -d "$BUNDLE/wheels" ] || { echo "open_clip is missing and there is no .gpu-bundle/wheels (run --prepare here)"; exit 1; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The binaries: CAPIVARA_BIN_DIR, else the bundle's, else a build here.
if [ -n "${CAPIVARA_BIN_DIR:-}" ]; then
    BIN=$CAPIVARA_BIN_DIR
elif [ -f "$BUNDLE/capivara.gz" ]; then
    BIN=$WORK/bin
    mkdir -p "$BIN"
    (cd "$BUNDLE" && sha256sum -c --quiet SHA256SUMS)
    for b in capivara capivara-train; do gzip -dc "$BUNDLE/$b.gz" >"$BIN/$b" && chmod +x "$BIN/$b"; done
elif command -v cargo >/dev/null; then
    step "CUDA build here" 1800 scripts/build_cuda.sh "$WORK/bin"
    BIN=$WORK/bin
else
    echo "no CUDA build: run scripts/gpu_check.sh --prepare on a machine with Rust and carry .gpu-bundle"
    exit 1
fi

# The CUDA 13 libraries the build links (cuBLAS, cuRAND, NVRTC, runtime):
# from the nvidia-* wheels PyTorch brings, whatever their layout.
if [ "$DEVICE" != cpu ]; then
    LIBS=$($PY - <<'EOF'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
try:
    import torch
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
except ImportError:
    pass
dirs = []
for r in roots:
    for pat in ("libcublas.so.13*", "libcublasLt.so.13*", "libcurand.so.10*", "libnvrtc.so.13*", "libcudart.so.13*"):
        for f in glob.glob(os.path.join(r, "nvidia", "**", pat), recursive=True):
            d = os.path.dirname(f)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
EOF
)
    export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
"$BIN/capivara" --version

# 1. The model.
if [ -n "${GPU_CHECK_MODEL:-}" ]; then
    MODEL=$(cd "$GPU_CHECK_MODEL" && pwd)
else
    MODEL=$WORK/cache/full-size-random
    step "generate the full-size random model" 240 $PY -c "
import sys; sys.path.insert(0, 'scripts')
from pathlib import Path
import compare_torch
print(compare_torch.ensure_default_model(Path('$WORK/cache')))"
fi

# 2 + 3. Parity and throughput (compare_torch.py exits non-zero when
# capivara f32 is over 1e-4 from open_clip or f16/bf16 under cosine 0.999).
if [ "$DEVICE" = cpu ]; then
    CMP=(--device cpu --no-onnx --no-int8 --no-bf16 --image-batches 1,8 --text-batches 1,8 --seconds 0.3)
else
    CMP=(--device "$DEVICE" --dtypes f16,bf16 --seconds 1 --iters 5 --warmup 3)
fi
step "parity and throughput (compare_torch.py)" 300 \
    $PY scripts/compare_torch.py --model "$MODEL" --capivara "$BIN/capivara" "${CMP[@]}" \
    --cache-dir "$WORK/cache" --json "$OUT/compare.json" >"$OUT/compare.md" || true
cat "$OUT/compare.md"

# 4. One trainer step on the device.
DT=$([ "$DEVICE" = cpu ] && echo f32 || echo bf16)
step "trainer: synth + features + fit 1 step ($DEVICE, $DT)" 180 bash -c "
set -e
'$BIN/capivara-train' synth --out '$WORK/shards' --shards 1 --per-shard 64 >/dev/null
'$BIN/capivara-train' features --model '$MODEL' --device $DEVICE --shards '$WORK/shards/00000.tar' \
    --out '$WORK/feats' --batch-size 64 >'$OUT/features.json'
'$BIN/capivara-train' fit --model '$MODEL' --device $DEVICE --dtype $DT --shards '$WORK/shards/00000.tar' \
    --features '$WORK/feats' --out '$WORK/run' --max-steps 1 --warmup-steps 0 --batch-size 32 \
    --micro-batch 32 --val-every 0 --checkpoint-every 0 --no-progress >'$OUT/fit.json'
cat '$OUT/fit.json'" || true

rm -rf "$WORK"
exit $failed
