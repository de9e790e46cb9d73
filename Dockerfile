# shardlake worker image: a release build on Debian 12, run from distroless (glibc, CA
# certificates, no shell, user 65532). The pipeline YAML and its schemas are baked in under
# /etc/shardlake; set SHARDLAKE_PIPELINE (or pass `run PATH`) to use another one, e.g. from a
# mounted volume.
#
#   docker build -t shardlake .
#   docker run --rm -e AWS_REGION=eu-west-1 -e SHARDLAKE_STREAM=... shardlake
#
# The build stage writes nothing outside its WORKDIR, so that scripts/dockerfile-build-stage
# can run its COPY and RUN steps by hand in a scratch directory (scripts/test does, with a
# cheaper optimisation level); tests/python/test_deploy_template_task_role_and_dockerfile.py
# checks the runtime stage: the files it copies, and that its command and health check parse as
# the binary expects.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them: a stub crate with the
# real manifest and lock file, and a stub for every [[bench]] the manifest names (Cargo
# refuses a manifest whose targets have no file).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin benches \
    && echo 'fn main() {}' > src/bin/shardlake.rs \
    && echo 'fn main() {}' > src/bin/shardlake-agent.rs \
    && for b in $(sed -n '/^\[\[bench\]\]/{n;s/^name = "\(.*\)"$/\1/p;}' Cargo.toml); do \
           echo 'fn main() {}' > "benches/$b.rs"; done \
    && touch src/lib.rs \
    && cargo build --release --locked --bin shardlake \
    && rm -rf src benches
COPY src src
COPY benches benches
# `shardlake demo` embeds the example pipeline and schema (include_str!).
COPY pipelines pipelines
COPY schemas schemas
RUN touch src/lib.rs src/bin/shardlake.rs \
    && cargo build --release --locked --bin shardlake \
    && target/release/shardlake --version

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/shardlake /usr/local/bin/shardlake
COPY pipelines /etc/shardlake/pipelines
COPY schemas /etc/shardlake/schemas
ENV SHARDLAKE_LOG_FORMAT=json \
    SHARDLAKE_LISTEN=0.0.0.0:9090 \
    SHARDLAKE_SHUTDOWN_BUDGET=25 \
    SHARDLAKE_PIPELINE=/etc/shardlake/pipelines/well-telemetry-aws.yaml
EXPOSE 9090
USER 65532:65532
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s CMD ["/usr/local/bin/shardlake", "health"]
ENTRYPOINT ["/usr/local/bin/shardlake"]
CMD ["run"]
