"""`shardqa cluster status|reindex` against a stand-in Kubernetes API server.

kmock serves the Kubernetes HTTP API on loopback; the official client talks
to it exactly as to a real API server. The client is synchronous, so it runs
in a worker thread while the server runs on the test's event loop; the test
plays the cluster's controllers (Job completion, pods) by editing the
server's objects.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import kmock
import pytest
import pytest_asyncio
import yaml
from typer.testing import CliRunner

from shardqa.monitoring.cluster import (
    INDEX_VERSION_ANNOTATION,
    REINDEX_LABEL,
    ClusterError,
    ShardQACluster,
)

NS, NAME = "qa", "rel-shardqa"
RAYSERVICE = kmock.resource("ray.io", "v1", "rayservices")
JOBS = kmock.resource("batch", "v1", "jobs")
PODS = kmock.resource("", "v1", "pods")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
HELM_JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": f"{NAME}-index", "labels": {"app.kubernetes.io/component": "index"}},
    "spec": {
        "backoffLimit": 6,
        "template": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "index",
                        "image": "shardqa/shardqa:0.1.0",
                        "env": [{"name": "SHARDQA_CORPUS", "value": "/home/ray/shardqa/samples/squad-dev-sample.json"}],
                    }
                ],
            }
        },
    },
}

def rayservice(shard_statuses: dict[str, str] | None = None, ready: bool = True) -> dict:
    deployments = {name: {"status": status} for name, status in (shard_statuses or {}).items()}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {},
        "status": {
            "serviceStatus": "Running" if ready else "",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "reason": "RayServiceReady" if ready else "Initializing"}],
            "activeServiceStatus": {
                "rayClusterName": f"{NAME}-abcde",
                "applicationStatuses": {"shardqa": {"status": "RUNNING", "serveDeploymentStatuses": deployments}},
            },
        },
    }


def serve_details(replicas: dict[str, tuple[int, int]]) -> dict:
    """Ray Serve's /api/serve/applications/ body: deployment -> (running, target)."""
    deployments = {}
    for name, (running, target) in replicas.items():
        states = ["RUNNING"] * running + ["STARTING"] * (target - running)
        deployments[name] = {
            "name": name,
            "status": "HEALTHY" if running == target else "UNHEALTHY" if running == 0 else "UPDATING",
            "target_num_replicas": target,
            "replicas": [{"replica_id": f"{name}-{i}", "state": s} for i, s in enumerate(states)],
        }
    return {"applications": {"shardqa": {"name": "shardqa", "status": "RUNNING", "deployments": deployments}}}


SERVE_API = f"get /api/v1/namespaces/{NS}/services/{NAME}-head-svc:8265/proxy/api/serve/applications/"
READYZ = f"get /api/v1/namespaces/{NS}/services/{NAME}-serve-svc:8000/proxy/readyz"


@pytest_asyncio.fixture
async def k8s():
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        for resource in ("ray.io/v1/rayservices", "batch/v1/jobs", "v1/pods", "v1/configmaps"):
            emulator.resources[resource] = {}
        yield emulator


def readyz(version: str | None, shards: int, ready: bool = True, reason: str = "ok", not_served: str | None = None) -> dict:
    """A /readyz body as the service's API writes it (services/api_models.Readiness)."""
    from shardqa.services.api_models import Readiness

    body = {"ready": ready, "reason": reason, "index_version": version, "not_served": not_served,
            "shards": [{"shard": i, "ready": ready, "versions": [version] if version else [], "passages": 10, "detail": ""}
                       for i in range(shards)]}
    return Readiness.model_validate(body).model_dump()


def server_url(k8s) -> str:
    return str(k8s.url).rstrip("/")


def api_client(k8s):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = server_url(k8s)
    return client.ApiClient(configuration)


def cluster(k8s) -> ShardQACluster:
    # Polling sleeps are real but short: the server runs on this loop meanwhile.
    return ShardQACluster(api_client(k8s), NS, NAME, sleep=lambda s: __import__("time").sleep(min(s, 0.02)))


