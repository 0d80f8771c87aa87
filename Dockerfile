# One image for both roles: `kubenova controller` and `kubenova agent`.
# Built here without a Docker engine by hack/build-image.sh (buildah, from a locally made base);
# `docker build .` works the same where Docker and Docker Hub are available.
ARG BASE=docker.io/library/debian:bookworm-slim

# --- build: the wheels of kubenova and of every dependency (libvirt-python compiles here) ---
FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc pkg-config libvirt-dev \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Where the package index sits behind a TLS proxy, hack/build-image.sh mounts the machine's CA bundle
# for the build's RUN steps only and names it here; it never lands in an image layer.
ARG PIP_CERT=
COPY pyproject.toml constraints.txt README.md /src/
COPY operator /src/operator
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --upgrade pip wheel \
 && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels -c /src/constraints.txt /src

# --- run: Python, the libvirt client library and qemu-img; no compiler, no pip cache ---
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libvirt0 qemu-utils ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python3 -m venv /opt/kubenova \
 && /opt/kubenova/bin/pip install --no-cache-dir --no-index --find-links /wheels kubenova \
 && /opt/kubenova/bin/pip uninstall -y setuptools pip
ENV PATH=/opt/kubenova/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The controller runs as this user; the agent's DaemonSet runs it as root because it uses the host's
# libvirt socket and writes the instances' files the host's QEMU opens.
USER 65532:65532
ENTRYPOINT ["kubenova"]
CMD ["--help"]
