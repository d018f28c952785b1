#!/usr/bin/env bash
# Build the nbd-csi image with buildah (chroot isolation, no daemon) from a Debian 12 base made
# on this machine by mmdebstrap, then check that both programs start inside it:
#
#   bash scripts/build-image.sh [--tag NAME] [--rebuild-base] [--no-check]
#
#   --tag NAME       image to build (default localhost/nbd-csi:dev)
#   --rebuild-base   make the base image again even if buildah already has it
#   --no-check       skip running `python3 -m storage_node --help` / `python3 -m csi --help`
#
# The base (localhost/nbd-csi-base:bookworm) is `mmdebstrap --variant=minbase bookworm` with
# docs, man pages and locales left out like debian:bookworm-slim; it is imported into buildah's
# storage once and reused. NBD_CSI_DEBIAN_MIRROR overrides the Debian mirror
# (default http://deb.debian.org/debian; security updates come from .../debian-security).
# Needs root and a machine where buildah works; installs buildah and mmdebstrap if missing.
# If PIP_CERT names a CA bundle (a network that intercepts TLS), pip in the build uses it too.
# Prints the build time and the image size; docs/image.md explains the image.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

tag=localhost/nbd-csi:dev
base=localhost/nbd-csi-base:bookworm
rebuild_base=0
check=1
while (($#)); do
    case $1 in
    --tag)
        tag=${2:?--tag needs a name}
        shift 2
        ;;
    --rebuild-base)
        rebuild_base=1
        shift
        ;;
    --no-check)
        check=0
        shift
        ;;
    -h | --help)
        sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "build-image: unknown argument: $1" >&2
        exit 2
        ;;
    esac
done

log() { printf 'build-image: %s\n' "$*" >&2; }

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "need root to install: ${missing[*]}"
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export BUILDAH_ISOLATION=chroot
started=$SECONDS

if ((rebuild_base)) || ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    mirror=${NBD_CSI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
    workdir=$(mktemp -d)
    trap 'rm -rf "$workdir"' EXIT
    log "making the base with mmdebstrap from $mirror"
    # The dpkg path filters stay in the base (/etc/dpkg/dpkg.cfg.d/), so packages the
    # Dockerfile installs leave out their docs too, as on debian:bookworm-slim.
    # merged-usr hook: /usr is merged by the hook itself, so usrmerge (and perl with it) is not
    # installed into the base.
    mmdebstrap --variant=minbase --mode=root --format=tar \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        bookworm "$workdir/rootfs.tar" \
        "deb $mirror bookworm main" \
        "deb $mirror bookworm-updates main" \
        "deb ${mirror%/debian}/debian-security bookworm-security main" \
        </dev/null >&2
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$workdir/rootfs.tar" / >/dev/null
    buildah config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd /bin/bash \
        --label org.opencontainers.image.description="Debian 12 minbase made by mmdebstrap" \
        "$ctr"
    buildah commit --rm "$ctr" "$base" >/dev/null
    log "base $base made in $((SECONDS - started)) s"
fi

# pip inside the build trusts what pip here trusts: if PIP_CERT (pip's own variable) names a CA
# bundle, it is mounted read-only into the build's RUN steps and named to pip there. It is
# never copied into a layer.
build_opts=()
if [[ -n ${PIP_CERT:-} && -f $PIP_CERT ]]; then
    log "pip in the build uses the CA bundle $PIP_CERT (PIP_CERT)"
    build_opts+=(--volume "$(realpath "$PIP_CERT"):/run/nbd-csi-build/ca.crt:ro")
    build_opts+=(--build-arg PIP_CERT=/run/nbd-csi-build/ca.crt)
fi

build_started=$SECONDS
log "building $tag from $base"
buildah build --isolation=chroot --layers --pull=never "${build_opts[@]}" \
    --build-arg BASE_IMAGE="$base" \
    --tag "$tag" \
    --file Dockerfile . >&2
log "image built in $((SECONDS - build_started)) s ($((SECONDS - started)) s in all)"

if ((check)); then
    ctr=$(buildah from --pull=never "$tag")
    status=0
    for program in storage_node csi; do
        log "checking: python3 -m $program --help"
        if ! buildah run "$ctr" -- python3 -m "$program" --help >/dev/null; then
            log "python3 -m $program --help failed inside $tag"
            status=1
        fi
    done
    # The tools the programs and the chart's init containers run (docs/image.md).
    for tool in modprobe chown mkfs.ext4 mkfs.xfs resize2fs xfs_growfs blkid mount umount \
        qemu-img; do
        if ! buildah run "$ctr" -- sh -c "command -v $tool" >/dev/null; then
            log "$tool is not in $tag"
            status=1
        fi
    done
    log "checked: the programs' tools are on PATH"
    buildah rm "$ctr" >/dev/null
    ((status == 0)) || exit "$status"
fi

buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$tag" | sed 's/^/build-image: size /' >&2
echo "$tag"
