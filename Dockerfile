# srsrelay: RTMP in (1935/tcp), WHEP + player page (1985/tcp), WebRTC media (8000/udp).
# Set SRSRELAY_RTC_CANDIDATES to the address viewers reach the host at, e.g.
#   docker run -p 1935:1935 -p 1985:1985 -p 8000:8000/udp \
#     -e SRSRELAY_RTC_CANDIDATES=192.0.2.10 srsrelay
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /usr/src/srsrelay
COPY pyproject.toml README.md ./
COPY srsrelay ./srsrelay
RUN pip install . \
    && useradd --system --no-create-home --shell /usr/sbin/nologin srsrelay

COPY conf/relay.toml /etc/srsrelay/relay.toml

USER srsrelay
WORKDIR /
EXPOSE 1935/tcp 1985/tcp 8000/udp
CMD ["srsrelay", "-c", "/etc/srsrelay/relay.toml"]
