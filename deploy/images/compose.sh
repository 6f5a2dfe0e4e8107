#!/usr/bin/env bash
# Run deploy/compose.yaml with podman-compose, installed into its own virtualenv (not the project's) on first use.
#
#   deploy/images/compose.sh up | down | ps | logs [SERVICE] | config
#
# podman runs with runc and the ulimits this kind of host needs (CONTAINERS_CONF=deploy/images/containers.conf).
# With Docker instead: `docker compose -f deploy/compose.yaml up -d`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${FEDLLM_IMAGE_CACHE:-/var/cache/fedllm-images}"
VENV="$CACHE/podman-compose-venv"
export CONTAINERS_CONF="$HERE/containers.conf"
command -v podman >/dev/null || { echo "error: podman is missing; install it with: apt-get install podman runc" >&2; exit 1; }
if [[ ! -x "$VENV/bin/podman-compose" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q 'podman-compose==1.6.0'
fi
cmd="${1:-up}"; shift || true
case "$cmd" in
  up) exec "$VENV/bin/podman-compose" -f "$HERE/../compose.yaml" up -d "$@" ;;
  *) exec "$VENV/bin/podman-compose" -f "$HERE/../compose.yaml" "$cmd" "$@" ;;
esac
