# One image for both roles: `kubenova controller` and `kubenova agent`.
# Built here without a Docker engine by hack/build-image.sh (buildah, from a locally made base);
# `docker build .` works the same where Docker and Docker Hub are available.
ARG BASE=docker.io/library/debian:bookworm-slim

# --- build: kubenova and every dependency in a venv (libvirt-python compiles here) ---
FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc pkg-config libvirt-dev \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# Where the package index sits behind a TLS proxy, hack/build-image.sh mounts the machine's CA bundle
# for the build's RUN steps only and names it here; it never lands in an image layer.
ARG PIP_CERT=
COPY pyproject.toml constraints.txt README.md /src/
# The dependencies first (libvirt-python compiles here), so a change to kubenova's code alone
# reuses this layer.
RUN python3 -m venv /opt/kubenova \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
    | /opt/kubenova/bin/pip install --no-cache-dir -c /src/constraints.txt -r /dev/stdin \
 && cd /opt/kubenova/lib/python3.11/site-packages/kubernetes && rm -rf aio \
 && /opt/kubenova/bin/python -m compileall -q -b . && find . -name '*.py' -delete \
 && find . -name __pycache__ -prune -exec rm -rf {} +
# The official client is most of the image: kubernetes/aio (68 MB) is its asyncio twin, which nothing here
# imports (kopf talks to the apiserver through aiohttp, kubenova through the synchronous client), and the
# rest is shipped compiled only (the same bytecode, 31 MB of generated source less; a traceback through it
# names files and lines without quoting them).
COPY operator /src/operator
RUN /opt/kubenova/bin/pip install --no-cache-dir --no-deps /src \
 && /opt/kubenova/bin/pip uninstall -y setuptools pip

# --- rootfs: Python, the libvirt client library and qemu-img from Debian; hack/image-rootfs.sh copies out
# only what they and the venv's compiled modules run (no shell, no package manager, no perl) ---
FROM ${BASE} AS rootfs
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libvirt0 qemu-utils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY hack/image-rootfs.sh /usr/local/bin/image-rootfs
# buildah's layer cache does not compare what COPY --from takes from another stage; hack/build-image.sh
# passes a digest of the build stage's inputs, so changed code always gives a new image.
ARG SOURCE_DIGEST=unknown
COPY --from=build /opt/kubenova /opt/kubenova
RUN bash /usr/local/bin/image-rootfs /rootfs /opt/kubenova

# --- run: that root file system and the venv, from scratch ---
FROM scratch
ARG SOURCE_DIGEST=unknown
LABEL io.kubenova.source-digest=${SOURCE_DIGEST}
COPY --from=rootfs /rootfs /
# The same base and Python in both stages, so the venv works where it lands.
COPY --from=build /opt/kubenova /opt/kubenova
ENV PATH=/opt/kubenova/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The controller runs as this user; the agent's DaemonSet runs it as root because it uses the host's
# libvirt socket and writes the instances' files the host's QEMU opens.
USER 65532:65532
ENTRYPOINT ["kubenova"]
CMD ["--help"]
