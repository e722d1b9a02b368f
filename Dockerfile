# syntax=docker/dockerfile:1.7
# Multi-stage build of both Weir binaries.
#   docker build --target operator -t ghcr.io/weir-dev/weir-operator:0.1.0 .
#   docker build --target agent    -t ghcr.io/weir-dev/weir-agent:0.1.0 .
# The agent links nothing from CUDA at build time (cudarc loads libcuda,
# NVRTC and cuBLAS at run time), so one Rust builder serves both images.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weir-operator -p weir-agent \
 && mkdir -p /out \
 && cp target/release/weir-operator target/release/weir-agent /out/

# The operator needs only glibc and CA certificates.
FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=builder /out/weir-operator /usr/local/bin/weir-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weir-operator"]
CMD ["run"]

# The agent runs on GPU nodes: the CUDA runtime image brings NVRTC and
# cuBLAS; the NVIDIA container toolkit mounts libcuda and NVML from the host.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/weir/models && chown 65532:65532 /var/lib/weir/models
COPY --from=builder /out/weir-agent /usr/local/bin/weir-agent
ENV LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/weir-agent"]
CMD ["serve"]
