# syntax=docker/dockerfile:1
# Build: docker build -t hexgate .   Run: see docker-compose.yml
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY vendor ./vendor
COPY examples ./examples
RUN cargo build --release --locked --bin hexgate --example backend \
 && strip target/release/hexgate target/release/examples/backend

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home hexgate
COPY --from=build /src/target/release/hexgate /usr/local/bin/hexgate
COPY --from=build /src/target/release/examples/backend /usr/local/bin/hexgate-example-backend
USER 10001
EXPOSE 8000 9901
HEALTHCHECK --interval=10s --timeout=2s CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
ENTRYPOINT ["hexgate"]
CMD ["run", "--consul-key", "hexgate/config"]
