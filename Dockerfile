# The kurrier image: one image for every component.
#
#   docker build -t kurrier .                 # the production image (last stage)
#   docker build --target dev -t kurrier .    # what the Tiltfile builds: live-updatable
#
# Containers run `kurrier ingress|queue|delivery|operator` as the numeric,
# non-root user 10001 and need no writable path except /tmp (mount an emptyDir
# there with readOnlyRootFilesystem, as the Helm chart does).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------
# builder: wheels for kurrier and every dependency, installed into a venv.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies first, so that a code change does not download them again:
# a placeholder package lets pip resolve the project's dependencies from
# pyproject.toml alone; its own wheel is thrown away. (Both trees become the
# one `kurrier` package, so one placeholder file: two would collide.)
COPY pyproject.toml README.md ./
RUN mkdir -p services/kurrier operator/kurrier \
    && touch services/kurrier/_placeholder.py \
    && pip wheel --wheel-dir /wheels . \
    && rm -f /wheels/kurrier-*.whl \
    && rm -rf services operator

COPY services/ services/
COPY operator/ operator/
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/kurrier/venv \
    && /opt/kurrier/venv/bin/pip install --no-index --find-links /wheels kurrier \
    && /opt/kurrier/venv/bin/pip uninstall --yes pip \
    && /opt/kurrier/venv/bin/kurrier --help >/dev/null

# ---------------------------------------------------------------------------
# base: the runtime, shared by the dev and the production stages.
FROM ${PYTHON_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/kurrier/venv \
    PATH=/opt/kurrier/venv/bin:$PATH

RUN groupadd --system --gid 10001 kurrier \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/kurrier \
       --create-home --shell /usr/sbin/nologin kurrier

# The venv's python points at /usr/local/bin/python3.11 of the same base image.
COPY --from=builder /opt/kurrier/venv /opt/kurrier/venv

WORKDIR /home/kurrier
# SMTP, submission, SMTPS (unprivileged; the Service maps 25/587/465),
# queue gRPC, and /healthz + /metrics.
EXPOSE 2525 2587 2465 7070 9090

ENTRYPOINT ["kurrier"]
CMD ["--help"]

# ---------------------------------------------------------------------------
# dev: the Tiltfile's target. Live update syncs services/kurrier and
# operator/kurrier into the installed package, so it must be writable by the
# runtime user (the chart's dev values turn readOnlyRootFilesystem off).
FROM base AS dev
RUN chown -R 10001:10001 /opt/kurrier/venv/lib/python3.11/site-packages/kurrier
USER 10001:10001

# ---------------------------------------------------------------------------
# runtime: the production image (the default, last stage). Root owns every
# file; the process runs as 10001 and can change nothing but /tmp.
FROM base AS runtime
LABEL org.opencontainers.image.title="kurrier" \
      org.opencontainers.image.description="A Kubernetes-native SMTP relay" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
