#!/usr/bin/env bash
# Builds the stagerun images (docker/README.md): the operator and the trainer, tagged with the package version, and
# writes each as an OCI archive that any registry client can push.
#
#   docker/build.sh [options] [operator] [trainer]     # both when neither is named
#
# Options:
#   --engine E        buildah | docker | auto (default: docker where its daemon answers, else buildah)
#   --base B          public | debian | auto (default): public = python:3.11-slim from Docker Hub; debian = a base
#                     made here from Debian's packages with mmdebstrap or debootstrap (root; cached by a key of its
#                     recipe; buildah or docker); auto = public when it can be pulled, else debian
#   --registry R      image names R/stagerun-operator and R/stagerun-trainer (default: ghcr.io/stagerun, the
#                     chart's default image.repository)
#   --tag T           image tag (default: the version in pyproject.toml, the chart's appVersion)
#   --out DIR         where the OCI archives go (default: dist/images); --no-archive writes none
#   --compression C   of the archives' layers (buildah): gzip (default; every registry and runtime), zstd
#                     (several times faster to write; containerd 1.5+, Docker 23+), none
#   --build-arg K=V   passed to both builds (repeatable), e.g. TORCH_SPEC=torch==2.11.0, TORCH_INDEX_URL=...
#   --build-ca FILE   a CA bundle pip and uv trust during the build only (a TLS-inspecting proxy); mounted as a
#                     build secret, never stored in an image. Default: the host's /etc/ssl/certs/ca-certificates.crt
#                     when it exists; `none` for none
#   --print-names     print "<image> <archive>" per image and build nothing
#
# Environment: STORAGE_DRIVER (buildah; default overlay), STAGERUN_IMAGE_CACHE (scratch space for the Debian base's
# root filesystem; default ~/.cache/stagerun-images), DEBIAN_MIRROR, DEBIAN_SUITE (default bookworm: Python 3.11).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -n 1)
PUBLIC_PYTHON=docker.io/library/python:3.11-slim
REGISTRY=ghcr.io/stagerun
TAG=$VERSION
OUT=$ROOT/dist/images
ENGINE=auto
BASE=auto
ARCHIVE=1
COMPRESSION=gzip
PRINT=0
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
BUILD_ARGS=()
TARGETS=()
CACHE=${STAGERUN_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stagerun-images}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
export STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}

die() { echo "docker/build.sh: $*" >&2; exit 2; }
note() { echo "==> $*" >&2; }

while (($#)); do
  case $1 in
    --engine) ENGINE=${2:?--engine needs buildah, docker or auto}; shift ;;
    --base) BASE=${2:?--base needs public, debian or auto}; shift ;;
    --registry) REGISTRY=${2:?--registry needs a name prefix}; shift ;;
    --tag) TAG=${2:?--tag needs a tag}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --no-archive) ARCHIVE=0 ;;
    --compression) COMPRESSION=${2:?--compression needs gzip, zstd or none}; shift ;;
    --build-arg) BUILD_ARGS+=(--build-arg "${2:?--build-arg needs KEY=VALUE}"); shift ;;
    --build-ca) CA_BUNDLE=${2:?--build-ca needs a file or none}; shift ;;
    --print-names) PRINT=1 ;;
    operator|trainer) TARGETS+=("$1") ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see docker/build.sh --help)" ;;
  esac
  shift
done
((${#TARGETS[@]})) || TARGETS=(operator trainer)
[[ -n $VERSION ]] || die "no version = \"...\" line in $ROOT/pyproject.toml"
case $BASE in public|debian|auto) ;; *) die "--base must be public, debian or auto, not '$BASE'" ;; esac
case $COMPRESSION in gzip|zstd|none) ;; *) die "--compression must be gzip, zstd or none, not '$COMPRESSION'" ;; esac

image_name() { echo "$REGISTRY/stagerun-$1:$TAG"; }
archive_path() { echo "$OUT/stagerun-$1-$TAG.oci.tar"; }

if ((PRINT)); then
  for target in "${TARGETS[@]}"; do echo "$(image_name "$target") $(archive_path "$target")"; done
  exit 0
fi

