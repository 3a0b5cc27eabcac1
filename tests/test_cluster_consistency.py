"""The cluster path agrees with itself: every image the compiled pipeline names is built (Dockerfile,
Makefile, workflow) under the same name; the Makefile, manifests and kind-config use components/cluster.py's
names; `make -n pipeline` prints the whole sequence and runs nothing; the workflows keep their policies
(pinned actions, timeouts, least privilege, no secrets on pull requests). Each check has a negative test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components import cluster
from components.images import image, setting, steps

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = {p.name: p for p in ROOT.glob(".github/workflows/*.yml")}


def make(*args, env=None) -> str:
    if not shutil.which("make"):
        pytest.fail("make is not installed; install it with: apt-get install make")
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def make_variable(name: str) -> str:
    return make("-pn", "help").split(f"\n{name} := ", 1)[1].split("\n", 1)[0]


# --------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def ir_text(compiled_ir) -> str:
    return compiled_ir.read_text()


def referenced_images(ir: str) -> set[str]:
    prefix = f"{setting('IMAGE_REGISTRY')}/{setting('IMAGE_PREFIX')}"
    return set(re.findall(re.escape(prefix) + r"[a-z0-9-]+:[\w.-]+", ir))


def image_problems(ir: str, images_dir: Path, make_images: str, make_load: str, tag: str) -> list[str]:
    """What the compiled IR references but images/, `make images` or `make load` would not provide."""
    problems = []
    for name in sorted(referenced_images(ir)):
        step = name.split("/")[-1].split(":")[0].removeprefix(setting("IMAGE_PREFIX"))
        built = name.rsplit(":", 1)[0] + f":{tag}"
        if step not in steps() or name != image(step):
            problems.append(f"{name}: not an image of images/images.env STEPS")
        if not (images_dir / step / "Dockerfile").is_file():
            problems.append(f"{name}: no {images_dir.name}/{step}/Dockerfile")
        if f"-t {built} images/{step}" not in make_images.replace("\\\n\t", ""):
            problems.append(f"{name}: `make images` does not build it from images/{step}")
        if built not in make_load.split():
            problems.append(f"{name}: `make load` does not load it into kind")
    return problems


def test_every_image_the_pipeline_references_is_built_and_loaded(ir_text):
    names = referenced_images(ir_text)
    assert {"train", "evaluate", "deploy", "serve"} <= {n.split(":")[0].rsplit("-", 1)[-1] for n in names}
    tag = "abc123"
    assert not image_problems(ir_text, ROOT / "images", make("-n", "images", f"IMAGE_TAG={tag}"),
                              make("-n", "load", f"IMAGE_TAG={tag}"), tag)


def test_the_image_check_catches_a_missing_dockerfile_and_build(ir_text, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(ROOT / "images", images)
    shutil.rmtree(images / "train")
    make_images = make("-n", "images", "IMAGE_TAG=abc123").replace("images/serve\n", "images/serving\n")
    problems = image_problems(ir_text, images, make_images, make("-n", "load", "IMAGE_TAG=abc123"), "abc123")
    assert sorted(problems) == [f"{image('serve')}: `make images` does not build it from images/serve",
                                f"{image('train')}: no images/train/Dockerfile"]


SLIM = "serve-onnx"       # the predictor for ONNX winners: the code and pins of gtsrb-base, on BASE_PYTHON


def test_images_env_steps_are_exactly_the_dockerfiles():
    assert sorted(steps()) == sorted(p.parent.name for p in ROOT.glob("images/*/Dockerfile"))
    assert steps()[0] == "base"
    for step in steps()[1:]:
        text = (ROOT / f"images/{step}/Dockerfile").read_text()
        start = "ARG BASE_IMAGE\nARG BASE_PYTHON\nFROM ${BASE_IMAGE} AS project\n" if step == SLIM else \
            "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"
        assert start in text, f"images/{step} starts from gtsrb-base"
        assert f'org.opencontainers.image.title="gtsrb-{step}"' in text


def final_stage(dockerfile: str) -> str:
    return dockerfile.rsplit("\nFROM ", 1)[1]


def test_the_slim_predictor_image_has_no_torch():
    """serve-onnx's last stage starts from BASE_PYTHON (gtsrb-base only lends it the code and the
    pins) and installs pyproject.toml's pins of exactly what an ONNX winner's predictor imports."""
    from components.images import requirements

    text = (ROOT / f"images/{SLIM}/Dockerfile").read_text()
    assert final_stage(text).startswith("${BASE_PYTHON}\n")
    assert f"--requirements {SLIM}" in text and "--build-arg BASE_PYTHON=" + setting("BASE_PYTHON") in make(
        "-n", f"image-{SLIM}")
    names = [r.split("==")[0] for r in requirements(SLIM)]
    assert names == ["kserve", "onnxruntime", "numpy", "pillow", "kubernetes", "pyyaml"]
    assert all("==" in r for r in requirements(SLIM))
    assert not {"torch", "torchvision", "kfp", "onnxscript"} & set(names)
    assert ENTRYPOINT in text and ENTRYPOINT in (ROOT / "images/serve/Dockerfile").read_text()


ENTRYPOINT = 'ENTRYPOINT ["python", "-m", "components.serving"]'


def test_the_slim_image_check_catches_torch_in_the_last_stage():
    broken = (ROOT / f"images/{SLIM}/Dockerfile").read_text().replace("\nFROM ${BASE_PYTHON}\nLABEL",
                                                                      "\nFROM ${BASE_IMAGE}\nLABEL")
    assert not final_stage(broken).startswith("${BASE_PYTHON}\n")


def test_the_base_python_has_one_source():
    dockerfile = (ROOT / "images/base/Dockerfile").read_text()
    assert f"ARG BASE_PYTHON={setting('BASE_PYTHON')}\n" in dockerfile
    assert f"--build-arg BASE_PYTHON={setting('BASE_PYTHON')}" in make("-n", "image-base")


def test_kind_never_gets_a_latest_tag_and_local_tags_follow_the_sources():
    out = make("-n", "load", "IMAGE_TAG=latest")
    tag = subprocess.run(["bash", ROOT / ".github/scripts/source-tag.sh"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert ":latest" not in out and re.fullmatch(r"git-[0-9a-f]{12}(-dirty-[0-9a-f]{12})?", tag)
    assert f"{image('train').rsplit(':', 1)[0]}:{tag}" in out
    assert f"IMAGE_TAG={tag} " in make("-n", "pipeline", "IMAGE_TAG=latest"), "the IR names the images kind loaded"
    assert ":abc123 " in make("-n", "load", "IMAGE_TAG=abc123") + " ", "CI's IMAGE_TAG (the commit sha) wins"


def test_the_source_tag_changes_with_the_image_sources_only(tmp_path):
    """A copy of the repository's image sources in a fresh git repository: clean -> git-<commit>; an
    edit under components/ -> -dirty-<hash> (another edit, another hash); an edit elsewhere -> clean."""
    repo = tmp_path / "repo"
    for part in ("components", "images", "pyproject.toml", "README.md", ".github/scripts/source-tag.sh"):
        source, target = ROOT / part, repo / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example"}
    git = lambda *a: subprocess.run(["git", "-C", repo, *a], check=True, capture_output=True, text=True,  # noqa: E731
                                    env=env).stdout.strip()
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "x")
    tag = lambda: subprocess.run(["bash", repo / ".github/scripts/source-tag.sh"], capture_output=True,  # noqa: E731
                                 text=True, check=True).stdout.strip()
    clean = tag()
    assert clean == f"git-{git('rev-parse', '--short=12', 'HEAD')}"
    (repo / "tests").mkdir()
    (repo / "tests/new_test.py").write_text("x = 1\n")
    assert tag() == clean, "not in any image"
    (repo / "components/cluster.py").write_text((repo / "components/cluster.py").read_text() + "# edit\n")
    first = tag()
    (repo / "components/new_module.py").write_text("y = 2\n")
    second = tag()
    assert first.startswith(f"{clean}-dirty-") and second.startswith(f"{clean}-dirty-") and first != second


# --------------------------------------------------------------------------- backends in the images
# Debian package that puts each command backends.py may look up on PATH.
DEBIAN_PACKAGE = {"g++": "g++", "c++": "g++", "gcc": "gcc", "cc": "gcc", "clang++": "clang", "clang": "clang"}


def commands_backends_look_up(monkeypatch) -> set[str]:
    """Every command a backend's availability check asks shutil.which for (answered: not found)."""
    from components import backends

    asked = set()
    monkeypatch.setattr(backends.shutil, "which", lambda name, *a, **k: asked.add(name))
    for backend in backends.BACKENDS.values():
        backend.unavailable()
    return asked


