# A fhirsync node: multi-stage (build with Rust, run on Debian slim), as a
# non-root user, its data directory a volume, healthy when /readyz is.
#   docker build -t fhirsync .
#   docker run -p 8080:8080 -v fhirsync-data:/var/lib/fhirsync fhirsync
# Configuration: mount a file and pass `--config /etc/fhirsync/fhirsync.toml`
# (or the FHIRSYNC_* variables); the console needs [tls] to be served
# outside the container, so it is off unless configured.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN deploy/build.sh /out

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/fhirsync --shell /usr/sbin/nologin fhirsync \
 && install -d -o fhirsync -g fhirsync -m 0750 /var/lib/fhirsync
COPY --from=build /out/bin/fhirsync /usr/local/bin/fhirsync
USER fhirsync
VOLUME /var/lib/fhirsync
EXPOSE 8080
ENV FHIRSYNC_DATA_DIR=/var/lib/fhirsync \
    FHIRSYNC_LISTEN=0.0.0.0:8080 \
    FHIRSYNC_CONSOLE_LISTEN=off
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fhirsync"]
CMD ["serve"]
