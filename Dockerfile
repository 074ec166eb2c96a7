# syntax=docker/dockerfile:1
# pyheadscale's container image: `docker build -t pyheadscale .` from the repository root.
# Data (database, keys) lives in the /var/lib/headscale volume; the server runs as the
# unprivileged user headscale. See docs/deployment.md ("Packaging") and
# packaging/docker/compose.yaml for a setup with PostgreSQL.
ARG PYTHON_VERSION=3.13

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pyheadscale ./pyheadscale
COPY derp ./derp
# Every dependency has a binary wheel for Linux: no compiler in this stage either.
RUN python -m venv /opt/pyheadscale \
    && /opt/pyheadscale/bin/pip install --no-cache-dir /src

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --system --gid 10001 headscale \
    && useradd --system --gid 10001 --uid 10001 --home-dir /var/lib/headscale \
        --shell /usr/sbin/nologin headscale \
    && install -d -o headscale -g headscale -m 0750 /var/lib/headscale /run/headscale \
    && install -d -m 0755 /etc/headscale
COPY --from=build /opt/pyheadscale /opt/pyheadscale
COPY packaging/docker/config.yaml /etc/headscale/config.yaml
ENV PATH="/opt/pyheadscale/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYHEADSCALE_DATA_DIR=/var/lib/headscale
WORKDIR /var/lib/headscale
USER 10001:10001
VOLUME ["/var/lib/headscale"]
# 8080: control + API (+ the relay when server_url is https); 8443: the relay's own TLS
# listener when server_url is http; 3478/udp: STUN; 9090: /metrics and /debug.
EXPOSE 8080/tcp 8443/tcp 3478/udp 9090/tcp
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"]
# `headscale serve` as the process: `docker exec <container> headscale users list` finds
# its CLI socket through the same /etc/headscale/config.yaml.
ENTRYPOINT ["headscale"]
CMD ["serve"]