def final_stage_packages(dockerfile: str) -> set[str]:
    """Packages `apt-get install`ed in the last stage of a Dockerfile (the image that ships)."""
    final = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[-1].replace("\\\n", " ")
    return {word for line in re.findall(r"apt-get install ([^&;\n]+)", final)
            for word in line.split() if not word.startswith("-")}


def backend_image_problems(commands: set[str], base: str, steps: dict[str, str]) -> list[str]:
    installed = final_stage_packages(base)
    problems = [f"gtsrb-base's final stage lacks {DEBIAN_PACKAGE.get(c, '?')} for `{c}`" for c in sorted(commands)
                if DEBIAN_PACKAGE.get(c) not in installed]
    return problems + [f"images/{step} does not start from gtsrb-base" for step, text in steps.items()
                       if "FROM ${BASE_IMAGE}" not in text]


def test_the_images_that_run_backends_provide_what_backends_py_checks_for(monkeypatch):
    """evaluate races every backend; serve (the smoke step too) and deploy (its in-process reference)
    run the winner, which may be `compile`: inductor needs a C++ compiler at run time."""
    commands = commands_backends_look_up(monkeypatch)
    assert "g++" in commands or "c++" in commands, commands
    steps = {s: (ROOT / f"images/{s}/Dockerfile").read_text() for s in ("evaluate", "serve", "deploy")}
    assert backend_image_problems(commands, (ROOT / "images/base/Dockerfile").read_text(), steps) == []


