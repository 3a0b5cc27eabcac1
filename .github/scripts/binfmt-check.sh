#!/usr/bin/env bash
# binfmt-check.sh [ENTRY]: is qemu registered for amd64 binaries the way KFP's MLMD pod needs it?
# tonistiigi/binfmt exits 0 even when a registration fails (it only logs the error), and the failure
# would otherwise surface 20 minutes later as an MLMD Deployment that never becomes Available.
# The entry (default /proc/sys/fs/binfmt_misc/qemu-x86_64) must say `enabled` and its flags must
# contain F (fix binary: the kernel opens the interpreter at registration, so it also works inside
# the kind node's containers, where /usr/bin/qemu-x86_64 does not exist).
set -euo pipefail
entry=${1:-/proc/sys/fs/binfmt_misc/qemu-x86_64}
again="docker run --privileged --rm ${BINFMT_IMAGE:-<BINFMT_IMAGE>} --uninstall qemu-x86_64, then make kfp again"

fail() {
    echo "binfmt: $1" >&2
    exit 1
}

if [ ! -e "$(dirname "$entry")/status" ]; then
    fail "binfmt_misc is not mounted at $(dirname "$entry") (sudo mount -t binfmt_misc binfmt_misc $(dirname "$entry"))"
fi
[ -r "$entry" ] || fail "no $(basename "$entry") registration: the binfmt container's log above says why"
state=$(head -n 1 "$entry")
[ "$state" = enabled ] || fail "$entry is '$state', not enabled: $again"
flags=$(sed -n 's/^flags: *//p' "$entry")
case $flags in
    *F*) ;;
    *) fail "$entry has flags '$flags' without F (fix binary), so pods cannot use it (registered by another tool?): $again" ;;
esac
echo "binfmt: $(basename "$entry") enabled, flags $flags, interpreter $(sed -n 's/^interpreter //p' "$entry")"
