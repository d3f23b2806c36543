"""The Helm chart, rendered by a real helm over a matrix of values.

Core resources are validated against the Kubernetes OpenAPI schemas
(kubernetes-validate --strict); the RayService's serveConfigV2 is parsed by
Ray's own Serve schema and its args resolved by shardqa's application
builder, so a rendered chart is known to deploy and to start the service.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shardqa.config import get_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "shardqa"
MONITORING = ROOT / "monitoring"
K8S_VERSION = "1.30.0"
#: Kinds with no schema in kubernetes-validate (custom resources); they are
#: checked by the dedicated tests below.
CUSTOM_KINDS = {"RayService", "PodMonitor", "PrometheusRule"}
MONITORING_API = "monitoring.coreos.com/v1"

pytestmark = pytest.mark.helm


def helm_binary() -> str:
    candidates = [os.environ.get("SHARDQA_HELM"), str(ROOT / ".tools" / "bin" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    message = "helm not found; run deploy/tools/install-helm.sh (make tools)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def set_args(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render(values: dict | None = None, api_versions: tuple[str, ...] = (), namespace: str = "qa") -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", namespace, *set_args(values or {})]
    for api in api_versions:
        args += ["--api-versions", api]
    docs = [d for d in yaml.safe_load_all(run_helm(*args).stdout) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def the(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """Every pod template in the release: workloads, Jobs, the Ray head and worker groups."""
    specs = []
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in {"StatefulSet", "Deployment", "Job"}:
            specs.append((f"{kind}/{name}", doc["spec"]["template"]["spec"]))
        elif kind == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            specs.append((f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]))
            for group in cluster["workerGroupSpecs"]:
                specs.append((f"{name}/{group['groupName']}", group["template"]["spec"]))
        elif kind == "ConfigMap" and "job.json" in doc.get("data", {}):
            specs.append((f"{name}/job.json", json.loads(doc["data"]["job.json"])["spec"]["template"]["spec"]))
    return specs


MATRIX = {
    "cpu-only": {},
    "gpu": {
        "gpuWorkers.enabled": True,
        "serve.numGpusPerReplica": 1,
        "gpuWorkers.replicas": 2,
        "gpuWorkers.gpusPerPod": 2,
        "image.gpuTag": "0.1.0-cuda",
    },
    "external-redis": {
        "redis.mode": "external",
        "redis.external.host": "redis.data.svc",
        "redis.external.tls": True,
        "redis.auth.existingSecret": "shardqa-redis-auth",
    },
    "cluster-redis": {"redis.mode": "cluster", "redis.cluster.nodes": 6, "redis.cluster.replicasPerMaster": 1},
    "ingress-autoscaling": {
        "ingress.enabled": True,
        "ingress.className": "nginx",
        "ingress.tls": [{"hosts": ["qa.example.org"], "secretName": "qa-tls"}],
        "ingress.hosts": ["qa.example.org"],
        "autoscaling": True,
        "serve.shards": 8,
        "serve.replicasPerShard": 3,
    },
    "minimal": {
        "networkPolicy.enabled": False,
        "podDisruptionBudget.enabled": False,
        "index.enabled": False,
        "cache.enabled": False,
        "monitoring.dashboards.enabled": False,
        "redis.persistence.enabled": False,
    },
}


@pytest.fixture(scope="module", params=sorted(MATRIX))
def case(request):
    values = MATRIX[request.param]
    return request.param, values, render(values, api_versions=(MONITORING_API,))


def test_lint_over_the_matrix():
    for name, values in MATRIX.items():
        result = run_helm("lint", str(CHART), "--strict", *set_args(values))
        assert "0 chart(s) failed" in result.stdout, f"{name}: {result.stdout}"


def test_core_resources_pass_strict_kubernetes_validation(case):
    name, _, docs = case
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # The Job kept in the ConfigMap for `shardqa cluster reindex` is a Job too.
    for cm in by_kind(docs, "ConfigMap"):
        if "job.json" in cm["data"]:
            kubernetes_validate.validate(json.loads(cm["data"]["job.json"]), K8S_VERSION, strict=True)


def test_kubernetes_validate_cli_strict(tmp_path):
    """The same check through the command-line tool, on the default render."""
    docs = [d for d in render() if d["kind"] not in CUSTOM_KINDS]
    manifest = tmp_path / "core.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    # The console script is installed beside the interpreter running the tests.
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(cli), "--strict", "-k", K8S_VERSION, str(manifest)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("INFO") >= len(docs) or "validated successfully" in result.stdout, result.stdout


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(the(docs, "RayService")["spec"]["serveConfigV2"])


def test_serve_config_is_valid_for_ray(case):
    from ray.serve.schema import ServeDeploySchema

    name, values, docs = case
    config = serve_config(docs)
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "shardqa.services.app:build_app"
    assert app.route_prefix == "/"
    assert schema.http_options.port == 8000
    assert app.args["shards"] == values.get("serve.shards", 4)
    assert app.args["replicas_per_shard"] == values.get("serve.replicasPerShard", 1)
    assert app.args["num_gpus_per_replica"] == values.get("serve.numGpusPerReplica", 0)


def test_serve_args_resolve_in_the_application_builder(case):
    """The args are what build_app accepts: the same resolution it runs in the cluster."""
    from shardqa.services.app import service_config_from_args

    name, values, docs = case
    args = serve_config(docs)["applications"][0]["args"]
    config = service_config_from_args(args)
    assert config.shards == values.get("serve.shards", 4)
    assert config.resources(0).replicas == values.get("serve.replicasPerShard", 1)
    assert config.resources(0).num_gpus == values.get("serve.numGpusPerReplica", 0)
    assert config.settings.max_batch_size == 16
    # No secret travels in the RayService spec.
    assert "store" not in args and "cache_url" not in args


def test_rayservice_shape(case):
    name, values, docs = case
    rs = the(docs, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == _pinned_ray_version()
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert cluster["enableInTreeAutoscaling"] is values.get("autoscaling", False)
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    if values.get("gpuWorkers.enabled"):
        gpu = groups["gpu"]
        container = gpu["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
        assert container["image"].endswith(":0.1.0-cuda")
        assert gpu["rayStartParams"]["num-gpus"] == "2"
        assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert gpu["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    else:
        assert set(groups) == {"cpu"}
        assert "nvidia.com/gpu" not in json.dumps(cluster)


def cpu_quantity(quantity) -> float:
    """A Kubernetes CPU quantity ("2", 2, "1500m") in CPUs."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_worker_resources(cluster: dict) -> tuple[int, float]:
    """The CPUs and GPUs Ray has on all worker pods, as KubeRay starts them:
    rayStartParams when set, else the Ray container's CPU limit (or request)
    rounded up to an integer and its GPU limit."""
    cpus, gpus = 0, 0.0
    for group in cluster["workerGroupSpecs"]:
        params = group["rayStartParams"]
        resources = group["template"]["spec"]["containers"][0]["resources"]
        cpu = params.get("num-cpus") or resources.get("limits", {}).get("cpu") or resources["requests"]["cpu"]
        gpu = params.get("num-gpus") or resources.get("limits", {}).get("nvidia.com/gpu", 0)
        cpus += group["replicas"] * math.ceil(cpu_quantity(cpu))
        gpus += group["replicas"] * float(gpu)
    return cpus, gpus


