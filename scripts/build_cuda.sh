#!/usr/bin/env bash
# Builds `capivara` and `capivara-train` with `--features cuda` on a machine
# that has no CUDA toolkit (and no GPU), from NVIDIA's PyPI wheels: nvcc and
# the headers compile candle's kernels to PTX, the cuBLAS/cuRAND/NVRTC wheels
# are linked against, and libcuda (the driver, which only a GPU machine has)
# is replaced at link time by a stub generated from cudarc's bindings. The
# binaries then run on any machine with an NVIDIA driver for CUDA >= 13.0 and
# the CUDA 13 cuBLAS/cuRAND/NVRTC/runtime libraries on LD_LIBRARY_PATH (e.g. from the
# same wheels, or PyTorch's).
#
#   scripts/build_cuda.sh [OUT_DIR]     # default: target-cuda/bin
#
# Env: CUDA_COMPUTE_CAP (90: Hopper; 80: A100; 89: L4/4090), CUDA_VENV
# (/tmp/capivara-cuda-venv), CARGO_TARGET_DIR (target-cuda).
# A Docker build with an nvidia/cuda *devel* image needs none of this: see the
# Dockerfile's cuda stage.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target-cuda/bin}
VENV=${CUDA_VENV:-/tmp/capivara-cuda-venv}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}

# CUDA 13.0: the newest PTX a CUDA 13.0 driver (R580) accepts.
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    "nvidia-cublas>=13.0,<13.1" "nvidia-curand>=10.4,<10.4.1"
CU=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
export PATH="$CU/bin:$PATH"
nvcc --version | tail -2

# Unversioned names for the linker, and the driver stub.
LINK="$CARGO_TARGET_DIR/cuda-link"
mkdir -p "$LINK"
for lib in cublas cublasLt curand nvrtc cudart; do
    ln -sf "$(ls "$CU"/lib/lib$lib.so.* | head -1)" "$LINK/lib$lib.so"
done
cargo fetch -q  # cudarc (the stub's source) is only downloaded for --features cuda
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$CUDARC/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$LINK/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/cuda_stub.c"

export RUSTFLAGS="-L native=$LINK"
cargo build --release --workspace --features capivara/cuda
mkdir -p "$OUT"
cp "$CARGO_TARGET_DIR/release/capivara" "$CARGO_TARGET_DIR/release/capivara-train" "$OUT/"
strip "$OUT/capivara" "$OUT/capivara-train"
ls -la "$OUT"
echo "run with LD_LIBRARY_PATH holding libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13"