def test_the_backend_image_check_catches_a_compiler_left_in_the_builder_stage(monkeypatch):
    base = (ROOT / "images/base/Dockerfile").read_text()
    assert "--no-install-recommends g++" in base
    builder_only = base.replace("--no-install-recommends g++", "--no-install-recommends tzdata").replace(
        "install -y --no-install-recommends gcc libc6-dev", "install -y --no-install-recommends gcc g++ libc6-dev")
    commands = commands_backends_look_up(monkeypatch)
    assert backend_image_problems(commands, builder_only, {"evaluate": "FROM python:3.11-slim\n"}) == [
        f"gtsrb-base's final stage lacks g++ for `{c}`" for c in sorted(commands)] + [
        "images/evaluate does not start from gtsrb-base"]


# --------------------------------------------------------------------------- names
def test_makefile_kind_config_and_manifests_use_the_cluster_names():
    assert make_variable("NAMESPACE") == cluster.NAMESPACE
    assert make_variable("INFERENCE_SERVICE") == cluster.INFERENCE_SERVICE
    assert yaml.safe_load((ROOT / "kind-config.yaml").read_text())["name"] == make_variable("KIND_CLUSTER")
    assert name_problems(load_manifests()) == []


def load_manifests() -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for p in sorted(ROOT.glob("manifests/gtsrb/*.yaml"))
            if p.name != "kustomization.yaml" for d in yaml.safe_load_all(p.read_text()) if d}


def name_problems(objects: dict[str, dict]) -> list[str]:
    problems = []
    host, _, port = cluster.MINIO_ENDPOINT.partition(":")
    service_name, service_namespace = host.split(".")[:2]
    service = objects.get(f"Service/{service_name}")
    if service is None or service_namespace != cluster.NAMESPACE or int(port) not in [
            p["port"] for p in service["spec"]["ports"]]:
        problems.append(f"no Service for MINIO_ENDPOINT {cluster.MINIO_ENDPOINT}")
    secret = objects.get(f"Secret/{cluster.S3_SECRET}")
    endpoint = secret and secret["metadata"]["annotations"].get("serving.kserve.io/s3-endpoint")
    if endpoint != cluster.MINIO_ENDPOINT:
        problems.append(f"Secret {cluster.S3_SECRET} missing or its s3-endpoint is not {cluster.MINIO_ENDPOINT}")
    account = objects.get(f"ServiceAccount/{cluster.SERVICE_ACCOUNT}")
    if account is None or {"name": cluster.S3_SECRET} not in account.get("secrets", []):
        problems.append(f"ServiceAccount {cluster.SERVICE_ACCOUNT} missing or without {cluster.S3_SECRET}")
    binding = objects.get("RoleBinding/gtsrb-deployer")
    if binding is None or {"kind": "ServiceAccount", "name": cluster.DEPLOYER_SERVICE_ACCOUNT,
                           "namespace": cluster.NAMESPACE} not in binding["subjects"]:
        problems.append(f"no RoleBinding for {cluster.NAMESPACE}/{cluster.DEPLOYER_SERVICE_ACCOUNT}")
    rules = objects.get("Role/gtsrb-deployer", {}).get("rules", [])
    granted = {(resource, verb) for r in rules for resource in r["resources"] for verb in r["verbs"]}
    needed = ({("inferenceservices", v) for v in ("get", "create", "update")} | {("events", "list")}
              | {("deployments", "get")})                 # components/rollout.py reads the predictor's Deployment
    if not needed <= granted:
        problems.append(f"Role gtsrb-deployer lacks {sorted(needed - granted)}")
    return problems


