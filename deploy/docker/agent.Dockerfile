# continuum-agent: static musl binary on distroless/static, uid 65532.
# Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t ghcr.io/openova-io/continuum-agent:0.1.0 .
# (Not built in CI: Docker cannot run on the project's machines.)
#
# The image runs the in-cluster modes (run, continuum, node-pivot,
# pivot watch-sources). `pivot sources` needs the git CLI and `failover`
# runs next to PostgreSQL (pg_rewind): neither is meant for this image.

FROM rust:1.95-alpine AS build
RUN apk add --no-cache gcc musl-dev protoc protobuf-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p continuum-agent \
 && install -D -m 0755 target/release/continuum-agent /out/continuum-agent

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/continuum-agent /usr/local/bin/continuum-agent
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/continuum-agent"]
CMD ["run"]
