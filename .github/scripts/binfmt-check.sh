#!/usr/bin/env bash
# binfmt-check.sh [ENTRY]: can the kernel Docker runs containers on execute amd64 binaries the way
# KFP's MLMD pod needs it? Exit 0 if so, 1 with the reason if not.
# tonistiigi/binfmt exits 0 even when a registration fails (it only logs the error), and the failure
# would otherwise surface 20 minutes later as an MLMD Deployment that never becomes Available.
#
# Where it looks:
# - no ENTRY (how `make kfp` calls it): in Docker's kernel, through a throwaway privileged container
#   that mounts binfmt_misc itself if needed, as tonistiigi/binfmt does. That is the host's kernel on
#   Linux and the VM's on Docker Desktop, where a macOS host has no /proc at all. The container runs
#   the kind node image of kind-config.yaml (already pulled for the cluster, and it has a shell; the
#   binfmt image has none); BINFMT_READER_IMAGE overrides it, DOCKER the docker command.
# - ENTRY (e.g. /proc/sys/fs/binfmt_misc/qemu-x86_64): in that directory on this machine.
#
# What passes: the qemu-x86_64 entry (what BINFMT_IMAGE registers), else Docker Desktop's `rosetta`
# entry (its "Use Rosetta for x86_64/amd64 emulation"), that says `enabled` and whose flags contain
# F (fix binary: the kernel opens the interpreter at registration, so it also works inside the kind
# node's containers, where the interpreter's path does not exist). tonistiigi/binfmt registers CF.
set -euo pipefail
again="docker run --privileged --rm ${BINFMT_IMAGE:-<BINFMT_IMAGE>} --uninstall qemu-x86_64, then make kfp again"
ROSETTA=rosetta

fail() {
    echo "binfmt: $1" >&2
    exit 1
}

# unusable FILE: why the binfmt_misc entry FILE cannot run the kind node's amd64 pods (nothing: it can).
unusable() {
    local entry=$1 state flags
    if [ ! -r "$entry" ]; then
        echo "no $(basename "$entry") registration"
        return
    fi
    state=$(head -n 1 "$entry")
    if [ "$state" != enabled ]; then
        echo "$(basename "$entry") is '$state', not enabled"
        return
    fi
    flags=$(sed -n 's/^flags: *//p' "$entry")
    case $flags in
        *F*) ;;
        *) echo "$(basename "$entry") has flags '$flags' without F (fix binary), so pods cannot use it" ;;
    esac
}

# check DIR NAME WHERE: the verdict over the entries NAME (qemu) and rosetta in DIR (WHERE: for messages).
# Rosetta stands in only for a qemu entry that is absent or disabled: of two enabled entries the
# kernel runs the one registered last, which /proc does not tell.
check() {
    local dir=$1 name=$2 where=$3 qemu rosetta use=$2
    qemu=$(unusable "$dir/$name")
    rosetta=$(unusable "$dir/$ROSETTA")
    if [ -n "$qemu" ] && [ -z "$rosetta" ] && [ "$(head -n 1 "$dir/$name" 2>/dev/null)" != enabled ]; then
        use=$ROSETTA
    elif [ -n "$qemu" ]; then
        if [ -e "$dir/$name" ]; then
            fail "$where: $qemu (registered by another tool?): $again"
        elif [ -e "$dir/$ROSETTA" ]; then
            fail "$where: no $name registration (the binfmt container's log above says why), and $rosetta"
        fi
        fail "$where: no $name registration: the binfmt container's log above says why"
    fi
    echo "binfmt: $use enabled, flags $(sed -n 's/^flags: *//p' "$dir/$use"), interpreter" \
        "$(sed -n 's/^interpreter //p' "$dir/$use") ($where)"
}

if [ $# -gt 0 ]; then
    dir=$(dirname "$1")
    [ -e "$dir/status" ] || fail "binfmt_misc is not mounted at $dir (sudo mount -t binfmt_misc binfmt_misc $dir)"
    check "$dir" "$(basename "$1")" "$dir"
    exit 0
fi

root=$(cd "$(dirname "$0")/../.." && pwd)
reader=${BINFMT_READER_IMAGE:-$(sed -n 's/^ *image: *//p' "$root/kind-config.yaml" | head -n 1)}
[ -n "$reader" ] || fail "no image to read binfmt_misc with: set BINFMT_READER_IMAGE"
# Each entry as a line `=== NAME` and its text; exit 3: binfmt_misc could not be mounted.
# shellcheck disable=SC2016 # expanded by the container's shell
read_entries='d=/proc/sys/fs/binfmt_misc
[ -e "$d/status" ] || mount -t binfmt_misc binfmt_misc "$d" 2>/dev/null || exit 3
for e in "$@"; do if [ -r "$d/$e" ]; then echo "=== $e"; cat "$d/$e"; fi; done'
status=0
entries=$("${DOCKER:-docker}" run --rm --privileged --entrypoint sh "$reader" -c "$read_entries" sh \
    qemu-x86_64 "$ROSETTA") || status=$?
case $status in
    0) ;;
    3) fail "binfmt_misc is not mounted in Docker's kernel and a privileged container could not mount it" ;;
    *) fail "could not read binfmt_misc through Docker (docker run --privileged $reader exited $status)" ;;
esac
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
awk -v dir="$copy" '/^=== /{file = dir "/" $2; next} file {print > file}' <<<"$entries"
check "$copy" qemu-x86_64 "Docker's kernel"
