# syntax=docker/dockerfile:1
# Outrigger container image.
#
#   docker build -t outrigger:dev .
#   docker run --rm -p 9901:9901 outrigger:dev
#
# Two stages: the build stage installs the package (its request path compiled
# with mypyc) and its wheels into a virtualenv; the final stage carries only that venv on python:3.11-slim, runs
# as an unprivileged numeric user (so runAsNonRoot can verify it) and has no
# shell tools the sidecar needs: lifecycle hooks use `outrigger sleep` and
# `outrigger wait-ready` instead of sh/curl.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_COLOR=1
WORKDIR /src
# A C compiler for mypyc, which compiles the request path at install time (setup.py: about a
# quarter less CPU per request). Only this stage has it; the final stage copies the venv.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
# .dockerignore keeps tests, .git, venvs, caches and local builds out of this context.
COPY . /src
# The (empty) dead-letter spool directory, copied below owned by the runtime user.
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir . && mkdir -m 0700 /src/.dead-letter

FROM ${PYTHON_IMAGE}
ARG VERSION=0.0.0-dev
ARG SOURCE_URL=https://github.com/outrigger-proxy/outrigger
LABEL org.opencontainers.image.title="outrigger" \
      org.opencontainers.image.description="Resilience sidecar: timeouts, retries with budgets, circuit breaking, rate limiting" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# The admin server must listen on all interfaces in a container so that the
# kubelet's probes and Prometheus can reach it; the config reads this variable.
# Bytecode is compiled at install time, so nothing is written at run time and
# the root filesystem can be mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OUTRIGGER_ADMIN_ADDRESS=0.0.0.0:9901

COPY --from=build /opt/venv /opt/venv
# dead_letter.dir of the shipped deploy configs: writable by the non-root user even
# when nothing is mounted there (Kubernetes and compose mount a volume over it).
COPY --from=build --chown=65532:65532 /src/.dead-letter /var/lib/outrigger/dead-letter
COPY config/outrigger.yaml /etc/outrigger/outrigger.yaml

# 65532 is the conventional "nonroot" uid/gid of distroless images.
USER 65532:65532
EXPOSE 9901
ENTRYPOINT ["outrigger"]
CMD ["run", "--config", "/etc/outrigger/outrigger.yaml"]
