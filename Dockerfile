# srsrelay: RTMP in (1935/tcp), WHEP + player page + API (1985/tcp), WebRTC media (8000/udp).
#
#   docker build -t srsrelay .
#   docker run --rm -p 1935:1935 -p 1985:1985 -p 8000:8000/udp \
#     -e SRSRELAY_RTC_CANDIDATES=<IP viewers reach the host at> srsrelay
#
# The configuration is /etc/srsrelay/relay.toml (a copy of conf/relay.toml): mount your own
# over it (-v ./relay.toml:/etc/srsrelay/relay.toml:ro) or override any key with
# SRSRELAY_<SECTION>_<KEY> variables. `docker kill -s HUP` reloads it.
# No system FFmpeg is needed: the PyAV wheel bundles its own.

# -- builder: a virtual environment with srsrelay and its dependencies ---------------------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /usr/src/srsrelay
COPY pyproject.toml README.md ./
COPY srsrelay ./srsrelay
# Kept to these two exec-form steps: tests/test_docker_install.py runs them as written.
RUN ["python", "-m", "venv", "/opt/srsrelay"]
RUN ["/opt/srsrelay/bin/pip", "install", "."]

# -- final: the runtime only, as an unprivileged user ----------------------------------------
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PATH=/opt/srsrelay/bin:$PATH

RUN useradd --system --no-create-home --shell /usr/sbin/nologin srsrelay
COPY --from=builder /opt/srsrelay /opt/srsrelay
COPY conf/relay.toml /etc/srsrelay/relay.toml

USER srsrelay
WORKDIR /
EXPOSE 1935/tcp 1985/tcp 8000/udp
# The slim image has no curl. /api/v1/health answers whatever api.access is.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SRSRELAY_HTTP_PORT', '1985') + '/api/v1/health', timeout=4)"]
CMD ["srsrelay", "-c", "/etc/srsrelay/relay.toml"]