@pytest.mark.asyncio
async def test_readiness_is_read_under_the_applications_route_prefix(k8s):
    rs = rayservice({"ingress": "HEALTHY", "shard-0": "HEALTHY"})
    rs["spec"]["serveConfigV2"] = "applications:\n- name: shardqa\n  route_prefix: /qa/\n  import_path: x:y\n"
    k8s.objects[RAYSERVICE, NS, NAME] = rs
    k8s[SERVE_API] << serve_details({"ingress": (1, 1), "shard-0": (1, 1)})
    k8s[READYZ.replace("/proxy/readyz", "/proxy/qa/readyz")] << readyz("v1", 1)

    st = await asyncio.to_thread(cluster(k8s).status)
    assert st.ready and (st.index_version, st.index_ready) == ("v1", True)


def test_route_prefix_of_a_rayservice():
    from shardqa.monitoring.cluster import route_prefix

    def rs(config):
        return {"spec": {"serveConfigV2": config}}

    assert route_prefix({}) == ""
    assert route_prefix(rs("applications:\n- name: shardqa\n  route_prefix: /\n")) == ""
    assert route_prefix(rs("applications:\n- name: other\n  route_prefix: /x\n- name: shardqa\n  route_prefix: /a/b/\n")) == "/a/b"
    assert route_prefix(rs(": not yaml [")) == ""


@pytest.mark.asyncio
async def test_status_of_a_healthy_release(k8s):
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"ingress": "HEALTHY", "shard-0": "HEALTHY", "shard-1": "HEALTHY"})
    k8s[SERVE_API] << serve_details({"ingress": (2, 2), "shard-0": (2, 2), "shard-1": (1, 1)})
    k8s[READYZ] << readyz("v20260101", 2)

    st = await asyncio.to_thread(cluster(k8s).status)
    assert st.ready and st.service_status == "Running" and st.application_status == "RUNNING"
    assert [(d.shard, d.status, d.ready_replicas, d.target_replicas) for d in st.shards] == [
        (0, "HEALTHY", 2, 2),
        (1, "HEALTHY", 1, 1),
    ]
    assert [(d.name, d.ready_replicas) for d in st.others] == [("ingress", 2)]
    assert (st.index_version, st.index_shards, st.index_ready) == ("v20260101", 2, True)
    assert st.problems == []


@pytest.mark.asyncio
async def test_status_reports_a_shard_without_replicas_and_a_shard_count_mismatch(k8s):
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"ingress": "HEALTHY", "shard-0": "HEALTHY", "shard-1": "UNHEALTHY"})
    k8s[SERVE_API] << serve_details({"ingress": (1, 1), "shard-0": (1, 1), "shard-1": (0, 2)})
    k8s[READYZ] << readyz("v1", 2, not_served="index version v2 is not served: index version v2 has 3 shards but the service was deployed with 2; redeploy to serve it")

    st = await asyncio.to_thread(cluster(k8s).status)
    shard1 = st.shards[1]
    assert (shard1.status, shard1.ready_replicas, shard1.target_replicas) == ("UNHEALTHY", 0, 2)
    assert "shard 1 has no ready replica" in st.problems
    assert ("index version v2 is not served: index version v2 has 3 shards but the service was deployed with 2; "
            "redeploy to serve it") in st.problems


@pytest.mark.asyncio
async def test_status_without_serve_api_still_reports_kuberay_view(k8s):
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"shard-0": "UPDATING"}, ready=False)
    k8s[SERVE_API] << 503 << {"message": "dashboard starting"}
    k8s[READYZ] << 503 << readyz(None, 1, ready=False, reason="no index in the store")

    st = await asyncio.to_thread(cluster(k8s).status)
    assert not st.ready
    assert [(d.shard, d.status, d.ready_replicas) for d in st.shards] == [(0, "UPDATING", None)]
    assert st.index_ready is False and st.index_reason == "no index in the store"
    assert any("replica counts unknown" in p for p in st.problems)


@pytest.mark.asyncio
async def test_a_failed_shard_counts_even_when_replica_counts_are_unknown(k8s):
    """With the Serve API unreachable (the chart's NetworkPolicy by default),
    KubeRay's own view of a shard still decides the exit code."""
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"shard-0": "HEALTHY", "shard-1": "UNHEALTHY"})
    k8s[SERVE_API] << 503 << {"message": "unreachable"}
    k8s[READYZ] << readyz("v1", 2)

    st = await asyncio.to_thread(cluster(k8s).status)
    assert st.ready and not st.healthy
    assert st.failing_shards == [1]
    assert "shard 1 is UNHEALTHY (KubeRay's view; replica counts unknown)" in st.problems
    assert st.to_dict()["healthy"] is False


