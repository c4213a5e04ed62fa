#!/usr/bin/env bash
# CI, after the fast suite: a Docker engine from Debian's docker.io, the CPU image built offline from a wheelhouse
# (docker/build-offline.sh), then the container tests (`pytest -m docker`).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  nohup dockerd >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null || { tail -20 /tmp/dockerd.log; exit 1; }
fi
PATH="$PWD/.venv/bin:$PATH" bash docker/build-offline.sh
docker image prune -f >/dev/null   # the images earlier CI builds left untagged, ~2 GB each