def test_worker_pods_hold_every_serve_replica(case):
    """Without the autoscaler the worker pods are all Ray gets: their CPUs and
    GPUs must hold what the application builder's deployments reserve, or
    replicas stay pending and the RayService never becomes ready."""
    from shardqa.services.app import service_config_from_args

    name, values, docs = case
    if values.get("autoscaling"):
        return  # the autoscaler adds pods as replicas need them
    cluster = the(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    config = service_config_from_args(serve_config(docs)["applications"][0]["args"])
    cpus, gpus = ray_worker_resources(cluster)
    assert config.total_cpus <= cpus, f"{name}: {config.total_cpus} CPUs needed, {cpus} on the workers"
    assert config.total_gpus <= gpus, f"{name}: {config.total_gpus} GPUs needed, {gpus} on the workers"


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"cpuWorkers.replicas": 2},
            "serve needs 5 CPUs (4 shards x 1 replicasPerShard x 1 numCpusPerReplica + 2 ingressReplicas x 0.5)"
            " but the worker groups give Ray 4 (cpuWorkers: 2 pods x 2 CPUs);"
            " raise cpuWorkers.replicas or cpuWorkers.resources.limits.cpu",
        ),
        ({"serve.replicasPerShard": 2}, "serve needs 9 CPUs"),
        # KubeRay rounds 1500m up to 2 CPUs a pod.
        (
            {"cpuWorkers.replicas": 2, "cpuWorkers.resources.limits.cpu": "1500m"},
            "give Ray 4 (cpuWorkers: 2 pods x 2 CPUs)",
        ),
        (
            {"gpuWorkers.enabled": True, "serve.numGpusPerReplica": 1, "gpuWorkers.gpusPerPod": 2},
            "serve needs 4 GPUs (4 shards x 1 replicasPerShard x 1 numGpusPerReplica) but the GPU workers have 2"
            " (gpuWorkers: 1 pods x 2 gpusPerPod); raise gpuWorkers.replicas or gpuWorkers.gpusPerPod",
        ),
        # Enough CPUs in total, but no pod holds one replica; the autoscaler cannot help.
        (
            {"serve.numCpusPerReplica": 3, "cpuWorkers.replicas": 8, "autoscaling": True},
            "one shard replica needs 3 CPUs (serve.numCpusPerReplica) but the largest worker pod that can hold it gives Ray 2",
        ),
        (
            {"gpuWorkers.enabled": True, "serve.numGpusPerReplica": 2, "gpuWorkers.replicas": 8, "gpuWorkers.maxReplicas": 8},
            "one shard replica needs 2 GPUs (serve.numGpusPerReplica) but a GPU worker pod has 1",
        ),
        # A GPU replica fits only on GPU pods, however big the CPU pods are.
        (
            {"gpuWorkers.enabled": True, "serve.numGpusPerReplica": 1, "serve.numCpusPerReplica": 4, "gpuWorkers.replicas": 4,
             "gpuWorkers.resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}},
             "cpuWorkers.resources": {"requests": {"cpu": "8", "memory": "8Gi"}, "limits": {"cpu": "8", "memory": "8Gi"}}},
            "the largest worker pod that can hold it (a GPU pod) gives Ray 2",
        ),
        # A group with no pods holds nothing.
        (
            {"gpuWorkers.enabled": True, "gpuWorkers.replicas": 8, "gpuWorkers.maxReplicas": 8, "cpuWorkers.replicas": 0, "cpuWorkers.minReplicas": 0,
             "serve.numCpusPerReplica": 3,
             "cpuWorkers.resources": {"requests": {"cpu": "8", "memory": "8Gi"}, "limits": {"cpu": "8", "memory": "8Gi"}},
             "gpuWorkers.resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}},
            "the largest worker pod that can hold it gives Ray 2",
        ),
        # Enough CPUs in total (6 for 5.8), but a 2-CPU pod holds one replica of 1.2.
        (
            {"serve.numCpusPerReplica": 1.2},
            "serve runs 4 shard replicas (4 shards x 1 replicasPerShard) but the worker pods hold only 3 of them:"
            " a replica (serve.numCpusPerReplica=1.2) never spans pods (cpuWorkers: 3 pods, 1 each);"
            " raise cpuWorkers.replicas or cpuWorkers.resources.limits.cpu, or lower serve.numCpusPerReplica",
        ),
        # GPU replicas count only the GPU pods' CPUs.
        (
            {"gpuWorkers.enabled": True, "serve.numGpusPerReplica": 0.25, "gpuWorkers.gpusPerPod": 4,
             "gpuWorkers.resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}},
            "but the worker pods hold only 2 of them: a replica (serve.numCpusPerReplica=1, numGpusPerReplica=0.25) never"
            " spans pods (gpuWorkers: 1 pods, 2 each); raise gpuWorkers.replicas or gpuWorkers.resources.limits.cpu",
        ),
        # KubeRay clamps replicas into [minReplicas, maxReplicas], autoscaler or not.
        (
            {"serve.shards": 16, "serve.replicasPerShard": 2, "cpuWorkers.replicas": 17},
            "cpuWorkers.replicas (17) is outside cpuWorkers.minReplicas..maxReplicas (1..8), where KubeRay would keep it at 8;"
            " set cpuWorkers.minReplicas <= cpuWorkers.replicas <= cpuWorkers.maxReplicas (e.g. cpuWorkers.maxReplicas=17)",
        ),
        ({"cpuWorkers.minReplicas": 5, "cpuWorkers.maxReplicas": 3}, "cpuWorkers.minReplicas (5) is above cpuWorkers.maxReplicas (3)"),
        # Enough CPUs in total (3.9 of 4) and a pod for each shard replica, but each pod keeps
        # only 0.8 CPU beside its 1.2-CPU shard replica: room for 2 of the 3 ingress replicas.
        (
            {"serve.shards": 2, "serve.numCpusPerReplica": 1.2, "serve.ingressReplicas": 3, "cpuWorkers.replicas": 2},
            "serve runs 3 ingress replicas of 0.5 CPU, but the CPUs the shard replicas leave free on the worker pods"
            " (a replica never spans pods) hold only 2 of them; raise cpuWorkers.replicas",
        ),
        ({"cpuWorkers.minReplicas": 5, "cpuWorkers.maxReplicas": 3, "autoscaling": True}, "cpuWorkers.minReplicas (5) is above"),
    ],
)
def test_under_provisioned_workers_fail_with_what_to_raise(values, message):
    result = run_helm("template", "rel", str(CHART), *set_args(values), check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    "values",
    [
        # 3 pods x ceil(1.5) = 6 CPUs for the 5 needed.
        {"cpuWorkers.resources.limits.cpu": "1500m"},
        # No limit: KubeRay takes the request (2).
        {"cpuWorkers.resources.limits": None},
        # The GPU pods' CPUs count too.
        {"cpuWorkers.replicas": 1, "gpuWorkers.enabled": True, "gpuWorkers.replicas": 1},
    ],
)
def test_capacity_counts_cpus_as_kuberay_does(values):
    from shardqa.services.app import service_config_from_args

    docs = render(values)
    config = service_config_from_args(serve_config(docs)["applications"][0]["args"])
    cluster = the(docs, "RayService")["spec"]["rayClusterConfig"]
    cpus, _ = ray_worker_resources(cluster)
    assert config.total_cpus <= cpus
    if "cpuWorkers.resources.limits" in values:
        assert "limits" not in cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]


