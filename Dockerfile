# wsgate's container image: the binary built in a Rust builder stage, run from a distroless base (no shell, no
# package manager) as a non-root user. See docs/deploy.md.
#
#   docker build -t wsgate .
#   docker run --rm -p 8080:8080 wsgate demo --listen 0.0.0.0:8080
#   docker run --rm -p 8080:8080 -v "$PWD/wsgate.toml:/etc/wsgate/wsgate.toml:ro" wsgate

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin wsgate \
    && install -D -m 0755 target/release/wsgate /out/wsgate

# glibc and libgcc, which the binary links; "nonroot" runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wsgate /usr/local/bin/wsgate
USER nonroot:nonroot
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wsgate"]
CMD ["run", "--config", "/etc/wsgate/wsgate.toml"]