@pytest.mark.asyncio
async def test_a_failed_application_is_not_healthy(k8s):
    rs = rayservice({"shard-0": "HEALTHY"})
    rs["status"]["activeServiceStatus"]["applicationStatuses"]["shardqa"]["status"] = "DEPLOY_FAILED"
    k8s.objects[RAYSERVICE, NS, NAME] = rs
    k8s[SERVE_API] << serve_details({"shard-0": (1, 1)})
    k8s[READYZ] << readyz("v1", 1)

    st = await asyncio.to_thread(cluster(k8s).status)
    assert not st.healthy and "the Serve application is DEPLOY_FAILED" in st.problems


@pytest.mark.asyncio
async def test_an_ingress_without_replicas_is_not_healthy(k8s):
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"ingress": "UNHEALTHY", "shard-0": "HEALTHY"})
    k8s[SERVE_API] << serve_details({"ingress": (0, 1), "shard-0": (1, 1)})
    k8s[READYZ] << readyz("v1", 1)

    st = await asyncio.to_thread(cluster(k8s).status)
    assert not st.healthy and st.failing_others == ["ingress"]
    assert "deployment ingress has no ready replica" in st.problems


@pytest.mark.asyncio
async def test_a_proxy_read_that_never_answers_times_out(k8s, monkeypatch):
    """A NetworkPolicy that drops the API server's proxied connection must
    not hold the command for the API server's own dial timeout."""
    import time

    from shardqa.monitoring import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "PROXY_TIMEOUT_S", 0.5)

    async def never():
        await asyncio.sleep(30)

    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"shard-0": "HEALTHY"})
    k8s[SERVE_API] << never
    k8s[READYZ] << never
    t0 = time.monotonic()
    st = await asyncio.to_thread(cluster(k8s).status)
    # Two reads of 0.5 s each, not retried (urllib3's default would try each four times: 4 s).
    assert time.monotonic() - t0 < 2.5
    assert any("replica counts unknown" in p for p in st.problems)
    assert "the service's /readyz is unreachable (no answer within 0.5 s)" in st.problems


@pytest.mark.asyncio
async def test_missing_rayservice_is_a_user_error(k8s):
    with pytest.raises(ClusterError, match="no RayService 'rel-shardqa' in namespace 'qa'"):
        await asyncio.to_thread(cluster(k8s).status)


async def play_job_controller(k8s, version: str, succeed: bool = True) -> str:
    """Wait for the reindex Job to be created, then complete it as Kubernetes would."""
    for _ in range(500):
        # Keys are (resource, namespace, name).
        jobs = [key for key in k8s.objects if key[0].plural == "jobs"]
        if jobs:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("no Job was created")
    ((_, _, job_name),) = jobs
    await asyncio.sleep(0.05)  # a few polls see the Job still running
    if succeed:
        k8s.objects[JOBS, NS, job_name] = {
            **k8s.objects[JOBS, NS, job_name].raw,
            "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]},
        }
        k8s.objects[PODS, NS, f"{job_name}-x7k2p"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{job_name}-x7k2p", "namespace": NS, "labels": {"job-name": job_name}},
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "index",
                        "ready": False,
                        "restartCount": 0,
                        "image": "shardqa/shardqa:0.1.0",
                        "imageID": "",
                        "state": {"terminated": {"exitCode": 0, "message": version + "\n"}},
                    }
                ],
            },
        }
    else:
        k8s.objects[JOBS, NS, job_name] = {
            **k8s.objects[JOBS, NS, job_name].raw,
            "status": {"failed": 7, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]},
        }
    return job_name


@pytest.mark.asyncio
async def test_reindex_creates_the_chart_job_waits_and_switches(k8s):
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"shard-0": "HEALTHY"})
    k8s.objects[CONFIGMAPS, NS, f"{NAME}-index-job"] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{NAME}-index-job", "namespace": NS},
        "data": {"job.json": json.dumps(HELM_JOB)},
    }
    served = {"version": "v1"}
    # The service switches once the Job's version exists; readyz answers from `served`.
    k8s[READYZ] << (lambda: readyz(served["version"], 1))

    work = asyncio.create_task(
        asyncio.to_thread(cluster(k8s).reindex, "/data/corpus.json", 30, 5, 0.01)
    )
    job_name = await play_job_controller(k8s, "v2")
    await asyncio.sleep(0.05)
    served["version"] = "v2"
    result = await asyncio.wait_for(work, 30)

    assert result.switched and result.version == "v2" and result.previous_version == "v1"
    assert result.job == job_name and job_name.startswith(f"{NAME}-reindex-")
    job = k8s.objects[JOBS, NS, job_name]
    assert job["metadata"]["labels"][REINDEX_LABEL]
    container = job["spec"]["template"]["spec"]["containers"][0]
    # The chart's Job, with the corpus overridden.
    assert container["image"] == "shardqa/shardqa:0.1.0"
    assert container["env"] == [{"name": "SHARDQA_CORPUS", "value": "/data/corpus.json"}]
    assert k8s.objects[RAYSERVICE, NS, NAME]["metadata"]["annotations"][INDEX_VERSION_ANNOTATION] == "v2"