def test_the_name_check_catches_a_renamed_secret_and_a_missing_verb():
    objects = load_manifests()
    objects["Secret/gtsrb-minio-s3"]["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] = "minio:9000"
    objects["Role/gtsrb-deployer"]["rules"][0]["verbs"].remove("update")
    assert name_problems(objects) == [
        f"Secret {cluster.S3_SECRET} missing or its s3-endpoint is not {cluster.MINIO_ENDPOINT}",
        "Role gtsrb-deployer lacks [('inferenceservices', 'update')]"]


# --------------------------------------------------------------------------- make -n pipeline
def test_make_n_pipeline_prints_the_whole_sequence_and_runs_nothing(tmp_path):
    ran = tmp_path / "ran"
    for name in ("docker", "kind", "kubectl", "curl"):           # any call of these would leave a trace
        stub = tmp_path / name
        stub.write_text(f"#!/bin/sh\necho {name} >> {ran}\nexit 1\n")
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    out = make("-n", "pipeline", env=env)
    assert not ran.exists(), f"make -n ran {ran.read_text()}"
    expected = ["kind create cluster --name gtsrb --config kind-config.yaml",
                "-f images/base/Dockerfile", "images/serve", "kind load docker-image --name gtsrb",
                "apply -k manifests/kfp/cluster-scoped", "apply -k manifests/kfp", "apply -k manifests/gtsrb",
                "wait --for=condition=Available deployment -l application-crd-id=kubeflow-pipelines",
                "apply -k manifests/cert-manager", "apply --server-side --force-conflicts -k manifests/kserve",
                "port-forward svc/ml-pipeline", "pipeline.py submit", "--summary-out runs/cluster/summary.json",
                "--arg deploy_target=kserve"]
    positions = [out.find(step) for step in expected]
    assert -1 not in positions, [s for s, p in zip(expected, positions, strict=True) if p == -1]
    assert positions == sorted(positions), "in order: cluster, images, load, kfp, kserve, run"
    assert "kubectl --context kind-gtsrb" in out and "kubectl apply" not in out, "only the kind cluster"


def test_arm64_hosts_register_qemu_for_mlmd_and_verify_it_at_once():
    out = make("-n", "kfp", "EMULATE_AMD64=yes")
    install = f"docker run --privileged --rm {setting('BINFMT_IMAGE')} --install amd64"
    check = "bash .github/scripts/binfmt-check.sh"
    assert install in out and check in out
    assert out.index(install) < out.index(check) < out.index("apply -k manifests/kfp"), "before KFP, not 20 min later"
    amd64 = make("-n", "kfp", "EMULATE_AMD64=")
    assert "--install amd64" not in amd64 and check not in amd64


# tonistiigi/binfmt registers "CF" (+P with QEMU_PRESERVE_ARGV0; cmd/binfmt/main.go); the kernel shows C as "OC".
BINFMT_ENTRY = ("enabled\ninterpreter /usr/bin/qemu-x86_64\nflags: {flags}\noffset 0\n"
                "magic 7f454c4602010100000000000000000002003e00\nmask fffffffffffefe00fffffffffffffffffeffffff\n")


def binfmt_check(tmp_path, entry: str | None, mounted: bool = True) -> subprocess.CompletedProcess:
    directory = tmp_path / "binfmt_misc"
    directory.mkdir()
    if mounted:
        (directory / "status").write_text("enabled\n")
    if entry is not None:
        (directory / "qemu-x86_64").write_text(entry)
    return subprocess.run(["bash", ROOT / ".github/scripts/binfmt-check.sh", directory / "qemu-x86_64"],
                          capture_output=True, text=True, env={**os.environ, "BINFMT_IMAGE": "binfmt:pinned"})


@pytest.mark.parametrize("entry, mounted, message", [
    (BINFMT_ENTRY.format(flags="OC"), True, "flags 'OC' without F (fix binary)"),
    (BINFMT_ENTRY.format(flags="OCF").replace("enabled", "disabled", 1), True, "is 'disabled', not enabled"),
    (None, True, "no qemu-x86_64 registration"),
    (None, False, "binfmt_misc is not mounted"),
])
def test_binfmt_check_fails_at_once_with_the_reason(tmp_path, entry, mounted, message):
    result = binfmt_check(tmp_path, entry, mounted)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    if entry is not None:
        assert "docker run --privileged --rm binfmt:pinned --uninstall qemu-x86_64" in result.stderr


def test_binfmt_check_accepts_a_fix_binary_registration(tmp_path):
    result = binfmt_check(tmp_path, BINFMT_ENTRY.format(flags="POCF"))
    assert result.returncode == 0
    assert "qemu-x86_64 enabled, flags POCF, interpreter /usr/bin/qemu-x86_64" in result.stdout


# Rosetta's entry as Lima registers it (apptainer/apptainer#3482); BuildKit looks for the name
# "rosetta" too (util/archutil). Docker Desktop's interpreter path and flags are not verified here.
ROSETTA_ENTRY = BINFMT_ENTRY.replace("/usr/bin/qemu-x86_64", "/mnt/lima-rosetta/rosetta")


def binfmt_entries(directory: Path, qemu: str | None, rosetta: str | None) -> Path:
    directory.mkdir()
    (directory / "status").write_text("enabled\n")
    for name, text in (("qemu-x86_64", qemu), ("rosetta", rosetta)):
        if text is not None:
            (directory / name).write_text(text)
    return directory


@pytest.mark.parametrize("qemu, rosetta, passes, message", [
    (None, ROSETTA_ENTRY.format(flags="OCF"), True,
     "rosetta enabled, flags OCF, interpreter /mnt/lima-rosetta/rosetta"),
    (BINFMT_ENTRY.format(flags="OCF").replace("enabled", "disabled", 1), ROSETTA_ENTRY.format(flags="OCF"), True,
     "rosetta enabled"),
    (BINFMT_ENTRY.format(flags="OCF"), ROSETTA_ENTRY.format(flags="OC"), True, "qemu-x86_64 enabled, flags OCF"),
    # two enabled entries: the kernel runs the one registered last, which /proc does not tell
    (BINFMT_ENTRY.format(flags="OC"), ROSETTA_ENTRY.format(flags="OCF"), False, "qemu-x86_64 has flags 'OC' without F"),
    (None, ROSETTA_ENTRY.format(flags="OC"), False, "no qemu-x86_64 registration (the binfmt container's log above "
                                                    "says why), and rosetta has flags 'OC' without F"),
])
def test_binfmt_check_takes_docker_desktops_rosetta_when_qemu_is_not_there(tmp_path, qemu, rosetta, passes, message):
    directory = binfmt_entries(tmp_path / "binfmt_misc", qemu, rosetta)
    result = subprocess.run(["bash", ROOT / ".github/scripts/binfmt-check.sh", directory / "qemu-x86_64"],
                            capture_output=True, text=True)
    assert result.returncode == (0 if passes else 1)
    assert message in (result.stdout if passes else result.stderr), (result.stdout, result.stderr)


DOCKER_STAND_IN = r"""#!/usr/bin/env bash
# docker stand-in: records its arguments and runs the container's `sh -c` script on this machine,
# with $BINFMT_DIR in place of the container's /proc/sys/fs/binfmt_misc
printf '%s\n' "$@" > "$DOCKER_ARGS"
while [ "$1" != -c ]; do shift; done
script=${2//\/proc\/sys\/fs\/binfmt_misc/$BINFMT_DIR}
shift 2
exec sh -c "$script" "$@"
"""


def binfmt_check_through_docker(tmp_path, directory: Path) -> subprocess.CompletedProcess:
    """The check as `make kfp` runs it (no argument): through `docker run`, here a stand-in; `mount`
    always fails (no privileges here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", DOCKER_STAND_IN), ("mount", "#!/bin/sh\nexit 32\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BINFMT_DIR": str(directory),
           "DOCKER_ARGS": str(tmp_path / "docker-args"), "BINFMT_IMAGE": "binfmt:pinned"}
    return subprocess.run(["bash", ROOT / ".github/scripts/binfmt-check.sh"], capture_output=True, text=True, env=env)


def test_binfmt_check_reads_the_kernel_docker_runs_on(tmp_path):
    """On Docker Desktop the host (macOS) has no /proc: the entries are read inside a privileged
    container, from the kind node image (it has a shell; tonistiigi/binfmt's image is FROM scratch)."""
    directory = binfmt_entries(tmp_path / "binfmt_misc", BINFMT_ENTRY.format(flags="CF"), None)
    result = binfmt_check_through_docker(tmp_path, directory)
    assert result.returncode == 0, result.stderr
    assert "qemu-x86_64 enabled, flags CF, interpreter /usr/bin/qemu-x86_64 (Docker's kernel)" in result.stdout
    node_image = yaml.safe_load((ROOT / "kind-config.yaml").read_text())["nodes"][0]["image"]
    args = (tmp_path / "docker-args").read_text().splitlines()
    assert args[:6] == ["run", "--rm", "--privileged", "--entrypoint", "sh", node_image]
    assert args[-2:] == ["qemu-x86_64", "rosetta"]


def test_binfmt_check_through_docker_takes_rosetta_and_reports_an_unmounted_binfmt_misc(tmp_path):
    rosetta_only = binfmt_entries(tmp_path / "desktop", None, ROSETTA_ENTRY.format(flags="OCF"))
    result = binfmt_check_through_docker(tmp_path, rosetta_only)
    assert result.returncode == 0 and "rosetta enabled, flags OCF" in result.stdout, result.stderr
    (rosetta_only / "status").unlink()                   # not mounted, and mounting it fails
    (tmp_path / "bin").rename(tmp_path / "bin-1")
    result = binfmt_check_through_docker(tmp_path, rosetta_only)
    assert result.returncode == 1
    assert ("binfmt_misc is not mounted in Docker's kernel and a privileged container could not mount it"
            in result.stderr)


def test_make_kserve_waits_for_cert_managers_webhook_and_hides_no_failure():
    out = make("-n", "kserve")
    assert "|| true" not in out
    steps = ["apply -k manifests/cert-manager", "wait --for=condition=Available deployment --all",
             "apply --dry-run=server -f manifests/cert-manager/probe-issuer.yaml",
             "apply --server-side --force-conflicts -k manifests/kserve",
             "wait --for=condition=Available deployment/kserve-controller-manager"]
    positions = [out.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), positions
    assert out.count("bash .github/scripts/retry.sh") == 2
    probe = yaml.safe_load((ROOT / "manifests/cert-manager/probe-issuer.yaml").read_text())
    assert probe["kind"] == "Issuer" and probe["metadata"]["namespace"] == "cert-manager"
    assert "probe-issuer.yaml" not in (ROOT / "manifests/cert-manager/kustomization.yaml").read_text(), "never created"


def test_retry_succeeds_once_the_command_does_and_fails_with_its_name_after_the_deadline(tmp_path):
    counter = tmp_path / "n"
    flaky = f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}; [ "$n" -ge 2 ]'
    ok = subprocess.run(["bash", ROOT / ".github/scripts/retry.sh", "30", "0", "flaky thing", "bash", "-c", flaky],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "flaky thing: ok (attempt 3)" in ok.stdout and counter.read_text() == "3\n"
    failed = subprocess.run(["bash", ROOT / ".github/scripts/retry.sh", "1", "0.2", "webhook", "bash", "-c",
                             "echo rejected >&2; exit 1"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "rejected" in failed.stderr
    assert "retry: webhook: still failing after 1s" in failed.stderr


def test_every_cluster_target_has_help():
    helped = set(re.findall(r"^  make (\S+)", make("help"), re.MULTILINE))
    assert {"cluster", "images", "load", "kfp", "kserve", "pipeline", "ui", "endpoint", "clean"} <= helped


def test_make_help_shows_no_unexpanded_variable_and_the_local_settings():
    text = make("help")
    assert "$(" not in text, "help is printed as written: name the variable and its default instead"
    local = next(line for line in text.splitlines() if line.startswith("  make local "))
    assert all(f"{v}=" in local for v in ("DATA_DIR", "OUTPUT_DIR", "CHAMPION_DIR", "MAX_REGRESSION", "FORCE_DEPLOY"))


# --------------------------------------------------------------------------- workflow policies
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w.-]+@[0-9a-f]{40}$")
MAIN_PUSH = "github.event_name == 'push' && github.ref == 'refs/heads/main'"


def workflow_problems(name: str, text: str) -> list[str]:
    doc = yaml.safe_load(text)
    problems = [] if "permissions" in doc else [f"{name}: no workflow-level permissions"]
    pinned = dict(re.findall(r"uses: (\S+)\s+# (v\d+\.\d+\.\d+)", text))
    for job_name, job in doc["jobs"].items():
        where = f"{name} job {job_name}"
        if "timeout-minutes" not in job:
            problems.append(f"{where}: no timeout-minutes")
        for step in job.get("steps", []):
            uses = step.get("uses")
            if uses and not (PINNED_ACTION.match(uses) and uses in pinned):
                problems.append(f"{where}: {uses} is not pinned to a commit with its version in a comment")
            if "secrets." in yaml.safe_dump(step) and MAIN_PUSH not in f"{job.get('if', '')} {step.get('if', '')}":
                problems.append(f"{where}: step uses secrets outside pushes to main")
    return problems


def test_workflows_pin_actions_time_out_and_keep_secrets_to_main():
    assert {"ci.yml", "pipeline.yml", "pr-report.yml"} <= set(WORKFLOWS)
    assert [p for name, path in WORKFLOWS.items() for p in workflow_problems(name, path.read_text())] == []


def test_the_workflow_check_catches_a_tag_a_missing_timeout_and_a_secret_on_pull_requests():
    text = (WORKFLOWS["pipeline.yml"].read_text()
            .replace("    timeout-minutes: 60\n", "")
            .replace("uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1", "uses: actions/checkout@v7")
            .replace("        if: github.event_name == 'push' && github.ref == 'refs/heads/main'\n        with:\n"
                     "          username", "        with:\n          username", 1))
    problems = workflow_problems("pipeline.yml", text)
    assert "pipeline.yml job build-amd64: no timeout-minutes" in problems
    assert "pipeline.yml job pipeline: actions/checkout@v7 is not pinned to a commit with its version in a comment" \
        in problems
    assert "pipeline.yml job pipeline: step uses secrets outside pushes to main" in problems


def test_the_pipeline_workflow_runs_the_make_targets_on_arm_and_publishes_both_architectures():
    doc = yaml.safe_load(WORKFLOWS["pipeline.yml"].read_text())
    jobs = doc["jobs"]
    runs = lambda job: " ".join(s.get("run", "") for s in jobs[job]["steps"])  # noqa: E731
    assert jobs["pipeline"]["runs-on"] == "ubuntu-24.04-arm"
    assert "make pipeline" in runs("pipeline") and "make endpoint" in runs("pipeline")
    assert "images.sh push arm64" in runs("pipeline") and "images.sh push amd64" in runs("build-amd64")
    assert jobs["build-amd64"]["runs-on"] == "ubuntu-24.04" and "make images" in runs("build-amd64")
    assert jobs["publish"]["needs"] == ["pipeline", "build-amd64"] and jobs["publish"]["if"] == MAIN_PUSH
    assert "images.sh manifest arm64 amd64" in runs("publish")
    assert set(doc[True]) == {"push", "pull_request", "workflow_dispatch"}   # PyYAML reads `on:` as True
    ci = yaml.safe_load(WORKFLOWS["ci.yml"].read_text())["jobs"]["test"]
    assert set(ci["strategy"]["matrix"]["runner"]) == {"ubuntu-24.04-arm", "ubuntu-24.04"}
    comment = yaml.safe_load(WORKFLOWS["pr-report.yml"].read_text())
    assert not any("uses" in s for s in comment["jobs"]["comment"]["steps"]), "never checks out PR code"