# -- the engine ---------------------------------------------------------------------------------------------------
if [[ $ENGINE == auto ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v buildah >/dev/null 2>&1; then ENGINE=buildah
  else die "neither a running Docker engine nor buildah: apt-get install -y buildah mmdebstrap (as root)"
  fi
fi
case $ENGINE in
  buildah) command -v buildah >/dev/null 2>&1 || die "buildah is not installed: apt-get install -y buildah" ;;
  docker) docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)" ;;
  *) die "--engine must be buildah, docker or auto, not '$ENGINE'" ;;
esac

# The CA bundle is a build secret: BuildKit and buildah mount it at /run/secrets/build-ca for the RUN steps that ask
# for it and never write it to a layer (tests/test_images.py checks the images for it).
SECRET=()
if [[ $CA_BUNDLE != none ]]; then
  [[ -f $CA_BUNDLE ]] && SECRET=(--secret "id=build-ca,src=$CA_BUNDLE") \
    || { [[ $CA_BUNDLE == /etc/ssl/certs/ca-certificates.crt ]] || die "--build-ca $CA_BUNDLE: no such file"; }
fi

image_exists() {
  if [[ $ENGINE == buildah ]]; then buildah inspect --type image "$1" >/dev/null 2>&1
  else docker image inspect "$1" >/dev/null 2>&1
  fi
}

pull() {
  if [[ $ENGINE == buildah ]]; then timeout 300 buildah pull --quiet "$1" >/dev/null 2>&1
  else timeout 300 docker pull --quiet "$1" >/dev/null 2>&1
  fi
}

# -- the Debian base (when the public Python image cannot be pulled) -------------------------------------------------
# What python:3.11-slim gives the Dockerfiles: Python 3.11 with `python` and `pip` on PATH (a venv: Debian's own
# Python refuses pip installs into the system), CA certificates, apt.
DEBIAN_PACKAGES=python3,python3-venv,ca-certificates

# mmdebstrap where installed (apt's parallel downloads: about twice as fast), else debootstrap.
BOOTSTRAP=$(command -v mmdebstrap >/dev/null 2>&1 && echo mmdebstrap || echo debootstrap)

make_debian_rootfs() {  # $1: a folder that does not exist yet
  local options=(--variant=minbase --include="$DEBIAN_PACKAGES")
  # mmdebstrap's merged-usr hook merges /usr as debootstrap does, with usr-is-merged instead of the usrmerge package
  # (which pulls in perl: 50 MB).
  [[ $BOOTSTRAP == mmdebstrap ]] && options+=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
  "$BOOTSTRAP" "${options[@]}" "$DEBIAN_SUITE" "$1" "$DEBIAN_MIRROR" >&2
  chroot "$1" python3 -m venv /opt/base-venv
  chroot "$1" /opt/base-venv/bin/python -m pip --version >/dev/null
  # What a container image does not carry: the package cache, apt lists (apt-get update fetches them), logs.
  rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* "$1"/var/log/* "$1"/tmp/* "$1"/root/.cache
}

debian_base() {  # prints the base image's name, making it when its key is not in the engine's storage yet
  local key name work
  # The key is a hash of everything the base depends on, the recipe's own text included: edit it and it rebuilds.
  key=$( { declare -f make_debian_rootfs; echo "$BOOTSTRAP $DEBIAN_PACKAGES $DEBIAN_SUITE $DEBIAN_MIRROR"; uname -m; } \
    | sha256sum | cut -c1-16)
  name=localhost/stagerun-python-base:$DEBIAN_SUITE-$key
  if image_exists "$name"; then note "Debian base $name (cached)"; echo "$name"; return; fi
  command -v "$BOOTSTRAP" >/dev/null 2>&1 || die "no mmdebstrap or debootstrap: apt-get install -y mmdebstrap"
  [[ $(id -u) == 0 ]] || die "making the Debian base needs root ($BOOTSTRAP, chroot): run as root or --base public"
  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  note "making the Debian base $name with $BOOTSTRAP ($DEBIAN_SUITE, $DEBIAN_MIRROR; about a minute)"
  make_debian_rootfs "$work/rootfs"
  tar --numeric-owner --xattrs -C "$work/rootfs" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$work/rootfs.tar" .
  local path=/opt/base-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  if [[ $ENGINE == buildah ]]; then
    local c
    c=$(buildah from scratch)
    buildah add --quiet "$c" "$work/rootfs.tar" / >/dev/null
    buildah config --env PATH=$path --env LANG=C.UTF-8 --cmd python3 \
      --label org.opencontainers.image.description="Debian $DEBIAN_SUITE, Python 3 in a venv (stagerun build base)" "$c"
    buildah commit --quiet --rm "$c" "$name" >/dev/null
  else
    docker import --change "ENV PATH=$path" --change "ENV LANG=C.UTF-8" --change 'CMD ["python3"]' \
      "$work/rootfs.tar" "$name" >/dev/null
  fi
  echo "$name"
}

case $BASE in
  auto)
    if image_exists "$PUBLIC_PYTHON" || pull "$PUBLIC_PYTHON"; then BASE=public
    else note "cannot pull $PUBLIC_PYTHON: building from a Debian base instead"; BASE=debian
    fi ;;
  public)
    image_exists "$PUBLIC_PYTHON" || pull "$PUBLIC_PYTHON" || die "cannot pull $PUBLIC_PYTHON (try --base debian)" ;;
esac
BASE_ARGS=(--build-arg "PYTHON_IMAGE=$PUBLIC_PYTHON")
TRAINER_ARGS=()
if [[ $BASE == debian ]]; then
  BASE_ARGS=(--build-arg "PYTHON_IMAGE=$(debian_base)")
  # Debian's Python keeps its C headers (which triton compiles its GPU launchers against) in a package of their own.
  TRAINER_ARGS=(--build-arg "SYSTEM_PACKAGES=gcc libc6-dev python3-dev")
fi

# -- the builds ----------------------------------------------------------------------------------------------------
# What the images install from the build context, as digests (the Dockerfiles' ARG STAGERUN_SOURCE and
# STAGERUN_DEPENDENCIES): buildah's layer cache does not look into bind mounts, and would otherwise reuse an install
# step whose source has changed.
source_digest() {
  (cd "$ROOT" && find pyproject.toml README.md core trainer operator -type f ! -path '*/__pycache__/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}
