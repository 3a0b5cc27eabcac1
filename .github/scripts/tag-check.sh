#!/usr/bin/env bash
# tag-check.sh REPOSITORY TAG COMMIT: fail unless TAG in the git REPOSITORY still names COMMIT.
# For a tag we cannot replace by a commit ourselves (one that an upstream kustomization we pin by
# commit refers to): checked right before kustomize fetches it, so a moved tag stops the install.
set -euo pipefail
repository=${1:?usage: tag-check.sh REPOSITORY TAG COMMIT}
tag=${2:?usage: tag-check.sh REPOSITORY TAG COMMIT}
commit=${3:?usage: tag-check.sh REPOSITORY TAG COMMIT}
# An annotated tag lists the tag object, then the commit it points to as TAG^{}; a lightweight one only the commit.
refs=$(git ls-remote "$repository" "refs/tags/$tag" "refs/tags/$tag^{}")
found=$(awk -v peeled="refs/tags/$tag^{}" -v plain="refs/tags/$tag" \
    '$2 == peeled {p = $1} $2 == plain {t = $1} END {print (p != "" ? p : t)}' <<< "$refs")
if [ -z "$found" ]; then
    echo "tag-check: $repository has no tag $tag" >&2
    exit 1
fi
if [ "$found" != "$commit" ]; then
    echo "tag-check: $repository tag $tag now names $found, not the pinned $commit: check what changed upstream, then update the pin" >&2
    exit 1
fi
echo "tag-check: $repository $tag = $commit"