@pytest.mark.asyncio
async def test_reindex_reports_a_failed_job(k8s):
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"shard-0": "HEALTHY"})
    k8s.objects[CONFIGMAPS, NS, f"{NAME}-index-job"] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{NAME}-index-job", "namespace": NS},
        "data": {"job.json": json.dumps(HELM_JOB)},
    }
    k8s[READYZ] << readyz("v1", 1)
    work = asyncio.create_task(asyncio.to_thread(cluster(k8s).reindex, None, 30, 5, 0.01))
    job_name = await play_job_controller(k8s, "", succeed=False)
    with pytest.raises(ClusterError, match=f"index Job {job_name} failed: Job has reached the specified backoff limit"):
        await asyncio.wait_for(work, 30)
    assert INDEX_VERSION_ANNOTATION not in (k8s.objects[RAYSERVICE, NS, NAME]["metadata"].get("annotations") or {})


@pytest.mark.asyncio
async def test_reindex_without_the_chart_job_template(k8s):
    k8s.objects[RAYSERVICE, NS, NAME] = rayservice()
    k8s[READYZ] << readyz("v1", 1)
    with pytest.raises(ClusterError, match="install the chart with index.enabled=true"):
        await asyncio.to_thread(cluster(k8s).reindex, None, 5, 5, 0.01)


def test_job_names_are_valid_kubernetes_names():
    from kubernetes import client

    class FakeCore:
        def read_namespaced_config_map(self, name, namespace):
            return client.V1ConfigMap(data={"job.json": json.dumps(HELM_JOB)})

    class FakeBatch:
        created = None

        def create_namespaced_job(self, namespace, body):
            FakeBatch.created = body

    c = ShardQACluster.__new__(ShardQACluster)
    c.namespace, c.name = NS, "a-very-long-release-name-that-goes-on-and-on-shardqa"
    c.core, c.batch = FakeCore(), FakeBatch()
    name = c.create_reindex_job(now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert len(name) <= 63 and name.endswith("-reindex-20260102030405")
    assert FakeBatch.created["metadata"]["name"] == name
    assert FakeBatch.created["spec"]["ttlSecondsAfterFinished"] == 86400  # finished reindex Jobs do not pile up


@pytest.mark.asyncio
async def test_cli_status_through_a_kubeconfig(k8s, tmp_path: Path, monkeypatch):
    from shardqa.cli import app

    k8s.objects[RAYSERVICE, NS, NAME] = rayservice({"ingress": "HEALTHY", "shard-0": "HEALTHY"})
    k8s[SERVE_API] << serve_details({"ingress": (1, 1), "shard-0": (0, 1)})
    k8s[READYZ] << readyz("v7", 1)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "stand-in", "cluster": {"server": server_url(k8s)}}],
                "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
                "contexts": [{"name": "qa", "context": {"cluster": "stand-in", "user": "tester", "namespace": NS}}],
                "current-context": "qa",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, app, ["cluster", "status", "--name", NAME])
    # A shard without a ready replica makes the command fail (exit 1) for scripts.
    assert result.exit_code == 1, result.output
    assert "RayService qa/rel-shardqa: Running (ready)" in result.output
    assert "index: version v7, 1 shards (ready)" in result.output
    assert "    0  shard-0      UNHEALTHY  0/1" in result.output
    assert "warning: shard 0 has no ready replica" in result.output

    as_json = await asyncio.to_thread(runner.invoke, app, ["cluster", "status", "--name", NAME, "--json"])
    data = json.loads(as_json.stdout)
    assert data["index_version"] == "v7" and data["shards"][0]["ready_replicas"] == 0
