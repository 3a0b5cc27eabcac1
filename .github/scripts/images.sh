#!/usr/bin/env bash
# The step images in the GitHub workflows. Image names come from images/images.env through
# components/images.py (standard library only), with IMAGE_REGISTRY / IMAGE_TAG from the environment.
#   images.sh check            each image starts, imports its stack, runs as a non-root user, has no CUDA,
#                              and can run the compile backend (serve-onnx: has no torch at all)
#   images.sh push ARCH        push every image as <name>:<IMAGE_TAG>-ARCH (after a native build)
#   images.sh manifest ARCH..  join the per-arch tags into <name>:<IMAGE_TAG> and <name>:latest
set -euo pipefail
cd "$(dirname "$0")/../.."

mapfile -t IMAGES < <(python3 -m components.images)

check() {
    local image user
    for image in "${IMAGES[@]}"; do
        user=$(docker image inspect --format '{{.Config.User}}' "$image")
        if [ -z "$user" ] || [ "${user%%:*}" = 0 ] || [ "${user%%:*}" = root ]; then
            echo "images: $image runs as root (User '$user')" >&2
            return 1
        fi
        case "$image" in
            *-serve-onnx:*)   # the slim predictor: ONNX Runtime + KServe, and no torch at all
                docker run --rm --entrypoint python "$image" -c \
                    'import importlib.util as u, onnxruntime, kserve, components.serving.model; assert u.find_spec("torch") is None; print(onnxruntime.__version__)' ;;
            *)
                docker run --rm --entrypoint python "$image" -c \
                    'import torch, kfp.dsl.executor_main, kserve, components.images; assert torch.version.cuda is None; print(torch.__version__)'
                # Every backend the local run races must run here too (compile: a C++ compiler for inductor).
                docker run --rm --entrypoint python "$image" -c \
                    'from components.backends import BACKENDS; r = BACKENDS["compile"].unavailable(); assert r is None, r' ;;
        esac
    done
}

push() {
    local arch=$1 image
    for image in "${IMAGES[@]}"; do
        docker tag "$image" "$image-$arch"
        docker push "$image-$arch"
    done
}

manifest() {
    local image sources arch
    for image in "${IMAGES[@]}"; do
        sources=()
        for arch in "$@"; do
            sources+=("$image-$arch")
        done
        docker buildx imagetools create --tag "$image" --tag "${image%:*}:latest" "${sources[@]}"
    done
}

case "${1:-}" in
    check) check ;;
    push) push "${2:?usage: images.sh push ARCH}" ;;
    manifest) shift; manifest "${@:?usage: images.sh manifest ARCH...}" ;;
    *) echo "usage: $0 check | push ARCH | manifest ARCH..." >&2; exit 2 ;;
esac
