"""cluster/: the launcher YAML against Ray's own schema, the KubeRay manifests, the container
recipe, the upload rules of `ray job submit --working-dir .`, and every entry point named in
cluster/ accepting the flags it is given (a --plan / --help dry run). No cloud account needed."""

import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def test_launcher_yaml_validates_against_rays_schema():
    import json

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(config))  # as `ray up` sees it, with the provider defaults
    assert config["head_node_type"] in config["available_node_types"]
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["resources"]["GPU"] == 8 for t in gpu_types)
    assert config["docker"]["image"]
    for node_type in gpu_types:  # the GPUs and the EFA devices reach the container
        options = " ".join(node_type["docker"]["worker_run_options"])
        assert "--gpus all" in options and "/dev/infiniband" in options, options
    # the MLflow store lives in a folder the image creates, mounted from the head's disk
    store = re.search(r"sqlite:///(/\S+)/mlflow\.db", " ".join(config["head_start_ray_commands"]))
    assert store, "the head starts MLflow on a sqlite store"
    assert f"mkdir -p {store.group(1)}" in (CLUSTER / "Dockerfile").read_text()
    assert any(
        option.endswith(f":{store.group(1)}") for option in config["docker"]["head_run_options"]
    )
    broken = dict(config, available_node_types={"head": {"node_config": {}}})
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(broken, schema)  # the schema does bite: resources are required


def kuberay_docs():
    return {
        p.name: yaml.safe_load(p.read_text()) for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))
    }


def ray_pin() -> str:
    """The Ray version the image installs (cluster/Dockerfile ARG RAY_VERSION)."""
    return re.search(r"ARG RAY_VERSION=(\S+)", (CLUSTER / "Dockerfile").read_text()).group(1)


def check_cluster_spec(spec: dict, image: str) -> None:
    assert spec["rayVersion"] == ray_pin()
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    assert head["template"]["spec"]["containers"][0]["image"] == image
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams"} <= set(
            group
        )
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == image
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_kuberay_manifests_carry_the_required_fields():
    docs = kuberay_docs()
    cluster, job = docs["raycluster.yaml"], docs["rayjob.yaml"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    image = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    check_cluster_spec(cluster["spec"], image)
    check_cluster_spec(job["spec"]["rayClusterSpec"], image)
    assert job["spec"]["entrypoint"].startswith("python pipelines/pretrain_3b.py ")
    text = "\n".join(p.read_text() for p in CLUSTER.rglob("*.yaml"))
    assert not re.search(r"(?i)(secret_access_key|aws_access_key_id)\s*[:=]\s*\S+", text)


def entrypoints() -> list[list[str]]:
    """Every `python pipelines/<script>.py ...` command written in cluster/ files."""
    found = []
    for path in CLUSTER.rglob("*"):
        if not path.is_file():
            continue
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())  # join continued lines
        docs = [path.read_text()] if path.suffix != ".yaml" else []
        for line in text.splitlines():
            line = line.lstrip("#").strip()
            match = re.search(r"python (pipelines/\S+\.py)((?:\s+--?\S+(?:\s+[^-\s]\S*)?)*)", line)
            if match:
                found.append([match.group(1), *shlex.split(match.group(2))])
        for doc in yaml.safe_load_all(path.read_text()) if path.suffix == ".yaml" else docs:
            entry = doc.get("spec", {}).get("entrypoint") if isinstance(doc, dict) else None
            if entry:
                args = shlex.split(entry)
                found.append(args[1:])
    assert found, "no entry points found in cluster/"
    return found


@pytest.mark.parametrize("command", entrypoints(), ids=lambda c: " ".join(c)[:60])
def test_every_entrypoint_in_cluster_exists_and_accepts_its_flags(command):
    script = REPO / command[0]
    assert script.is_file(), f"{command[0]} named in cluster/ does not exist"
    dry = (
        ["--plan", "--nodes", "2"]
        if script.name in ("pretrain_3b.py", "extend_context.py")
        else ["--help"]
    )
    proc = subprocess.run(
        [sys.executable, str(script), *command[1:], *dry],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "--plan" in dry:
        assert "Capacity plan" in proc.stdout


def test_image_installs_the_gpu_way_documented_for_users():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    readme = (REPO / "docs" / "scaling.md").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", dockerfile, re.M)
    assert re.search(r"ARG CUDA_IMAGE=\S*cuda\S*devel", dockerfile)
    assert "constraints-cpu" not in dockerfile and "+cpu" not in dockerfile
    assert 'pip install "torch==${TORCH_VERSION}"' in dockerfile
    assert 'pip install --no-build-isolation ".[gpu,triton]"' in dockerfile
    # the documented GPU install is the same two steps
    assert 'pip install "torch==<version>"' in readme
    assert 'pip install --no-build-isolation ".[gpu,triton]"' in readme
    assert kuberay_docs()["raycluster.yaml"]["spec"]["rayVersion"] == ray_pin()
    # flash-attn's build may fail without taking the image down
    assert re.search(r'\.\[gpu,triton\]" \\\n\s+\|\| echo', dockerfile)


def test_the_image_smoke_test_imports_every_module_a_job_needs():
    """The Dockerfile's own import check, run here exactly as written (CPU: the CUDA assert is a
    line of its own)."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    lines = re.findall(r'^RUN (python -c "import ttte2e[^"]*")$', dockerfile, re.M)
    assert len(lines) == 1, lines
    proc = subprocess.run(
        ["bash", "-c", lines[0].replace("python", sys.executable, 1)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_job_upload_carries_code_and_configs_never_data_checkpoints_or_secrets(tmp_path):
    from ray._private.runtime_env.packaging import _zip_files

    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    work = tmp_path / "repo"
    for name in tracked:
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    planted = [
        "runs/3b/checkpoint_00000010/model/model.safetensors",
        "data/train/shard-0.parquet",
        "checkpoints/step.pt",
        "mlflow.db",
        ".env",
        "credentials.json",
        ".aws/credentials",
        "models/3b/model-00001-of-00003.safetensors",
        "mlruns/0/meta.yaml",
        ".venv/bin/python",
        "demo.log",  # a log being written while the folder is zipped breaks the upload
    ]
    for name in planted:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("x")
    package = tmp_path / "upload.zip"
    _zip_files(str(work), [], str(package), include_gitignore=True)
    uploaded = set(zipfile.ZipFile(package).namelist())
    assert {
        "pipelines/pretrain_3b.py",
        "cluster/aws-gpu.yaml",
        "pyproject.toml",
        "recipes/3b_pretrain_8k.yaml",
    } <= uploaded
    assert not [name for name in planted if name in uploaded]
