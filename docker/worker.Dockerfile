# syntax=docker/dockerfile:1.7
# The moe-worker expert runtime on the CUDA runtime base, non-root.
#   docker build -f docker/worker.Dockerfile -t ghcr.io/moe-operator/moe-worker:0.1.0 .
# CARGO_FEATURES selects the worker's CUDA backend feature if the build gates it behind one.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04
ARG RUST_VERSION=1.95.0

# The devel image carries nvcc and the CUDA headers in case kernels are compiled at build time.
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
ARG RUST_VERSION
ARG CARGO_FEATURES=""
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
WORKDIR /src
# The whole tree (less .dockerignore): Cargo checks every target the manifest declares.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin moe-worker ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
 && install -D -m 0755 target/release/moe-worker /out/moe-worker \
 && strip /out/moe-worker

# The runtime flavour has libcudart, NVRTC and cuBLAS; the driver comes from the node
# (nvidia-container-toolkit), selected by NVIDIA_VISIBLE_DEVICES from the device plugin.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin moe
COPY --from=build /out/moe-worker /usr/local/bin/moe-worker
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
# dispatch, metrics, admin (MoEDeployment spec.worker.ports defaults) and the EP ranks' mesh
# (spec.dataPlane.port); tests/images.rs holds these to the CRD's defaults.
EXPOSE 9400 9401 9402 9403
ENTRYPOINT ["/usr/local/bin/moe-worker"]
