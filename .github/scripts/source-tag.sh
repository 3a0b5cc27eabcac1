#!/usr/bin/env bash
# source-tag.sh: the tag for locally built images, from what goes into them (the build context of
# images/base/Dockerfile plus images/): git-<commit> for a clean tree, git-<commit>-dirty-<hash>
# when those paths differ from HEAD (<hash>: sha256 of the diff and of every untracked file there).
# KFP's cache key contains the image name, so a rebuilt image under a new tag is never a cache hit
# for outputs made by older code; the same sources give the same tag, so their outputs are reused.
set -euo pipefail
cd "$(dirname "$0")/../.."
paths=(components images pyproject.toml README.md)
commit=$(git rev-parse --short=12 HEAD)
untracked=$(git ls-files --others --exclude-standard -- "${paths[@]}")
if git diff --quiet HEAD -- "${paths[@]}" && [ -z "$untracked" ]; then
    echo "git-$commit"
    exit 0
fi
changes=$({
    git diff HEAD --binary -- "${paths[@]}"
    if [ -n "$untracked" ]; then
        while IFS= read -r file; do
            printf '%s\n' "$file"
            cat -- "$file"
        done <<< "$untracked"
    fi
} | sha256sum | cut -c1-12)
echo "git-$commit-dirty-$changes"
