# syntax=docker/dockerfile:1
#
# Rigshift broker image: `rigshift broker serve` on python:3.11-slim, as a non-root user.
#
# Build from the repository root (the build context must be the root, not this folder;
# broker.Dockerfile.dockerignore beside this file keeps the context small):
#
#   docker build -f deploy/docker/broker.Dockerfile -t rigshift/broker:0.1.0 .
#
# Ports: 50051 gRPC (clients, agents, grpc.health.v1), 9464 Prometheus /metrics and /sd.
# Data:  /var/lib/rigshift (--home: uploaded working-directory archives; SQLite if no --db).
# The same image runs `rigshift broker migrate --db URL` and every other `rigshift` command.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/rigshift from the hash-pinned lock ------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/rigshift
WORKDIR /src
# Dependencies first (their layer is reused while only the project's code changes).
COPY requirements.lock ./
RUN /opt/rigshift/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY worker_agent ./worker_agent
COPY client ./client
COPY rigshift ./rigshift
COPY harness ./harness
COPY rigshift_cli ./rigshift_cli
RUN /opt/rigshift/bin/pip install --no-cache-dir --no-deps . \
    && /opt/rigshift/bin/rigshift --help > /dev/null

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 rigshift \
    && useradd --system --uid 10001 --gid rigshift --home-dir /var/lib/rigshift \
        --shell /usr/sbin/nologin rigshift \
    && install -d -o rigshift -g rigshift -m 0750 /var/lib/rigshift
COPY --from=build /opt/rigshift /opt/rigshift
ENV PATH=/opt/rigshift/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RIGSHIFT_HEALTH_ADDR=127.0.0.1:50051
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /var/lib/rigshift
EXPOSE 50051 9464
# The standard gRPC health check (grpc.health.v1.Health/Check, overall service ""), inline so
# the image needs no grpc_health_probe binary. Exit 0 = SERVING, 1 = anything else or no answer.
# RIGSHIFT_HEALTH_ADDR points it elsewhere when --listen is not on port 50051.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;a=os.environ.get('RIGSHIFT_HEALTH_ADDR','127.0.0.1:50051');s=g.HealthStub(grpc.insecure_channel(a)).Check(h.HealthCheckRequest(),timeout=3).status;print(a,h.HealthCheckResponse.ServingStatus.Name(s));sys.exit(s!=h.HealthCheckResponse.SERVING)"]
# SQLite under /var/lib/rigshift unless --db is given; production passes
# --db postgresql+psycopg://USER:PASSWORD@HOST:5432/rigshift (see docs/ops.md).
CMD ["rigshift", "broker", "serve", "--listen", "0.0.0.0:50051", "--home", "/var/lib/rigshift", "--metrics-listen", "0.0.0.0:9464"]
