# The Postern relay in a container: the postern binary on Google's distroless "cc" image
# (glibc and libgcc, no shell, no package manager), running as an unprivileged user.
#
#   docker build -t postern .
#   docker compose -f deploy/docker-compose.yml run --rm relay relay setup --domain relay.example.org
#   docker compose -f deploy/docker-compose.yml up -d
#
# The configuration, secret and ACME certificates live in the volume at
# /var/lib/postern-relay ($STATE_DIRECTORY). See docs/volunteer-guide.md.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p postern \
 && install -D -m 0755 target/release/postern /out/usr/local/bin/postern \
 && install -d -m 0700 /out/var/lib/postern-relay

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/postern /usr/local/bin/postern
COPY --from=build --chown=65532:65532 /out/var/lib/postern-relay /var/lib/postern-relay
ENV STATE_DIRECTORY=/var/lib/postern-relay POSTERN_LOG=info
VOLUME ["/var/lib/postern-relay"]
EXPOSE 80 443 5222
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/postern"]
CMD ["relay", "--config", "/var/lib/postern-relay/relay.toml"]
