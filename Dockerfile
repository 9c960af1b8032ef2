# syntax=docker/dockerfile:1
# transfer-worker container image.
#   docker build -t transfer-worker .
#   docker run --rm --read-only --tmpfs /tmp -v "$PWD/storage:/app/storage_simulator" transfer-worker
# Two stages on the same exact base: `builder` makes the virtualenv and installs the pinned
# dependencies and the worker into it (the `transfer-worker` command, as `pip install .` gives
# anyone), `runtime` gets only that virtualenv. No compiler is installed: every pinned
# dependency ships a wheel for CPython 3.11 on amd64 and arm64 (`--only-binary=:all:`).
# Both stages use the same base, pinned to an exact patch release (written out in each FROM so
# hadolint, checkov and test_dockerfile.py see the tag). Pin its digest too
# (`docker buildx imagetools inspect python:3.11.17-slim-bookworm`) where a registry is reachable.

# ---------------------------------------------------------------------------------------------
FROM python:3.11.17-slim-bookworm AS builder

# pip byte-compiles what it installs, so the read-only runtime never needs to write a .pyc.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# requirements.txt is the full uv pip compile lock. pip turns hash checking on by itself when
# the lock carries hashes (`uv pip compile --generate-hashes`); --no-deps keeps anything the lock
# does not name out, and `pip check` proves the lock is complete.
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: \
        -r /tmp/requirements.txt
# The worker itself, after the dependencies so that a code change reuses their layer. --no-deps:
# the pins above are what runs; `pip check` proves they satisfy pyproject.toml's dependencies.
# The module lands in site-packages, its schema in /opt/venv/share/transfer-worker/.
COPY pyproject.toml transfer_worker.py event_schema.json /tmp/src/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/src \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------------------------
FROM python:3.11.17-slim-bookworm AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="transfer-worker" \
      org.opencontainers.image.description="Event-driven worker moving objects between AWS S3 and Google Cloud Storage, fed by SQS or Pub/Sub" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.17-slim-bookworm"

# The installers are not needed at run time: drop them from the base (fewer packages to patch).
# The unprivileged user owns only the local storage root; the code stays root-owned, read-only.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel \
    && groupadd --system --gid 1001 transfer \
    && useradd --system --uid 1001 --gid 1001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin transfer \
    && mkdir -p /app/storage_simulator \
    && chown 1001:1001 /app/storage_simulator \
    && chmod 0750 /app/storage_simulator

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    TRANSFER_WORKER_LOCAL_ROOT=/app/storage_simulator

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app

# Only /app/storage_simulator (and /tmp) are written: run with --read-only --tmpfs /tmp.
VOLUME ["/app/storage_simulator"]
USER 1001:1001
EXPOSE 8080

# Liveness without curl: urlopen raises (exit 1) on a refused connection or a non-2xx answer.
# It follows TRANSFER_WORKER_HTTP_PORT; with the port set to 0 (no HTTP) it reports unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TRANSFER_WORKER_HTTP_PORT', '8080'), timeout=3)"]

ENTRYPOINT ["transfer-worker"]
CMD ["run"]
