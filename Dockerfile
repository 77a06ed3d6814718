# Bulwark in a container: a multi-stage build on Debian slim.
#
#   docker build -t bulwark .                              # without a browser
#   docker build -t bulwark --build-arg WITH_CHROMIUM=true .   # for `webdriver` endpoints
#   docker run --rm bulwark --help
#
# The image runs `bulwark` as an unprivileged user in /var/lib/bulwark (a volume: the
# embedded SQLite database lives there unless `database`/BULWARK_DB names PostgreSQL).
# Stop it with SIGTERM (docker stop): a worker finishes the calls in flight, releases its
# leases and exits 143; give it a grace period longer than your slowest adapter call.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p bulwark-cli --bin bulwark \
 && install -D -m 0755 target/release/bulwark /out/bulwark \
 && /out/bulwark man --dir /out/man \
 && /out/bulwark completions bash > /out/bulwark.bash

FROM debian:${DEBIAN}-slim
ARG WITH_CHROMIUM=false
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && if [ "$WITH_CHROMIUM" = "true" ]; then \
        apt-get install -y --no-install-recommends chromium chromium-driver; \
    fi \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /var/lib/bulwark bulwark
COPY --from=build /out/bulwark /usr/local/bin/bulwark
COPY --from=build /out/man/ /usr/local/share/man/man1/
COPY --from=build /out/bulwark.bash /usr/share/bash-completion/completions/bulwark
USER bulwark
WORKDIR /var/lib/bulwark
VOLUME ["/var/lib/bulwark"]
# 8800: `bulwark serve` (dashboard, /metrics); 9100: `worker --metrics-listen`.
EXPOSE 8800 9100
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "bulwark"]
CMD ["worker", "--config", "/etc/bulwark/bulwark.toml"]
