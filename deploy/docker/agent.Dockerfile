# syntax=docker/dockerfile:1
#
# Rigshift worker agent image: `rigshift agent run` on the NVIDIA CUDA runtime base, with
# Python 3.11 from the deadsnakes PPA, as a non-root user in the `video` group.
#
# Build from the repository root (agent.Dockerfile.dockerignore beside this file applies):
#
#   docker build -f deploy/docker/agent.Dockerfile -t rigshift/agent:0.1.0 .
#
# Real GPUs need the NVIDIA Container Toolkit on the host (`docker run --gpus all …`, or the
# NVIDIA device plugin on Kubernetes); the base image already sets NVIDIA_VISIBLE_DEVICES and
# NVIDIA_DRIVER_CAPABILITIES=compute,utility (utility is what NVML needs). Without GPUs,
# `--simulate RTX3090x4` runs simulated ones. The agent only dials out: no inbound port,
# except 9465 for Prometheus when `--metrics-listen` is set.

ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# --- base: CUDA runtime + Python 3.11 ---------------------------------------------------------
FROM ${CUDA_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 22.04 ships Python 3.10; deadsnakes has 3.11. Pinning apt versions of a PPA is not
# practical, the CUDA base tag pins the rest.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*

# --- build: a virtual environment in /opt/rigshift from the hash-pinned lock ------------------
FROM base AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3.11 -m venv /opt/rigshift
WORKDIR /src
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
FROM base
# `video` (GID 44 on Ubuntu) owns /dev/nvidia* where the runtime does not open them to all.
RUN groupadd --system --gid 10001 rigshift \
    && useradd --system --uid 10001 --gid rigshift --groups video \
        --home-dir /var/lib/rigshift --shell /usr/sbin/nologin rigshift \
    && install -d -o rigshift -g rigshift -m 0750 /var/lib/rigshift /var/lib/rigshift/agent
COPY --from=build /opt/rigshift /opt/rigshift
ENV PATH=/opt/rigshift/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RIGSHIFT_AGENT_METRICS_ADDR=127.0.0.1:9465
USER 10001:10001
WORKDIR /var/lib/rigshift
EXPOSE 9465
# Healthy while the agent's Prometheus endpoint answers (so run it with --metrics-listen, and
# point RIGSHIFT_AGENT_METRICS_ADDR at that address when it is not 127.0.0.1:9465).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3.11", "-c", "import os,sys,urllib.request as u;a=os.environ.get('RIGSHIFT_AGENT_METRICS_ADDR','127.0.0.1:9465');r=u.urlopen('http://'+a+'/metrics',timeout=3);print(a,r.status);sys.exit(r.status!=200)"]
# The enrollment token (`rigshift farm create NAME --json` → enrollment_token) comes from
# $RIGSHIFT_ENROLLMENT_TOKEN or --token. Compose and Kubernetes replace this whole command.
CMD ["rigshift", "agent", "run", "--broker", "broker:50051", "--metrics-listen", "127.0.0.1:9465", "--state-dir", "/var/lib/rigshift/agent"]
