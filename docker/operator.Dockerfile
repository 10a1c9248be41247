# syntax=docker/dockerfile:1.7
# The moe-operator controller image: a static-ish Rust binary on distroless, non-root.
#   docker build -f docker/operator.Dockerfile -t ghcr.io/moe-operator/moe-operator:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The whole tree (less .dockerignore): Cargo checks every target the manifest declares.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin moe-operator \
 && install -D -m 0755 target/release/moe-operator /out/moe-operator \
 && strip /out/moe-operator

# glibc + libgcc only, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/moe-operator /usr/local/bin/moe-operator
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/moe-operator"]
CMD ["run"]
