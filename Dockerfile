# One image runs `dynabase operator`, `dynabase headless`, `dynabase proxy` and
# `dynabase pgbouncer-agent`. Dependencies are pinned by constraints.txt.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator/ operator/
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim-bookworm
# PgBouncer for the agent sidecar; nothing else from apt.
RUN apt-get update \
 && apt-get install -y --no-install-recommends pgbouncer \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 dynabase \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin dynabase
COPY --from=build /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --no-index --find-links /wheels -c /tmp/constraints.txt dynabase \
 && rm -rf /wheels /tmp/constraints.txt
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
ENTRYPOINT ["dynabase"]
CMD ["--help"]
