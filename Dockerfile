# One image runs every mode: operator, headless, proxy, pgbouncer-agent and webhooks.
# Debian's own python3 (3.11) with the project in a virtualenv; `make image` builds the
# same base from Debian's packages where no registry is reachable (scripts/image).
FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Only for builders behind a TLS-inspecting proxy: a CA bundle path for pip.
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/dynabase
# Dependencies first (pinned by constraints.txt), so a source change reuses this layer.
COPY constraints.txt /src/
RUN /opt/dynabase/bin/pip install ${PIP_CERT:+--cert "$PIP_CERT"} -r /src/constraints.txt
COPY pyproject.toml README.md /src/
COPY operator/ /src/operator/
RUN /opt/dynabase/bin/pip install ${PIP_CERT:+--cert "$PIP_CERT"} --no-deps /src \
 && /opt/dynabase/bin/pip uninstall -y -q pip setuptools

FROM debian:bookworm-slim
# git: `headless --source URL` and `webhooks --mode git`; pgbouncer: the agent's pools.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 git pgbouncer ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 dynabase \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/dynabase --no-create-home \
      --shell /usr/sbin/nologin dynabase \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/dynabase \
      /var/lib/dynabase/cache /var/lib/dynabase/config /var/lib/dynabase/share \
      /var/lib/dynabase/state /var/lib/dynabase/tmp /var/lib/dynabase/run
COPY --from=build /opt/dynabase /opt/dynabase
# Everything the process writes lives under /var/lib/dynabase (secrets, the Git cache,
# PgBouncer's files when no --workdir is given), so the root file system can be read-only.
ENV PATH=/opt/dynabase/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/var/lib/dynabase \
    XDG_CACHE_HOME=/var/lib/dynabase/cache \
    XDG_CONFIG_HOME=/var/lib/dynabase/config \
    XDG_DATA_HOME=/var/lib/dynabase/share \
    XDG_STATE_HOME=/var/lib/dynabase/state \
    XDG_RUNTIME_DIR=/var/lib/dynabase/run \
    TMPDIR=/var/lib/dynabase/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME /var/lib/dynabase
WORKDIR /var/lib/dynabase
USER 10001:10001
# No ENTRYPOINT: Railway's start command replaces the image's ENTRYPOINT and Kubernetes'
# `command` does too, so the whole command line is the container's command either way.
# dynabase runs as PID 1 and stops on SIGTERM itself (tests/test_image.py checks each mode).
CMD ["dynabase", "--help"]
