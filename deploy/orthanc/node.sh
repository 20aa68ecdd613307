#!/usr/bin/env bash
# The DICOM node: Orthanc + deploy/orthanc/plugin.py (docs/deployment.md).  `make node` runs
# `node.sh run`; every step can also be run by hand:
#
#   deploy/orthanc/node.sh install   apt-get install orthanc orthanc-python dcmtk, if missing
#   deploy/orthanc/node.sh config    write $AUTOCONTOUR_NODE_DATA/orthanc.json from AUTOCONTOUR_NODE_*
#   deploy/orthanc/node.sh run       install, config, then Orthanc in the foreground (SIGTERM stops it)
#
# Variables (defaults): AUTOCONTOUR_NODE_AET (AUTOCONTOUR), _PORT (11112), _HTTP (8042),
# _ALLOWED (AET@host:port,...; required), _DEST (AET@host:port), _STABLE_S (30), _DATA (node-data)
# and more: see deploy/settings.py.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DATA=$(realpath -m "${AUTOCONTOUR_NODE_DATA:-node-data}")
export AUTOCONTOUR_NODE_DATA="$DATA"
PLUGIN_LIB=/usr/share/orthanc/plugins/libOrthancPython.so

log() { printf '[node %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }

cmd_install() {
    local missing=()
    command -v Orthanc >/dev/null || missing+=(orthanc)
    [ -f "$PLUGIN_LIB" ] || missing+=(orthanc-python)
    command -v storescu >/dev/null || missing+=(dcmtk)
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} (apt-get)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    # the package's own service is not wanted: this node runs its own Orthanc in the foreground
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    command -v Orthanc >/dev/null && [ -f "$PLUGIN_LIB" ] || die "apt-get did not install Orthanc and its Python plugin"
}

python_for_config() {  # standard library only: the system python3, else the venv's
    if command -v python3 >/dev/null; then echo python3; else echo "$ROOT/.venv/bin/python"; fi
}

cmd_config() {
    mkdir -p "$DATA"
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$(python_for_config)" -m deploy.settings "$DATA/orthanc.json"
}

check_runner() {
    case "${AUTOCONTOUR_NODE_RUNNER:-venv}" in
        venv)
            [ -x "$ROOT/.venv/bin/python" ] || die "$ROOT/.venv/bin/python not found - run 'make venv' first" ;;
        map)
            command -v podman >/dev/null || die "AUTOCONTOUR_NODE_RUNNER=map but podman is not installed - run 'make map-image' first"
            local image
            image=${AUTOCONTOUR_NODE_MAP_IMAGE:-localhost/hn-autocontour:$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/autocontour/__init__.py")-cpu}
            eval "$(bash "$ROOT/packaging/podman.sh" env)"
            podman image exists "$image" || die "AUTOCONTOUR_NODE_RUNNER=map but image $image is missing - run 'make map-image' first" ;;
    esac
}

cmd_run() {
    cmd_install
    check_runner
    cmd_config
    ulimit -s 32768 2>/dev/null || true   # Holoscan's 32 MiB stack, inherited by each run of the app
    log "starting Orthanc $(Orthanc --version 2>/dev/null | head -n1 | awk '{print $2}') (SIGTERM or Ctrl-C stops it)"
    exec Orthanc "$DATA/orthanc.json"
}

case "${1:-}" in
    install | config | run) "cmd_$1" ;;
    *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
