#!/usr/bin/env bash
# Build the slimlm image the way an air-gapped site does: every Python package from a wheelhouse made here on the
# host, nothing fetched by the build itself, and a minimal Debian base made with debootstrap when no base image
# is at hand. Builds and runs use the host's network stack (--network host), so no container traffic leaves it.
#
#   docker/build-offline.sh                 # CPU image slimlm:cpu on a Debian bookworm base made here
#   BASE=python:3.11-slim docker/build-offline.sh                 # or on a base image the host already has
#   BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime TORCH= TAG=slimlm:gpu docker/build-offline.sh
#
# Settings (environment): TAG (slimlm:cpu); BASE (empty: make slimlm-base:bookworm with debootstrap);
# TORCH, the torch requirement put in the wheelhouse (torch==2.13.0+cpu; the CPU build, which pip finds in a
# --find-links folder or on PyPI's CPU index, PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; empty
# to use the base image's own torch); EXTRAS, slimlm extras to include (e.g. "llama"); MIRROR, the Debian mirror;
# PYTHON, the host Python that makes the wheelhouse (python3; its version must be the base image's).
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${TAG:-slimlm:cpu}
BASE=${BASE:-}
TORCH=${TORCH-torch==2.13.0+cpu}
EXTRAS=${EXTRAS:-}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm   # its python3 is 3.11, the Python the host's wheels are built for; use the host's own Python version
t0=$(date +%s)

python_tag() { ${PYTHON:-python3} -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'; }

if [ -z "$BASE" ]; then
  BASE=slimlm-base:$SUITE
  if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap), or set BASE to an image the host has" >&2; exit 2; }
    rootfs=$(mktemp -d /var/tmp/slimlm-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "making $BASE with debootstrap ($SUITE from $MIRROR)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$MIRROR" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
  fi
fi
base_python=$(docker run --rm --network host "$BASE" python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$base_python" != "$(python_tag)" ]; then
  echo "the base image has Python $base_python and this host $(python_tag): wheels built here would not install there" >&2
  exit 2
fi

# The wheelhouse: slimlm's dependencies, and setuptools to build slimlm itself in the image. Made again only when
# what it is made from changes, so an unchanged one leaves Docker's cached dependency layer valid.
inputs=$(cat pyproject.toml; echo "$EXTRAS $TORCH $(python_tag)")
stamp=$(printf '%s' "$inputs" | sha256sum | cut -c1-16)
if [ "$(cat docker/wheels/inputs 2>/dev/null)" != "$stamp" ]; then
  echo "wheelhouse: the dependencies of slimlm${EXTRAS:+[$EXTRAS]} into docker/wheels/"
  find docker/wheels -name '*.whl' -delete
  ${PYTHON:-python3} -m pip wheel -q --wheel-dir docker/wheels ".${EXTRAS:+[$EXTRAS]}" setuptools wheel ${TORCH:+"$TORCH"}
  rm -f docker/wheels/slimlm-*.whl   # built in the image from the source, in the layer after the dependencies
  [ -n "$TORCH" ] || rm -f docker/wheels/torch-*.whl   # the base image's torch serves
  (cd docker/wheels && ls ./*.whl | sed 's|^\./|/wheels/|') > docker/wheels/requirements.txt
  echo "$stamp" > docker/wheels/inputs
fi

echo "building $TAG on $BASE"
DOCKER_BUILDKIT=0 docker build -q --network host --build-arg BASE="$BASE" --build-arg INSTALL=wheelhouse \
  --build-arg EXTRAS="$EXTRAS" -t "$TAG" . >/dev/null
echo "built $TAG in $(( $(date +%s) - t0 )) s: $(docker image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}')"
