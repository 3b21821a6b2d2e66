# capivara: zero-shot image classification and search for multilingual CLIP.
#
#   CPU (default target):  docker build -t capivara .
#                          docker run -p 8080:8080 -v capivara-data:/data -v hf-cache:/cache capivara
#   CUDA:                  docker build --target cuda -t capivara:cuda .
#                          docker run --gpus all -p 8080:8080 -v capivara-data:/data -v hf-cache:/cache \
#                              capivara:cuda serve --dtype bf16
#
# The model comes from the Hugging Face hub into the /cache volume on first
# start (or mount a model directory and pass --model /models/NAME). The index,
# its log and the thumbnails live in the /data volume.

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------- CPU build
FROM rust:${RUST_VERSION}-bookworm AS build
# nasm: libjpeg-turbo's SIMD decoder (~3x faster on photos).
RUN apt-get update \
    && apt-get install -y --no-install-recommends nasm \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Portable x86-64 code: the matrix kernels pick AVX2 / AVX-512 at run time.
RUN cargo build --release --locked -p capivara \
    && strip target/release/capivara

# ---------------------------------------------------------------- CPU image
FROM debian:bookworm-slim AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home capivara \
    && mkdir -p /data /cache && chown capivara /data /cache
COPY --from=build /src/target/release/capivara /usr/local/bin/capivara
USER capivara
ENV CAPIVARA_ADDR=0.0.0.0:8080 \
    CAPIVARA_DATA_DIR=/data \
    HF_HOME=/cache/huggingface
VOLUME ["/data", "/cache"]
EXPOSE 8080
ENTRYPOINT ["capivara"]
CMD ["serve"]

# ---------------------------------------------------------------- CUDA build
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04 AS build-cuda
ARG RUST_VERSION
# Hopper by default; 80 for A100, 89 for L4 / RTX 40xx.
ARG CUDA_COMPUTE_CAP=90
# libcuda comes from the driver at run time; the link uses the toolkit's stub.
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    PATH=/root/.cargo/bin:${PATH} \
    RUSTFLAGS="-L native=/usr/local/cuda/lib64/stubs"
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl gcc g++ make nasm \
    && rm -rf /var/lib/apt/lists/* \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p capivara --features cuda \
    && strip target/release/capivara

# ---------------------------------------------------------------- CUDA image
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home capivara \
    && mkdir -p /data /cache && chown capivara /data /cache
COPY --from=build-cuda /src/target/release/capivara /usr/local/bin/capivara
USER capivara
ENV CAPIVARA_ADDR=0.0.0.0:8080 \
    CAPIVARA_DATA_DIR=/data \
    CAPIVARA_DEVICE=cuda \
    HF_HOME=/cache/huggingface
VOLUME ["/data", "/cache"]
EXPOSE 8080
ENTRYPOINT ["capivara"]
CMD ["serve"]

# The default target: the CPU image.
FROM cpu
