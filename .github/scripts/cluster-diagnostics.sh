#!/usr/bin/env bash
# What a failed cluster run leaves to read: disk use (runner, Docker, kind node), pods, recent events,
# and the logs of every pod that is neither running nor completed (plus the InferenceService).
# Never fails itself.
set -uo pipefail
kubectl=(kubectl --context "kind-${KIND_CLUSTER:-gtsrb}")

# Disk first: a full disk shows up below only as evictions, ErrImagePull or pods stuck Pending.
df -h
docker system df
docker exec "${KIND_CLUSTER:-gtsrb}-control-plane" df -h /var /
"${kubectl[@]}" get nodes -o wide
"${kubectl[@]}" get pods --all-namespaces -o wide
"${kubectl[@]}" get events --all-namespaces --sort-by=.lastTimestamp | tail -n 60
"${kubectl[@]}" get inferenceservices --all-namespaces -o yaml
"${kubectl[@]}" get pods --all-namespaces --no-headers \
    --field-selector=status.phase!=Running,status.phase!=Succeeded \
    -o custom-columns=NS:.metadata.namespace,NAME:.metadata.name |
    while read -r namespace pod; do
        echo "::group::$namespace/$pod"
        "${kubectl[@]}" -n "$namespace" describe pod "$pod" | tail -n 40
        "${kubectl[@]}" -n "$namespace" logs "$pod" --all-containers --tail=100
        echo "::endgroup::"
    done
exit 0
