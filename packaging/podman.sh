#!/usr/bin/env bash
# Build and run the MAP's CPU image with podman: no Docker daemon, no buildx, no registry here
# (see docs/packaging.md and shared/docs/container-build.md).  Called by `make map-image` and
# `make map-run`; every step can also be run by hand:
#
#   packaging/podman.sh tools    install podman, buildah, runc, debootstrap (apt-get) if missing
#   packaging/podman.sh config   write the private podman config under $MAP_PODMAN_DIR
#   packaging/podman.sh base     make the Debian 12 base image with debootstrap, if missing
#   packaging/podman.sh wheels   pip download the runtime wheels into $MAP_CONTEXT/wheels
#   packaging/podman.sh build    all of the above, then podman build (no network in RUN steps)
#   packaging/podman.sh run      run the image on $MAP_INPUT, results in $MAP_OUTPUT
#   packaging/podman.sh save     podman save the image to $MAP_CONTEXT/../hn-autocontour-<version>-cpu.tar
#   packaging/podman.sh env      print the CONTAINERS_* variables, for running podman by hand
#
# The context ($MAP_CONTEXT, default build/map) must have been rendered first (`make package`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONTEXT=$(realpath -m "${MAP_CONTEXT:-$ROOT/build/map}")
STATE=$(realpath -m "${MAP_PODMAN_DIR:-$ROOT/build/podman}")   # podman config + image storage
INPUT=$(realpath -m "${MAP_INPUT:-$ROOT/sample/ct}")
OUTPUT=$(realpath -m "${MAP_OUTPUT:-$ROOT/build/map-output}")
BASE_IMAGE=${MAP_BASE_IMAGE:-localhost/hn-autocontour-base:bookworm}
PY=${PY:-$ROOT/.venv/bin/python}                              # the host Python that runs pip download
[ -x "$PY" ] || PY=python3

export CONTAINERS_CONF="$STATE/containers.conf"
export CONTAINERS_STORAGE_CONF="$STATE/storage.conf"

log() { printf '[podman.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

version() {
    [ -f "$CONTEXT/.map-context" ] || die "$CONTEXT is not a rendered MAP context: run 'make package' first"
    sed -n 's/^ *"version": "\(.*\)",$/\1/p' "$CONTEXT/.map-context" | head -n1
}
image() { echo "${MAP_IMAGE:-localhost/hn-autocontour:$(version)-cpu}"; }

cmd_tools() {
    local missing=()
    for t in podman buildah runc debootstrap; do command -v "$t" >/dev/null || missing+=("$t"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]} (apt-get)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq podman buildah runc debootstrap uidmap >/dev/null
}

cmd_config() {
    mkdir -p "$STATE/storage" "$STATE/run" "$STATE/tmp"
    # crun refuses this host's hybrid cgroup layout: runc.  Without CAP_SYS_RESOURCE the default
    # rlimits fail: stay at or below the host's hard limits.
    # (--ulimit on the command line replaces this whole list, hence Holoscan's 32 MiB stack here.)
    local nofile nproc
    nofile=$(ulimit -Hn)
    [ "$nofile" = unlimited ] && nofile=1048576
    nproc=$(ulimit -Hu)
    { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
    cat >"$STATE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$STATE/run"
EOF
    cat >"$STATE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc", "stack=33554432:33554432"]
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
image_copy_tmp_dir = "$STATE/tmp"
EOF
}

debian_mirror() {
    local m
    m=$(grep -hs -m1 -E '^URIs: .*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -n1)
    [ -n "$m" ] || m=$(grep -hs -m1 -E '^deb .*/debian/? bookworm' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}' | head -n1)
    echo "${m:-http://deb.debian.org/debian}"
}

cmd_base() {
    if podman image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE exists"
        return 0
    fi
    local rootfs="$STATE/rootfs" mirror t0=$SECONDS
    mirror=$(debian_mirror)
    log "making $BASE_IMAGE: debootstrap --variant=minbase bookworm (python3, python3-venv) from $mirror"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$STATE/debootstrap.log" >&2; die "debootstrap failed (log: $STATE/debootstrap.log)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
    tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE made in $((SECONDS - t0)) s"
}

cmd_wheels() {
    local req="$CONTEXT/pip/requirements.txt" dir="$CONTEXT/wheels" stamp sum t0=$SECONDS
    [ -f "$req" ] || die "$req missing: run 'make package' first"
    mkdir -p "$dir"
    stamp="$dir/.requirements.sha256"
    sum=$(sha256sum "$req" | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
        log "wheels for $req already in $dir"
        return 0
    fi
    # Same interpreter line as the image (CPython 3.11, glibc 2.36 on Debian 12), so the host's
    # pip picks wheels that install there.  Binary wheels only: nothing is compiled in the image.
    "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need CPython 3.11 (the image has Debian 12 python3), not {sys.version}"' \
        || die "pip download needs a Python 3.11 host interpreter (set PY=...)"
    log "pip download -r pip/requirements.txt -> $dir"
    "$PY" -m pip download --quiet --only-binary=:all: --dest "$dir" -r "$req" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$sum" >"$stamp"
    log "wheels: $(ls "$dir"/*.whl | wc -l) files, $(du -sh "$dir" | cut -f1), in $((SECONDS - t0)) s"
}

cmd_build() {
    local img t0=$SECONDS
    img=$(image)
    cmd_tools
    cmd_config
    cmd_base
    cmd_wheels
    log "podman build -t $img $CONTEXT (no network)"
    podman build --pull=never --network=none --layers --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t "$img" -f "$CONTEXT/Dockerfile" "$CONTEXT"
    log "built $img in $((SECONDS - t0)) s ($(podman image inspect --format '{{.Size}}' "$img" | awk '{printf "%.0f MB", $1/1e6}'))"
}

cmd_run() {
    local img t0=$SECONDS rc=0
    img=$(image)
    cmd_config
    podman image exists "$img" || die "image $img not found: run 'make map-image' first"
    [ -d "$INPUT" ] || die "input folder $INPUT does not exist"
    mkdir -p "$OUTPUT"
    log "podman run $img: $INPUT -> /var/holoscan/input (read-only), $OUTPUT -> /var/holoscan/output"
    # --user: results belong to whoever runs this; the image's MAP folders accept any uid.
    # The 32 MiB stack Holoscan asks for comes from containers.conf (cmd_config).  No network.
    podman run --rm --network=none --user "$(id -u):$(id -g)" \
        -v "$INPUT:/var/holoscan/input:ro" -v "$OUTPUT:/var/holoscan/output" \
        "$img" "$@" || rc=$?
    log "exit code $rc after $((SECONDS - t0)) s; $OUTPUT holds: $(ls -A "$OUTPUT" | tr '\n' ' ')"
    return "$rc"
}

cmd_save() {
    local img tar
    img=$(image)
    cmd_config
    tar="$(dirname "$CONTEXT")/hn-autocontour-$(version)-cpu.tar"
    # docker-archive: what both `docker load` and `podman load` read
    podman save --quiet --format docker-archive -o "$tar" "$img"
    log "saved $img to $tar ($(du -sh "$tar" | cut -f1)); load it with 'podman load -i' or 'docker load -i'"
}

cmd_env() {
    echo "export CONTAINERS_CONF=$CONTAINERS_CONF CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
}

case "${1:-}" in
    tools | config | base | wheels | build | save | env) "cmd_$1" ;;
    run) shift; cmd_run "$@" ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