def test_autoscaling_skips_the_capacity_check():
    docs = render({"autoscaling": True, "cpuWorkers.replicas": 1, "serve.replicasPerShard": 4})
    cluster = the(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["workerGroupSpecs"][0]["replicas"] == 1


@pytest.mark.parametrize("autoscaling", [True, False])
def test_only_the_autoscaling_head_mounts_the_api_token(autoscaling):
    docs = render({"autoscaling": autoscaling})
    assert the(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    for where, spec in pod_specs(docs):
        assert spec["automountServiceAccountToken"] is (autoscaling and where.endswith("/head")), where


@pytest.mark.parametrize("autoscaling", [True, False])
def test_the_autoscaler_sidecar_gets_limits_and_the_security_context(autoscaling):
    # KubeRay adds the sidecar itself, from autoscalerOptions only.
    docs = render({"autoscaling": autoscaling})
    cluster = the(docs, "RayService")["spec"]["rayClusterConfig"]
    if not autoscaling:
        assert "autoscalerOptions" not in cluster
        return
    options = cluster["autoscalerOptions"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert options["securityContext"] == head["securityContext"]
    assert options["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= options["resources"]["limits"].keys()


def _pinned_ray_version() -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


def test_every_pod_is_non_root_with_resources_and_probes(case):
    name, values, docs = case
    specs = pod_specs(docs)
    assert specs
    for where, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        # KubeRay's autoscaler sidecar on the head calls the API with the token.
        autoscaler_head = where.endswith("/head") and values.get("autoscaling", False)
        assert spec["automountServiceAccountToken"] is autoscaler_head, where
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            long_running = "Job" not in where and "job.json" not in where
            if long_running:
                assert "readinessProbe" in container and "livenessProbe" in container, where


def test_redis_password_only_from_a_secret(case):
    name, values, docs = case
    rendered = yaml.safe_dump_all(docs)
    secret_name = values.get("redis.auth.existingSecret", "rel-shardqa-redis")
    for where, spec in pod_specs(docs):
        for container in spec["containers"]:
            env = container.get("env", [])
            names = [e["name"] for e in env]
            for entry in env:
                if "PASSWORD" in entry["name"] or entry["name"] == "REDISCLI_AUTH":
                    assert entry["valueFrom"]["secretKeyRef"]["name"] == secret_name, where
                    assert "value" not in entry
                if entry["name"] in ("SHARDQA_STORE", "SHARDQA_CACHE_URL"):
                    # $(REDIS_PASSWORD) only expands from a variable defined earlier.
                    assert "$(REDIS_PASSWORD)" in entry["value"]
                    assert names.index("REDIS_PASSWORD") < names.index(entry["name"]), where
    secrets = by_kind(docs, "Secret")
    if values.get("redis.mode") == "external":
        assert secrets == []
        assert "rediss://:$(REDIS_PASSWORD)@redis.data.svc:6379/0" in rendered
    else:
        (secret,) = secrets
        password = base64.b64decode(secret["data"]["redis-password"]).decode()
        assert len(password) == 32 and password.isalnum()
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        # The generated password appears nowhere but in its Secret.
        assert rendered.count(secret["data"]["redis-password"]) == 1
        assert password not in rendered


def test_redis_modes(case):
    name, values, docs = case
    mode = values.get("redis.mode", "standalone")
    statefulsets = by_kind(docs, "StatefulSet")
    ray_env = the(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    store = next(e["value"] for e in ray_env if e["name"] == "SHARDQA_STORE")
    if mode == "external":
        assert statefulsets == []
        assert store.startswith("rediss://")
    elif mode == "cluster":
        (sts,) = statefulsets
        assert sts["spec"]["replicas"] == 6
        assert store.startswith("redis+cluster://:$(REDIS_PASSWORD)@")
        assert store.count(",") == 5
        assert "rel-shardqa-redis-5.rel-shardqa-redis-headless.qa.svc:6379" in store
        config = next(cm for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"] == "rel-shardqa-redis-config")
        assert "cluster-enabled yes" in config["data"]["redis.conf"]
        init = next(j for j in by_kind(docs, "Job") if j["metadata"]["name"].endswith("cluster-init"))
        assert init["metadata"]["annotations"]["helm.sh/hook-weight"] == "0"
        assert "--cluster-replicas 1" in init["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    else:
        (sts,) = statefulsets
        assert sts["spec"]["replicas"] == 1
        assert store == "redis://:$(REDIS_PASSWORD)@rel-shardqa-redis:6379/0"
    cache = [e for e in ray_env if e["name"] == "SHARDQA_CACHE_URL"]
    assert bool(cache) == values.get("cache.enabled", True)


def test_index_job_hook_and_reindex_template(case):
    name, values, docs = case
    jobs = [j for j in by_kind(docs, "Job") if j["metadata"]["labels"]["app.kubernetes.io/component"] == "index"]
    templates = [cm for cm in by_kind(docs, "ConfigMap") if "job.json" in cm.get("data", {})]
    if values.get("index.enabled") is False:
        assert jobs == [] and templates == []
        return
    (job,) = jobs
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert int(job["metadata"]["annotations"]["helm.sh/hook-weight"]) > 0  # after the Redis cluster init
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "shardqa index" in container["command"][2]
    assert {"name": "SHARDQA_CORPUS", "value": "/home/ray/shardqa/samples/squad-dev-sample.json"} in container["env"]
    # The hook builds only when its key changed (`shardqa index --build-key`).
    assert "--build-key" in container["command"][2]
    (key,) = [e["value"] for e in container["env"] if e["name"] == "SHARDQA_INDEX_BUILD_KEY"]
    assert len(key) == 32
    (template,) = templates
    stored = json.loads(template["data"]["job.json"])
    # The stored Job is the hook Job without the hook and its key: a reindex
    # from the command line always builds.
    container["env"] = [e for e in container["env"] if e["name"] != "SHARDQA_INDEX_BUILD_KEY"]
    assert stored["spec"] == job["spec"]
    assert "annotations" not in stored["metadata"]


def _index_build_key(values: dict | None = None) -> str:
    job = next(j for j in by_kind(render(values), "Job") if j["metadata"]["labels"]["app.kubernetes.io/component"] == "index")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    return next(e["value"] for e in env if e["name"] == "SHARDQA_INDEX_BUILD_KEY")


def test_every_shardqa_variable_the_chart_sets_is_a_setting_or_known_to_the_cli():
    # Else `shardqa` warns in the pods' logs that the variable is ignored.
    from shardqa.cli import NOT_SETTINGS
    from shardqa.config import Settings

    settings = {f"SHARDQA_{name.upper()}" for name in Settings.model_fields}
    docs = render({"serve.extraEnv": {"SHARDQA_CACHE_TTL_S": "600"}, "serve.model": "/models/qa"})
    for where, spec in pod_specs(docs):
        for name in _env_names(spec):
            if name.startswith("SHARDQA_"):
                assert name in settings or name in NOT_SETTINGS, (where, name)


def test_index_build_key_changes_only_with_what_the_index_is_built_from():
    # An upgrade that changes only the image, the serving settings or the
    # ingress keeps the key, so the hook keeps the current version (which may
    # be a `cluster reindex` of another corpus); the index values change it.
    default = _index_build_key()
    for same in ({"image.tag": "0.2.0"}, {"serve.routeK": 8}, {"ingress.enabled": True}, {"cache.enabled": False},
                 {"serve.extraEnv": {"SHARDQA_MAX_BATCH_SIZE": "16"}}, {"redis.auth.existingSecret": "other"}):
        assert _index_build_key(same) == default, same
    for changed in ({"index.corpus": "/data/other.jsonl"}, {"serve.shards": 2}, {"serve.model": "/models/other"},
                    {"index.extraArgs": ["--passage-sentences", "2"]}, {"serve.extraEnv": {"SHARDQA_PASSAGE_MAX_TOKENS": "96"}}):
        assert _index_build_key(changed) != default, changed


def test_serve_from_keeps_port_8000_open_to_the_operator_and_the_api_server_proxy():
    clients = [{"namespaceSelector": {"matchLabels": {"team": "web"}}}]
    proxy = [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    docs = render({"networkPolicy.serveFrom": clients, "networkPolicy.dashboardFrom": proxy})
    ray = next(p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray"))
    (serve_rule,) = [r for r in ray["spec"]["ingress"] if {"port": 8000, "protocol": "TCP"} in r.get("ports", [])]
    operator = render()  # the default operatorFrom
    operator_peers = next(r for r in next(p for p in by_kind(operator, "NetworkPolicy") if p["metadata"]["name"].endswith("-ray"))
                          ["spec"]["ingress"] if {"port": 52365, "protocol": "TCP"} in r.get("ports", []))["from"]
    assert serve_rule["from"] == clients + operator_peers + proxy


def test_redis_pods_prefer_separate_nodes_unless_told_otherwise():
    (sts,) = by_kind(render({"redis.mode": "cluster"}), "StatefulSet")
    pod = sts["spec"]["template"]
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    selector = term["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items() and selector["app.kubernetes.io/component"] == "redis"
    zones = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
              "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "redis"}}}]
    own = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}]}}}
    (sts,) = by_kind(render({"redis.mode": "cluster", "redis.affinity": own, "redis.topologySpreadConstraints": zones}), "StatefulSet")
    assert sts["spec"]["template"]["spec"]["affinity"] == own
    assert sts["spec"]["template"]["spec"]["topologySpreadConstraints"] == zones


def test_network_policies_and_pdbs(case):
    name, values, docs = case
    policies = {p["metadata"]["name"]: p for p in by_kind(docs, "NetworkPolicy")}
    pdbs = {p["metadata"]["name"]: p for p in by_kind(docs, "PodDisruptionBudget")}
    if values.get("networkPolicy.enabled") is False:
        assert policies == {} and pdbs == {}
        return
    ray = policies["rel-shardqa-ray"]
    ports = {p["port"] for rule in ray["spec"]["ingress"] for p in rule.get("ports", [])}
    assert {8000, 8080, 8265, 52365} <= ports
    if values.get("redis.mode") != "external":
        redis = policies["rel-shardqa-redis"]
        (rule,) = redis["spec"]["ingress"]
        assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "rel"
    assert "rel-shardqa-ray-cpu" in pdbs
    assert ("rel-shardqa-ray-gpu" in pdbs) == bool(values.get("gpuWorkers.enabled"))
    assert ("rel-shardqa-redis" in pdbs) == (values.get("redis.mode") == "cluster")
    # Every PDB selects pods the chart actually labels.
    labelled = {
        spec_labels.get("app.kubernetes.io/component")
        for spec_labels in _pod_labels(docs)
    }
    for pdb in pdbs.values():
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] in labelled


def _pod_labels(docs):
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            yield doc["spec"]["template"]["metadata"]["labels"]
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            yield cluster["headGroupSpec"]["template"]["metadata"]["labels"]
            for group in cluster["workerGroupSpecs"]:
                yield group["template"]["metadata"]["labels"]


def test_ingress(case):
    name, values, docs = case
    ingresses = by_kind(docs, "Ingress")
    if not values.get("ingress.enabled"):
        assert ingresses == []
        return
    (ingress,) = ingresses
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-shardqa-serve-svc", "port": {"number": 8000}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"][0]["secretName"] == "qa-tls"


def test_monitoring_resources_follow_the_crds():
    without = render()
    assert by_kind(without, "PodMonitor") == [] and by_kind(without, "PrometheusRule") == []
    with_crds = render(api_versions=(MONITORING_API,))
    podmonitor = the(with_crds, "PodMonitor")
    endpoint = podmonitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    relabel = endpoint["metricRelabelings"][0]
    assert relabel["regex"] == "ray_(shardqa_.*)" and relabel["replacement"] == "$1"
    selected = podmonitor["spec"]["selector"]["matchExpressions"][0]["values"]
    assert set(selected) == {"ray-head", "ray-worker-cpu", "ray-worker-gpu"}
    forced = render({"monitoring.forceCRDs": True})
    assert len(by_kind(forced, "PodMonitor")) == 1


def test_prometheus_rule_is_the_rules_file_with_targets_from_values():
    monitoring_rules = yaml.safe_load((MONITORING / "alerts" / "shardqa.rules.yaml").read_text())
    rule = the(render(api_versions=(MONITORING_API,)), "PrometheusRule")
    # Defaults: identical to the file promtool checks and unit-tests, but for
    # the release's namespace on the target series (the alerts match on it).
    file_groups = _normalise(monitoring_rules["groups"])
    for r in file_groups[0]["rules"]:
        r["labels"] = {"namespace": "qa", **r.get("labels", {})}  # render()'s namespace
    assert _normalise(rule["spec"]["groups"]) == _normalise(file_groups)
    custom = the(
        render({"targets.p99Ms": 80, "targets.p50Ms": 25, "targets.cachedP50Ms": 2.5, "targets.errorRatio": 0.02}, (MONITORING_API,)),
        "PrometheusRule",
    )
    targets = {
        (r["record"], r.get("labels", {}).get("quantile"), r.get("labels", {}).get("cached")): r["expr"]
        for r in custom["spec"]["groups"][0]["rules"]
    }
    assert targets[("shardqa:target_latency_seconds", "0.99", "false")] == "vector(0.08)"
    assert targets[("shardqa:target_latency_seconds", "0.5", "false")] == "vector(0.025)"
    assert targets[("shardqa:target_latency_seconds", "0.5", "true")] == "vector(0.0025)"
    assert targets[("shardqa:target_error_ratio", None, None)] == "vector(0.02)"


def _normalise(groups):
    return [{"name": g["name"], "rules": [dict(sorted(r.items())) for r in g["rules"]]} for g in groups]


def test_chart_files_are_copies_of_monitoring():
    for name in ("alerts/shardqa.rules.yaml",):
        assert (CHART / "files" / name).read_text() == (MONITORING / name).read_text(), name
    chart_dashboards = sorted(p.name for p in (CHART / "files" / "dashboards").glob("*.json"))
    assert chart_dashboards == sorted(p.name for p in (MONITORING / "dashboards").glob("*.json"))
    for name in chart_dashboards:
        assert (CHART / "files" / "dashboards" / name).read_text() == (MONITORING / "dashboards" / name).read_text()


def test_dashboards_configmap_for_the_grafana_sidecar():
    cm = next(c for c in by_kind(render(), "ConfigMap") if c["metadata"]["name"] == "rel-shardqa-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"]["grafana_folder"] == "shardqa"
    for name, body in cm["data"].items():
        assert json.loads(body) == json.loads((MONITORING / "dashboards" / name).read_text())


def test_value_defaults_match_settings():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    settings = get_settings()
    assert values["targets"]["p50Ms"] == settings.target_p50_ms
    assert values["targets"]["p99Ms"] == settings.target_p99_ms
    assert values["targets"]["cachedP50Ms"] == settings.target_cached_p50_ms
    assert values["serve"]["maxBatchSize"] == settings.max_batch_size
    assert values["serve"]["batchWaitTimeoutS"] == settings.batch_wait_timeout_s
    assert values["serve"]["backend"] == settings.backend
    assert values["serve"]["routeK"] == settings.route_k
    assert values["serve"]["shardTransport"] == settings.shard_transport
    assert values["rayVersion"] == _pinned_ray_version()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"serve.shards": 0}, "/serve/shards"),
        ({"serve.backend": "tensorrt"}, "/serve/backend"),
        ({"serve.shardTransport": "http"}, "/serve/shardTransport"),
        ({"redis.password": "hunter2"}, "additional properties 'password' not allowed"),
        ({"redis.mode": "sentinel"}, "/redis/mode"),
        ({"podSecurityContext.runAsNonRoot": False}, "/podSecurityContext/runAsNonRoot"),
        ({"targets.errorRatio": 2}, "/targets/errorRatio"),
        ({"serve.extraEnv": {"PATH": "/tmp"}}, "'PATH' does not match pattern '^SHARDQA_"),
        ({"redis.mode": "external", "redis.external.host": "r"}, "needs redis.auth.existingSecret"),
        ({"serve.numGpusPerReplica": 1}, "needs gpuWorkers.enabled=true"),
        ({"redis.mode": "cluster", "redis.cluster.nodes": 4}, "at least 3 x (1 + replicasPerMaster)"),
        ({"redis.maxmemory": "lots"}, "/redis/maxmemory"),
        ({"ingress.enabled": True, "ingress.hosts": []}, "needs at least one host in ingress.hosts"),
        ({"monitoring.podMonitor.interval": "5x"}, "/monitoring/podMonitor/interval"),
        ({"monitoring.podMonitor.interval": ""}, "/monitoring/podMonitor/interval"),
        ({"redis.persistence.size": "8GB"}, "/redis/persistence/size"),
        ({"redis.persistence.size": "8"}, "/redis/persistence/size"),  # 8 bytes: a unit is required
    ],
)
def test_bad_values_fail_at_install_time(values, message):
    result = run_helm("template", "rel", str(CHART), *set_args(values), check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("values", [
    {"monitoring.podMonitor.interval": "1m30s"},
    {"monitoring.podMonitor.interval": "1h"},
    {"redis.persistence.size": "8G"},
    {"redis.persistence.size": "500Mi"},
])
def test_values_in_every_form_kubernetes_and_prometheus_accept(values):
    render(values)


def test_numeric_index_args_from_set_arrive_as_strings():
    result = run_helm("template", "rel", str(CHART), "--set", "index.extraArgs={--passage-sentences,4}")
    job = the([d for d in yaml.safe_load_all(result.stdout) if d], "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["--passage-sentences", "4"]


def test_notes_render():
    result = run_helm("install", "rel", str(CHART), "--dry-run=client", "--namespace", "qa", "--set", "ingress.enabled=true")
    assert "NOTES:" in result.stdout
    assert "https" not in result.stdout.split("NOTES:")[1].split("3.")[0]
    assert "http://shardqa.example.com/v1/answer" in result.stdout
    assert "shardqa cluster status --namespace qa --name rel-shardqa" in result.stdout


@pytest.mark.parametrize("fast", [True, False])
def test_fast_ingress_sets_serves_haproxy_flag_on_every_ray_pod(fast):
    docs = render({"serve.fastIngress": fast})
    ray_pods = [(name, spec) for name, spec in pod_specs(docs) if "/head" in name or "/cpu" in name]
    assert ray_pods
    for name, spec in ray_pods:
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert (env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1") is fast, name


@pytest.mark.parametrize("kube, ok", [("1.26.9", False), ("1.27.0", True)])
def test_kubernetes_version_floor(kube, ok):
    """The worker PDBs' unhealthyPodEvictionPolicy is on by default from 1.27."""
    result = run_helm("template", "rel", str(CHART), "--kube-version", kube, check=False)
    assert (result.returncode == 0) is ok, result.stderr
    if ok:
        pdbs = by_kind([d for d in yaml.safe_load_all(result.stdout) if d], "PodDisruptionBudget")
        assert any("unhealthyPodEvictionPolicy" in pdb["spec"] for pdb in pdbs)
    else:
        assert "kubeVersion" in result.stderr


@pytest.mark.parametrize("cluster", [False, True])
def test_external_redis_with_an_acl_user_and_a_private_ca(cluster):
    from shardqa.redis_url import parse_redis_url

    values = {"redis.mode": "external", "redis.external.host": "redis.data.svc", "redis.external.tls": True,
              "redis.external.cluster": cluster, "redis.external.username": "shardqa",
              "redis.external.caSecret": "redis-ca", "redis.auth.existingSecret": "shardqa-redis-auth"}
    docs = render(values)
    specs = dict(pod_specs(docs))
    for where in ("rel-shardqa/head", "rel-shardqa/cpu", "Job/rel-shardqa-index"):
        spec = specs[where]
        container = spec["containers"][0]
        url = next(e["value"] for e in container["env"] if e["name"] == "SHARDQA_STORE")
        parsed = parse_redis_url(url.replace("$(REDIS_PASSWORD)", "pw"))
        assert parsed.auth == {"username": "shardqa", "password": "pw"} and parsed.ssl and parsed.cluster is cluster
        (ca_file,) = parsed.query["ssl_ca_certs"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "redis-ca"]
        assert ca_file == mount["mountPath"] + "/ca.crt" and mount["readOnly"] is True, where
        (volume,) = [v for v in spec["volumes"] if v["name"] == "redis-ca"]
        assert volume["secret"]["secretName"] == "redis-ca", where
    result = run_helm("template", "rel", str(CHART), *set_args({**values, "redis.external.tls": False}), check=False)
    assert result.returncode != 0 and "caSecret needs redis.external.tls=true" in result.stderr


@pytest.mark.parametrize("tls, scheme", [(True, "rediss+cluster"), (False, "redis+cluster")])
def test_external_redis_cluster_url_keeps_tls(tls, scheme):
    from shardqa.redis_url import parse_redis_url

    docs = render({
        "redis.mode": "external",
        "redis.external.host": "redis.data.svc",
        "redis.external.cluster": True,
        "redis.external.tls": tls,
        "redis.auth.existingSecret": "shardqa-redis-auth",
    })
    env = the(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    for name in ("SHARDQA_STORE", "SHARDQA_CACHE_URL"):
        url = next(e["value"] for e in env if e["name"] == name)
        assert url == f"{scheme}://:$(REDIS_PASSWORD)@redis.data.svc:6379"
        parsed = parse_redis_url(url.replace("$(REDIS_PASSWORD)", "pw"))
        assert parsed.cluster and parsed.ssl is tls


def _env_names(spec: dict) -> list[str]:
    return [e["name"] for e in spec["containers"][0]["env"]]


def test_ray_pods_get_only_the_env_their_processes_read():
    docs = render({"serve.model": "/models/qa", "serve.extraEnv": {"SHARDQA_CACHE_TTL_S": "600"}})
    specs = dict(pod_specs(docs))
    redis_env = {"REDIS_PASSWORD", "SHARDQA_STORE", "SHARDQA_CACHE_URL"}
    for where in ("rel-shardqa/head", "rel-shardqa/cpu"):
        # The model reaches the replicas through the serve args.
        assert set(_env_names(specs[where])) == redis_env | {"SHARDQA_CACHE_TTL_S", "RAY_metrics_report_interval_ms"}, where
    job = specs["Job/rel-shardqa-index"]
    # The index build reads the shard count (and the model's tokenizer) from its environment.
    assert set(_env_names(job)) == redis_env | {"SHARDQA_MODEL", "SHARDQA_CACHE_TTL_S", "SHARDQA_SHARDS", "SHARDQA_CORPUS", "SHARDQA_INDEX_BUILD_KEY"}
    assert {"name": "SHARDQA_SHARDS", "value": "4"} in job["containers"][0]["env"]


@pytest.fixture(scope="module")
def default_rayservice():
    return the(render(), "RayService")


@pytest.mark.parametrize(
    "values",
    [
        {"serve.ingressReplicas": 3},
        {"serve.routeK": 8},
        {"serve.shardTransport": "actor"},
        {"serve.backend": "onnx"},
        {"serve.shards": 2},
        {"serve.model": "/models/other-qa"},
        {"targets.p50Ms": 25, "targets.p99Ms": 80, "targets.cachedP50Ms": 2.5, "targets.errorRatio": 0.02},
    ],
    ids=["ingressReplicas", "routeK", "shardTransport", "backend", "shards", "model", "targets"],
)
def test_serve_and_target_changes_keep_the_ray_cluster(values, default_rayservice):
    """KubeRay answers any change of rayClusterConfig with a whole new Ray
    cluster; what the serve args carry is applied to the running one."""
    rs = the(render(values), "RayService")
    assert rs["spec"]["rayClusterConfig"] == default_rayservice["spec"]["rayClusterConfig"]
    changes_serve = any(key.startswith("serve.") for key in values)
    assert (rs["spec"]["serveConfigV2"] != default_rayservice["spec"]["serveConfigV2"]) is changes_serve


def test_a_chart_version_bump_keeps_the_ray_cluster_and_redis_pods(tmp_path, default_rayservice):
    import shutil

    chart = tmp_path / "shardqa"
    shutil.copytree(CHART, chart)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta["version"] = meta["version"] + "-next"
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    bumped = [d for d in yaml.safe_load_all(run_helm("template", "rel", str(chart), "--namespace", "qa").stdout) if d]
    assert the(bumped, "RayService")["spec"]["rayClusterConfig"] == default_rayservice["spec"]["rayClusterConfig"]
    redis_pods = [s["spec"]["template"] for s in by_kind(bumped, "StatefulSet")]
    assert redis_pods == [s["spec"]["template"] for s in by_kind(render(), "StatefulSet")]


def _dashboard_rules(docs: list[dict]) -> list[dict]:
    ray = next(p for p in by_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == "rel-shardqa-ray")
    return [rule for rule in ray["spec"]["ingress"] if any(p["port"] == 8265 for p in rule.get("ports", []))]


def test_dashboard_port_open_to_dashboard_from():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (operator_rule,) = _dashboard_rules(render())
    assert operator_rule["from"] == values["networkPolicy"]["operatorFrom"]
    peer = {"ipBlock": {"cidr": "10.0.0.10/32"}}
    rules = _dashboard_rules(render({"networkPolicy.dashboardFrom": [peer]}))
    assert operator_rule in rules
    (extra,) = [rule for rule in rules if rule != operator_rule]
    assert extra == {"ports": [{"port": 8265, "protocol": "TCP"}], "from": [peer]}
    # `shardqa cluster status` names the value when the dashboard is out of reach.
    assert "networkPolicy.dashboardFrom" in (MONITORING / "cluster.py").read_text()
    assert values["networkPolicy"]["dashboardFrom"] == []


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_every_pod_pulls_with_the_pull_secrets(name):
    docs = render({**MATRIX[name], "imagePullSecrets": [{"name": "regcred"}]}, api_versions=(MONITORING_API,))
    specs = pod_specs(docs)
    assert specs
    for where, spec in specs:
        assert spec.get("imagePullSecrets") == [{"name": "regcred"}], f"{name}: {where}"


def test_fractions_from_plain_set():
    """helm --set passes 0.5 as a string (only integers and booleans are
    converted); the chart takes it and renders numbers."""
    settings = [
        "gpuWorkers.enabled=true",
        "gpuWorkers.replicas=2",
        "serve.numGpusPerReplica=0.5",
        "serve.numCpusPerReplica=0.5",
        "serve.batchWaitTimeoutS=0.002",
        "targets.errorRatio=0.02",
        "targets.cachedP50Ms=2.5",
    ]
    set_flags = [flag for setting in settings for flag in ("--set", setting)]
    result = run_helm("template", "rel", str(CHART), "--api-versions", MONITORING_API, *set_flags)
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    args = serve_config(docs)["applications"][0]["args"]
    assert (args["num_gpus_per_replica"], args["num_cpus_per_replica"], args["batch_wait_timeout_s"]) == (0.5, 0.5, 0.002)
    assert all(isinstance(args[k], float) for k in ("num_gpus_per_replica", "num_cpus_per_replica", "batch_wait_timeout_s"))
    rules = {
        (r["record"], r.get("labels", {}).get("cached")): r["expr"]
        for r in the(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
        if r.get("labels", {}).get("quantile") != "0.99"
    }
    assert rules[("shardqa:target_error_ratio", None)] == "vector(0.02)"
    assert rules[("shardqa:target_latency_seconds", "true")] == "vector(0.0025)"


@pytest.mark.parametrize(
    "setting, path",
    [
        ("serve.numGpusPerReplica=-0.5", "/serve/numGpusPerReplica"),
        ("serve.numCpusPerReplica=half", "/serve/numCpusPerReplica"),
        ("serve.batchWaitTimeoutS=1.5", "/serve/batchWaitTimeoutS"),
        ("targets.errorRatio=1.5", "/targets/errorRatio"),
        ("targets.errorRatio=0.0", "/targets/errorRatio"),
        ("targets.p99Ms=0.0", "/targets/p99Ms"),
    ],
)
def test_fractions_from_plain_set_keep_their_range(setting, path):
    result = run_helm("template", "rel", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert path in result.stderr


def _redis_conf(docs: list[dict]) -> list[str]:
    config = next(cm for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"] == "rel-shardqa-redis-config")
    return [line.strip() for line in config["data"]["redis.conf"].splitlines()]


def _bytes(quantity: str) -> int:
    """Redis (1600mb) or Kubernetes (2Gi) memory sizes; both units are powers of 1024 here."""
    number = int("".join(c for c in quantity if c.isdigit()))
    unit = quantity.lstrip("0123456789").lower().rstrip("bi")
    return number * 1024 ** {"": 0, "k": 1, "m": 2, "g": 3}[unit]


def test_redis_evicts_cache_entries_before_its_memory_limit():
    values = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]
    assert _bytes(values["maxmemory"]) < _bytes(values["resources"]["limits"]["memory"])
    default = render()
    conf = _redis_conf(default)
    # Answer-cache keys carry a TTL, index keys none: only the cache is evicted.
    assert f"maxmemory {values['maxmemory']}" in conf and "maxmemory-policy volatile-lru" in conf
    custom = render({"redis.mode": "cluster", "redis.maxmemory": "3gb"})
    assert "maxmemory 3gb" in _redis_conf(custom)
    # Redis reads its config at start only: a new limit rolls the pods.
    checksum = lambda docs: the(docs, "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum(render({"redis.maxmemory": "1gb"})) != checksum(default)


def test_a_byte_count_from_a_values_file_reaches_redis_as_an_integer(tmp_path):
    """Numbers in a values file arrive as floats; Redis refuses `maxmemory 2e+09`."""
    values = tmp_path / "values.yaml"
    values.write_text("redis:\n  maxmemory: 2000000000\n")
    out = run_helm("template", "rel", str(CHART), "-f", str(values)).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert "maxmemory 2000000000" in _redis_conf(docs)
