# smartcover service image: Python 3.11, the dependencies of requirements.lock (every hash
# checked), the source, and a non-root user. docker-compose.yml builds it; by default it
# runs `smartcover serve`, and any other subcommand can be given instead:
#
#   docker build -t smartcover:local .
#   docker run --rm smartcover:local --help
#
# uid/gid 10001 run the service; the broker's files are written by jobs running as
# 1883:1883, the uid of the `mosquitto` user in eclipse-mosquitto:2 (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first, so this layer is rebuilt only when the lock changes. --no-deps:
# the lock is complete, and nothing may come in without a hash.
COPY requirements-pip.lock requirements.lock ./
RUN pip install --require-hashes -r requirements-pip.lock \
    && pip install --require-hashes --no-deps -r requirements.lock

# The source on PYTHONPATH rather than an installed wheel: building a wheel would fetch
# the build backend (hatchling) from PyPI with no hash to check it against.
COPY core/ core/
COPY ingest/ ingest/
COPY alerting/ alerting/
COPY device_sim/ device_sim/
COPY api/ api/
COPY smartcover/ smartcover/
# The ACL template, the default of `smartcover devices passwords --acl-template`.
COPY mosquitto/acl mosquitto/acl
RUN printf '#!/bin/sh\nexec python -m smartcover "$@"\n' > /usr/local/bin/smartcover \
    && chmod 0755 /usr/local/bin/smartcover \
    && python -m compileall -q core ingest alerting device_sim api smartcover

# Mount points of the named volumes: a new volume takes the owner and mode of the
# directory it is mounted on, so these decide who may write the spool and the broker's files.
RUN groupadd --system --gid 10001 smartcover \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin smartcover \
    && install -d -o 10001 -g 10001 -m 0755 /var/lib/smartcover \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/smartcover/spool \
    && install -d -o 1883 -g 1883 -m 0700 /var/lib/smartcover/broker

USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["smartcover"]
CMD ["serve"]
