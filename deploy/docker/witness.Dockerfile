# continuum-witness: static musl binary on distroless/static, uid 65532.
# Build from the repository root:
#   docker build -f deploy/docker/witness.Dockerfile -t ghcr.io/openova-io/continuum-witness:0.1.0 .
# (Not built in CI: Docker cannot run on the project's machines.)

FROM rust:1.95-alpine AS build
RUN apk add --no-cache gcc musl-dev protoc protobuf-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p continuum-witness \
 && install -D -m 0755 target/release/continuum-witness /out/continuum-witness

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/continuum-witness /usr/local/bin/continuum-witness
USER 65532:65532
# Embedded store; mount a volume here.
VOLUME ["/var/lib/continuum-witness"]
EXPOSE 7443 7080
ENTRYPOINT ["/usr/local/bin/continuum-witness"]
CMD ["serve"]