BASE_ARGS+=(--build-arg "STAGERUN_SOURCE=$(source_digest)"
  --build-arg "STAGERUN_DEPENDENCIES=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)")

build() {  # $1: operator | trainer
  local name args=("${BASE_ARGS[@]}")
  name=$(image_name "$1")
  [[ $1 == trainer ]] && args+=("${TRAINER_ARGS[@]}")
  args+=("${BUILD_ARGS[@]}" "${SECRET[@]}" -f "$ROOT/docker/$1.Dockerfile" -t "$name")
  note "building $name ($ENGINE)"
  local start=$SECONDS
  if [[ $ENGINE == buildah ]]; then
    # --layers: unchanged steps (the base, torch) are reused from the last build; --isolation chroot: no user
    # namespace needed, so it also runs inside a container; --network host: the build's downloads use the host's.
    buildah bud --layers --isolation chroot --network host \
      --ignorefile "$ROOT/docker/$1.Dockerfile.dockerignore" "${args[@]}" "$ROOT" >&2
  else
    DOCKER_BUILDKIT=1 docker build "${args[@]}" "$ROOT" >&2
  fi
  note "built $name in $((SECONDS - start)) s"
  if ((ARCHIVE)); then
    local archive
    archive=$(archive_path "$1")
    mkdir -p "$OUT"
    rm -f "$archive"
    start=$SECONDS
    if [[ $ENGINE == buildah ]]; then
      local compress=(--compression-format "$COMPRESSION")
      [[ $COMPRESSION == none ]] && compress=(--disable-compression)
      buildah push --quiet "${compress[@]}" "$name" "oci-archive:$archive:$name" >/dev/null
    else
      # Docker 25+ writes an OCI image layout (with the Docker manifest beside it), its layers uncompressed:
      # --compression is buildah's.
      docker save -o "$archive" "$name"
    fi
    note "wrote $archive in $((SECONDS - start)) s"
  fi
}

for target in "${TARGETS[@]}"; do build "$target"; done

echo "images:"
for target in "${TARGETS[@]}"; do
  name=$(image_name "$target")
  if [[ $ENGINE == buildah ]]; then size=$(buildah images --format '{{.Size}}' "$name" | head -n 1)
  else size=$(docker image inspect --format '{{.Size}}' "$name" | numfmt --to=si)
  fi
  line="  $name  $size"
  ((ARCHIVE)) && line+="  $(archive_path "$target") ($(du -h "$(archive_path "$target")" | cut -f1))"
  echo "$line"
done
