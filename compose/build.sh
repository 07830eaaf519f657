#!/usr/bin/env bash
# Build the meshsync image with no network: `pip wheel` on this host fills a wheelhouse
# (the only step that may download), then `docker build --network none` installs from it.
#
#   compose/build.sh                                   # meshsync:<version>, public Python base
#   MESH_BASE_IMAGE=debian-py:bookworm compose/build.sh
#
# Environment: MESH_IMAGE (tag), MESH_BASE_IMAGE (the Dockerfile's BASE), MESH_WHEELHOUSE
# (default .cache/wheelhouse, git-ignored), PYTHON (runs pip; its Python minor version
# must be the image's, as the wheels are built for it), DOCKER (the docker command).
# MESH_BUILD_NETWORK: the build's network, `none` when MESH_BASE_IMAGE is set (a base
# with lsyncd and rsync needs no other), else `default`: the public base gets them from apt.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
docker=${DOCKER:-docker}
version=$("$python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import mesh; print(mesh.__version__)' "$root")
image=${MESH_IMAGE:-meshsync:$version}
wheels=${MESH_WHEELHOUSE:-$root/.cache/wheelhouse}

mkdir -p "$wheels"
# The project is rebuilt every time; its dependencies come from the wheelhouse when there.
"$python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" \
  --find-links "$wheels" "$root"

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/wheels" "$context/lsyncd"
cp "$wheels"/*.whl "$context/wheels/"
cp "$root/compose/Dockerfile" "$context/"
cp "$root/lsyncd/lsyncd.conf.lua.tmpl" "$root/lsyncd/gate.pl" "$context/lsyncd/"

network=${MESH_BUILD_NETWORK:-$([ -n "${MESH_BASE_IMAGE:-}" ] && echo none || echo default)}
args=(build --network "$network" --tag "$image" --file "$context/Dockerfile")
if [ -n "${MESH_BASE_IMAGE:-}" ]; then args+=(--build-arg "BASE=$MESH_BASE_IMAGE"); fi
# The classic builder: it is in every engine, and --network applies to every RUN.
DOCKER_BUILDKIT=0 $docker "${args[@]}" "$context"
echo "built $image"
