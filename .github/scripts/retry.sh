#!/usr/bin/env bash
# retry.sh SECONDS INTERVAL WHAT COMMAND...: run COMMAND until it succeeds, every INTERVAL seconds;
# after SECONDS, fail naming WHAT. Every attempt's own output stays visible, so a real failure
# (an invalid manifest, say) is reported as itself, not hidden: it just stops being retried.
set -euo pipefail
seconds=${1:?usage: retry.sh SECONDS INTERVAL WHAT COMMAND...}
interval=${2:?usage: retry.sh SECONDS INTERVAL WHAT COMMAND...}
what=${3:?usage: retry.sh SECONDS INTERVAL WHAT COMMAND...}
shift 3
[ "$#" -gt 0 ] || { echo "usage: retry.sh SECONDS INTERVAL WHAT COMMAND..." >&2; exit 2; }
deadline=$((SECONDS + seconds))
attempt=1
until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "retry: $what: still failing after ${seconds}s ($attempt attempts): $*" >&2
        exit 1
    fi
    echo "retry: $what: attempt $attempt failed; next in ${interval}s" >&2
    sleep "$interval"
    attempt=$((attempt + 1))
done
echo "retry: $what: ok (attempt $attempt)"
