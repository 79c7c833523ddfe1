# syntax=docker/dockerfile:1
# Ferry's one image: the API by default (`python -m api`), the worker with the command
# `python -m workers`. Build from the repository root: `docker build -t ferry .`
# tests/deploy/test_dockerfile.py checks what can be checked without a container engine.

# -- Build: Ferry and its dependencies in a virtualenv, installed as `make install` installs them,
# without the test extras. Every dependency ships a binary wheel for this Python, so no compiler
# is needed here either.
FROM python:3.11.15-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the installed packages are made of (pyproject names README.md as the readme).
COPY pyproject.toml README.md ./
COPY app/ app/
COPY api/ api/
COPY workers/ workers/
RUN /opt/venv/bin/python -m pip install -q --upgrade pip \
 && /opt/venv/bin/python -m pip install -q .

# -- Run: the same base (the virtualenv's python links to its /usr/local/bin/python), the
# virtualenv, a non-root user; no build tools, no sources.
FROM python:3.11.15-slim-bookworm
# A numeric uid, so that Kubernetes' runAsNonRoot can verify it; group 0 owns the data dir
# as well, for platforms (OpenShift) that run the image under an arbitrary uid in group 0.
RUN groupadd --system --gid 10001 ferry \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /srv/ferry \
        --shell /usr/sbin/nologin ferry \
 && mkdir -p /srv/ferry/data \
 && chown -R 10001:0 /srv/ferry \
 && chmod -R g=u /srv/ferry
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv/ferry
# Listening on all interfaces inside the container (the defaults, 127.0.0.1, suit a laptop);
# the worker keeps Faust's and RocksDB's files in the data dir (a volume, or the container's
# own layer). Logs go unbuffered to stderr.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FERRY_API_HOST=0.0.0.0 \
    FERRY_WORKER_WEB_HOST=0.0.0.0 \
    FERRY_WORKER_DATA_DIR=/srv/ferry/data
USER 10001:10001
# 8080: the API (FERRY_API_PORT); 6066: the worker's health pages and /metrics (FERRY_WORKER_WEB_PORT).
EXPOSE 8080 6066
# No HEALTHCHECK: the two commands answer on different ports, and Kubernetes probes
# /health/live and /health/ready itself. Both processes handle SIGTERM (a graceful stop) as PID 1.
CMD ["python", "-m", "api"]
