# nbd-csi: one image for the storage node (`python -m storage_node`) and the CSI plugin
# (`python -m csi`, controller and node modes). What is in it and why: docs/image.md.
#
#   docker build -t nbd-csi .
#   bash scripts/build-image.sh          (buildah, from a Debian base made locally by mmdebstrap)
#
# BASE_IMAGE must be Debian 12 (bookworm): both stages use it, so the venv built in the first
# stage finds the same /usr/bin/python3 (Debian's 3.11) in the second.
ARG BASE_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------
# build: wheels of this project and of its dependencies, installed into /opt/nbd-csi.
FROM ${BASE_IMAGE} AS build

# ARG, not ENV: apt's frontend setting is for the build only and stays out of the image.
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A CA bundle for pip where the network intercepts TLS; scripts/build-image.sh passes the host's
# (its PIP_CERT) mounted read-only for the build only. Unset by default. Build stage only.
ARG PIP_CERT

# Versions come from the Debian 12 release the base is built from; pinning them here would
# break the build on every Debian point release without making it more reproducible.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# pip (from Debian's ensurepip) lives in a venv of its own, never in the image's venv.
RUN python3 -m venv /opt/pip

WORKDIR /src
COPY image-requirements.txt pyproject.toml README.md ./
COPY csi ./csi
COPY storage_node ./storage_node

# The dependencies are exactly image-requirements.txt (scripts/lock-image-deps.sh makes it from
# pyproject.toml): one version of each, downloaded as published wheels and checked against the
# sha256 hashes there (--require-hashes; --only-binary, so nothing is compiled here and every
# file is one PyPI published). Our own wheel is built from /src without its dependencies. Then
# the image's venv, without pip, gets exactly those wheels, again checked by hash, and nothing
# from the network; pip check proves the lock covers what pyproject.toml asks for.
RUN /opt/pip/bin/pip wheel --no-cache-dir --require-hashes --only-binary=:all: \
        --wheel-dir /wheels -r image-requirements.txt \
    && /opt/pip/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/own . \
    && python3 -m venv --without-pip /opt/nbd-csi \
    && /opt/pip/bin/pip --python /opt/nbd-csi/bin/python install --no-cache-dir \
        --no-index --find-links /wheels --require-hashes -r image-requirements.txt \
    && /opt/pip/bin/pip --python /opt/nbd-csi/bin/python install --no-cache-dir \
        --no-index --no-deps /wheels/own/nbd_csi-*.whl \
    && /opt/pip/bin/pip --python /opt/nbd-csi/bin/python check \
    && /opt/nbd-csi/bin/python -c 'import csi.__main__, storage_node.__main__'

# ---------------------------------------------------------------------------------------------
# final: Debian's python3 and the tools the programs run, plus the venv. No compilers,
# debuggers, pip or caches.
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="nbd-csi" \
      org.opencontainers.image.description="CSI driver for KubeVirt VM block volumes served over NBD: storage node and CSI plugin" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# qemu-utils: qemu-img for image import (storage node). e2fsprogs, xfsprogs, util-linux,
# mount: format, grow and mount volumes (node plugin, which attaches devices over netlink by
# itself; nbd-client stays for checking a device by hand). kmod: modprobe nbd in the chart's
# init container. cryptsetup-bin: LUKS2 of encrypted volumes (node plugin). python3: Debian's
# 3.11.
# Not pinned, as in the build stage: the Debian 12 release of the base decides the versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 \
        ca-certificates \
        qemu-utils \
        nbd-client \
        e2fsprogs \
        xfsprogs \
        util-linux \
        mount \
        kmod \
        cryptsetup-bin \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log

# An account for the storage node and the controller, and the image's default user (USER
# below, by number so that runAsNonRoot can check it). The node plugin overrides it to root in
# the chart (runAsUser: 0): it is privileged to attach and mount.
RUN groupadd --system --gid 65532 nbd-csi \
    && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/nbd-csi \
        --no-create-home --shell /usr/sbin/nologin nbd-csi \
    && install -d -o 65532 -g 65532 -m 0750 /var/lib/nbd-csi

COPY --from=build /opt/nbd-csi /opt/nbd-csi

ENV PATH=/opt/nbd-csi/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /var/lib/nbd-csi
USER 65532:65532

# The program is the first argument: `storage_node ...` or `csi --mode controller|node ...`,
# the same module names as `python -m` in the README (docs/image.md).
ENTRYPOINT ["/opt/nbd-csi/bin/python", "-m"]
CMD ["storage_node", "--help"]
