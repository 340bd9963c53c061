"""The cluster files in deploy/: the launcher config against Ray's own schema, the KubeRay
RayJob against the fields KubeRay requires, and the Dockerfile on the matching Ray image."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from deploy.cli import build_parser
from deploy.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RAY_VERSION = ray.__version__


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    config = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    # The file as written against Ray's schema, then as `ray up` sees it: merged with the AWS
    # provider's defaults and checked by Ray's own validator.
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] >= 1, "one GPU node type for the learner"
    cpu = [
        t
        for name, t in types.items()
        if name != config["head_node_type"] and not t["resources"].get("GPU")
    ]
    assert cpu and all(t["max_workers"] > t.get("min_workers", 0) for t in cpu), "autoscaling"
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in gpu + cpu)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c for c in commands), "token auth stays on"
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head, "the dashboard listens on localhost only"


def _containers(group: dict) -> list[dict]:
    containers = group["template"]["spec"]["containers"]
    assert containers, "a pod template needs a container"
    for c in containers:
        assert c.get("name") and c.get("image"), c
    return containers


def _auth_env(container: dict) -> dict:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    return env


def test_kuberay_rayjob_has_the_fields_kuberay_requires():
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    # The entrypoint is an `offpg train` command line whose config is valid.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["offpg", "train"]
    args = build_parser().parse_args(argv[1:])
    load_config(args.config, args.overrides)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for c in _containers(head):
        _auth_env(c)
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert len(groups) == len(cluster["workerGroupSpecs"]), "group names are unique"
    gpu, cpu = [], []
    for g in groups.values():
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        containers = _containers(g)
        for c in containers:
            _auth_env(c)
        limits = containers[0]["resources"]["limits"]
        (gpu if "nvidia.com/gpu" in limits else cpu).append(g)
    assert len(gpu) == 1 and gpu[0]["minReplicas"] >= 1
    assert cpu and all(g["maxReplicas"] > g["minReplicas"] for g in cpu), "autoscaling CPUs"
    _auth_env(spec["submitterPodTemplate"]["spec"]["containers"][0])


def test_dockerfile_builds_on_the_ray_image_of_our_version():
    text = (DEPLOY / "Dockerfile").read_text()
    tag = re.search(r"^ARG RAY_TAG=(\S+)$", text, re.M).group(1)
    assert tag == f"{RAY_VERSION}-py311"
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}$", text, re.M)
    assert "pip install --no-cache-dir ." in text
