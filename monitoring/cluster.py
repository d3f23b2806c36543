"""shardqa on Kubernetes, seen through the API server: status and reindexing.

Everything goes through the Kubernetes API with the official client, so it
works wherever kubectl does (kubeconfig or in-cluster), with no port-forward:

* the RayService custom resource gives KubeRay's view (service and
  application status, per-deployment health);
* Ray Serve's REST API on the head's dashboard port, reached through the API
  server's service proxy, gives replica states per shard deployment;
* the ingress's /readyz, through the same proxy, gives the index version the
  service answers from.

`reindex` creates a Job from the spec the Helm chart stores in the
`<name>-index-job` ConfigMap (the same Job the chart runs as a hook), waits
for it, reads the new index version from the Job pod's termination message,
then waits until the service has switched to that version and records it on
the RayService as an annotation.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shardqa.errors import ShardQAError, one_line

RAY_GROUP, RAY_VERSION, RAYSERVICES = "ray.io", "v1", "rayservices"
APP_NAME = "shardqa"
#: How long a finished reindex Job is kept (for its logs) before Kubernetes deletes it.
REINDEX_JOB_TTL_S = 86400
SHARD_PREFIX = "shard-"
DASHBOARD_PORT = 8265
SERVE_PORT = 8000
#: How long one read through the API server's service proxy may take: a
#: NetworkPolicy that drops the proxy's connection would otherwise hold each
#: read for the API server's own dial timeout.
PROXY_TIMEOUT_S = 10.0
#: Deployment and application states (Serve's, as KubeRay copies them) that
#: mean it cannot serve.
FAILED_STATES = frozenset({"UNHEALTHY", "DEPLOY_FAILED"})
INDEX_VERSION_ANNOTATION = "shardqa.example/index-version"
REINDEX_LABEL = "shardqa.example/reindex"
TERMINATION_LOG = "/dev/termination-log"


class ClusterError(ShardQAError):
    code = "cluster_error"


@dataclass
class DeploymentStatus:
    name: str
    status: str
    ready_replicas: int | None = None
    target_replicas: int | None = None
    shard: int | None = None


@dataclass
class ClusterStatus:
    namespace: str
    name: str
    ready: bool
    service_status: str
    application_status: str | None
    shards: list[DeploymentStatus] = field(default_factory=list)
    others: list[DeploymentStatus] = field(default_factory=list)
    index_version: str | None = None
    index_shards: int | None = None
    index_ready: bool | None = None
    index_reason: str | None = None
    problems: list[str] = field(default_factory=list)
    #: Shards that cannot answer: no ready replica, or (replica counts
    #: unknown) a failed state in KubeRay's view.
    failing_shards: list[int] = field(default_factory=list)
    #: The other deployments (the ingress) that cannot answer, likewise.
    failing_others: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """What `shardqa cluster status` exits 0 on."""
        return (self.ready and not self.failing_shards and not self.failing_others
                and self.application_status not in FAILED_STATES)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


@dataclass
class ReindexResult:
    job: str
    version: str
    previous_version: str | None
    switched: bool
    seconds: float


def api_client_from_config(context: str | None = None):
    """A client from the kubeconfig (or the pod's service account in a cluster)."""
    import yaml
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        api = config.new_client_from_config(config_file=_kubeconfig(), context=context)
    except (ConfigException, FileNotFoundError) as exc:
        if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            from kubernetes import client

            return client.ApiClient()
        raise ClusterError(f"no usable Kubernetes configuration: {exc}") from None
    except (yaml.YAMLError, ValueError, OSError) as exc:  # not YAML, not UTF-8, unreadable
        raise ClusterError(f"cannot read the kubeconfig: {one_line(exc, 200)}") from None
    host = api.configuration.host or ""
    if "://" not in host:
        # urllib3 would warn about it, then fail with "No host specified".
        raise ClusterError(f"the kubeconfig's server address {host!r} is not a URL (https://host:port)")
    return api


def _kubeconfig() -> str | None:
    # The client reads KUBECONFIG once, at import; read it per call instead so
    # the variable works however late it is set (and may list several files).
    return os.environ.get("KUBECONFIG") or None


def default_namespace(context: str | None = None) -> str:
    """The namespace of the kubeconfig context (as kubectl would use), else "default"."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        contexts, active = config.list_kube_config_contexts(config_file=_kubeconfig())
    except (ConfigException, FileNotFoundError):
        return "default"
    if context is not None:
        active = next((c for c in contexts if c["name"] == context), None)
    return ((active or {}).get("context") or {}).get("namespace") or "default"


def route_prefix(rs: dict[str, Any]) -> str:
    """The shardqa application's route prefix in a RayService's serveConfigV2,
    without a trailing slash ("" for "/")."""
    import yaml

    try:
        config = yaml.safe_load((rs.get("spec") or {}).get("serveConfigV2") or "") or {}
        apps = config.get("applications") or []
        prefix = next((a.get("route_prefix") for a in apps if a.get("name") == APP_NAME), None) or "/"
    except (yaml.YAMLError, AttributeError, TypeError):
        prefix = "/"
    return "/" + str(prefix).strip("/") if str(prefix).strip("/") else ""


class ShardQACluster:
    """One shardqa release: the RayService `name` in `namespace`."""

    def __init__(self, api_client, namespace: str, name: str, *, sleep: Callable[[float], None] = time.sleep):
        from kubernetes import client

        self.namespace, self.name = namespace, name
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        # Reads through the service proxy get a client that does not retry:
        # urllib3 would try a read that timed out three more times, each
        # with the full PROXY_TIMEOUT_S.
        proxy_config = copy.deepcopy(api_client.configuration)
        proxy_config.retries = 0
        self.proxy = client.CoreV1Api(client.ApiClient(proxy_config))
        self._sleep = sleep

    # --- reading ------------------------------------------------------------------

    def rayservice(self) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, self.namespace, RAYSERVICES, self.name)
        except ApiException as exc:
            if exc.status == 404:
                raise ClusterError(
                    f"no RayService {self.name!r} in namespace {self.namespace!r} (is the chart installed, and KubeRay?)"
                ) from None
            raise ClusterError(f"reading RayService {self.namespace}/{self.name}: {exc.status} {exc.reason}") from None

    def _proxy_json(self, service: str, port: int, path: str) -> tuple[int | None, Any]:
        """GET through the API server's service proxy: (HTTP status, parsed
        JSON or None); status None when no answer came in PROXY_TIMEOUT_S."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            body = self.proxy.connect_get_namespaced_service_proxy_with_path(
                f"{service}:{port}", self.namespace, path.lstrip("/"), _preload_content=False,
                _request_timeout=PROXY_TIMEOUT_S,
            )
            return body.status, _json_or_none(body.data)
        except ApiException as exc:
            return exc.status, _json_or_none(exc.body)
        except urllib3.exceptions.TimeoutError:
            return None, None
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, urllib3.exceptions.TimeoutError):
                return None, None
            raise

    def serve_details(self) -> dict[str, Any] | None:
        """Ray Serve's own view (ServeInstanceDetails), or None when unreachable."""
        status, data = self._proxy_json(f"{self.name}-head-svc", DASHBOARD_PORT, "/api/serve/applications/")
        return data if status == 200 and isinstance(data, dict) else None

    def readiness(self, rs: dict[str, Any] | None = None) -> tuple[int | None, dict[str, Any] | None]:
        """The service's /readyz, under the application's route prefix (read
        from the RayService, ``rs`` when the caller has it)."""
        prefix = route_prefix(rs if rs is not None else self.rayservice())
        status, data = self._proxy_json(f"{self.name}-serve-svc", SERVE_PORT, f"{prefix}/readyz")
        return status, data if isinstance(data, dict) else None

    def status(self) -> ClusterStatus:
        rs = self.rayservice()
        st = rs.get("status") or {}
        conditions = {c.get("type"): c for c in st.get("conditions") or []}
        ready_condition = conditions.get("Ready")
        service_status = st.get("serviceStatus") or (
            ready_condition.get("reason") if ready_condition else None
        ) or "Unknown"
        ready = (ready_condition or {}).get("status") == "True" if ready_condition else service_status == "Running"
        active = st.get("activeServiceStatus") or {}
        app = (active.get("applicationStatuses") or {}).get(APP_NAME) or {}
        deployments = app.get("serveDeploymentStatuses") or {}

        result = ClusterStatus(
            namespace=self.namespace,
            name=self.name,
            ready=bool(ready),
            service_status=service_status,
            application_status=app.get("status"),
        )
        serve_deployments = {}
        details = self.serve_details()
        if details is None:
            result.problems.append(
                "Ray Serve REST API unreachable through the head service; replica counts unknown"
                " (with the chart's NetworkPolicy, allow the API server on port 8265 through"
                " networkPolicy.dashboardFrom, e.g. an ipBlock of the control plane)"
            )
        else:
            serve_deployments = ((details.get("applications") or {}).get(APP_NAME) or {}).get("deployments") or {}
        for dep_name in sorted(set(deployments) | set(serve_deployments)):
            kuberay = deployments.get(dep_name) or {}
            serve = serve_deployments.get(dep_name) or {}
            replicas = serve.get("replicas")
            entry = DeploymentStatus(
                name=dep_name,
                status=serve.get("status") or kuberay.get("status") or "UNKNOWN",
                ready_replicas=sum(1 for r in replicas if r.get("state") == "RUNNING") if replicas is not None else None,
                target_replicas=serve.get("target_num_replicas"),
            )
            if dep_name.startswith(SHARD_PREFIX) and dep_name[len(SHARD_PREFIX) :].isdigit():
                entry.shard = int(dep_name[len(SHARD_PREFIX) :])
                result.shards.append(entry)
            else:
                result.others.append(entry)
        result.shards.sort(key=lambda d: d.shard)
        for shard in result.shards:
            if shard.ready_replicas == 0:
                result.problems.append(f"shard {shard.shard} has no ready replica")
                result.failing_shards.append(shard.shard)
            elif shard.ready_replicas is None and shard.status in FAILED_STATES:
                result.problems.append(f"shard {shard.shard} is {shard.status} (KubeRay's view; replica counts unknown)")
                result.failing_shards.append(shard.shard)
        for other in result.others:
            if other.ready_replicas == 0 or (other.ready_replicas is None and other.status in FAILED_STATES):
                result.problems.append(f"deployment {other.name} has no ready replica" if other.ready_replicas == 0
                                       else f"deployment {other.name} is {other.status} (KubeRay's view; replica counts unknown)")
                result.failing_others.append(other.name)
        if result.application_status in FAILED_STATES:
            result.problems.append(f"the Serve application is {result.application_status}")

        code, body = self.readiness(rs)
        if body is not None:
            result.index_version = body.get("index_version")
            shards = body.get("shards")
            # One entry per shard the service answers with (the served index's).
            result.index_shards = len(shards) if isinstance(shards, list) and result.index_version else None
            result.index_ready = bool(body.get("ready"))
            result.index_reason = body.get("reason")
            if body.get("not_served"):
                # A published version the service will not switch to (another
                # shard count needs a redeploy): it keeps serving the old one.
                result.problems.append(str(body["not_served"]))
        else:
            result.problems.append("the service's /readyz is unreachable ("
                                   + (f"HTTP {code})" if code is not None else f"no answer within {PROXY_TIMEOUT_S:g} s)"))
        return result

    # --- reindexing -------------------------------------------------------------------

    def index_job_template(self) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        name = f"{self.name}-index-job"
        try:
            cm = self.core.read_namespaced_config_map(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise ClusterError(f"no ConfigMap {name!r}: install the chart with index.enabled=true") from None
            raise
        try:
            return json.loads((cm.data or {})["job.json"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise ClusterError(f"ConfigMap {name!r} holds no valid job.json ({exc})") from None

    def create_reindex_job(self, corpus: str | None = None, now: datetime | None = None) -> str:
        job = self.index_job_template()
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d%H%M%S")
        job_name = f"{self.name[:40]}-reindex-{stamp}"
        metadata = job.setdefault("metadata", {})
        metadata["name"] = job_name
        metadata["namespace"] = self.namespace
        metadata.setdefault("labels", {})[REINDEX_LABEL] = stamp
        # Finished reindex Jobs (and their pods) go after a day instead of
        # piling up; the version each built is recorded on the RayService.
        job["spec"].setdefault("ttlSecondsAfterFinished", REINDEX_JOB_TTL_S)
        if corpus is not None:
            container = job["spec"]["template"]["spec"]["containers"][0]
            for env in container.setdefault("env", []):
                if env["name"] == "SHARDQA_CORPUS":
                    env["value"] = corpus
                    break
            else:
                container["env"].append({"name": "SHARDQA_CORPUS", "value": corpus})
        self.batch.create_namespaced_job(self.namespace, job)
        return job_name

    def wait_for_job(self, job_name: str, timeout_s: float, poll_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.batch.read_namespaced_job_status(job_name, self.namespace)
            status = job.status
            conditions = {c.type: c for c in (status.conditions or [])} if status else {}
            if (status and status.succeeded) or _true(conditions.get("Complete")):
                return
            if _true(conditions.get("Failed")):
                reason = conditions["Failed"].message or conditions["Failed"].reason or "failed"
                raise ClusterError(f"index Job {job_name} failed: {reason} (kubectl -n {self.namespace} logs job/{job_name})")
            if time.monotonic() >= deadline:
                raise ClusterError(f"index Job {job_name} did not finish within {timeout_s:.0f}s")
            self._sleep(poll_s)

    def job_index_version(self, job_name: str) -> str:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={job_name}").items
        for pod in pods:
            if pod.status is None or pod.status.phase != "Succeeded":
                continue
            for cs in pod.status.container_statuses or []:
                terminated = cs.state.terminated if cs.state else None
                if terminated is not None and terminated.exit_code == 0 and (terminated.message or "").strip():
                    return terminated.message.strip()
        raise ClusterError(f"index Job {job_name} succeeded but reported no index version")

    def wait_for_version(self, version: str, timeout_s: float, poll_s: float = 1.0, confirmations: int = 3) -> bool:
        """True once /readyz reports `version` `confirmations` times in a row
        (requests spread over ingress replicas, so one answer is one replica)."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        while True:
            _, body = self.readiness()
            streak = streak + 1 if body is not None and body.get("index_version") == version else 0
            if streak >= confirmations:
                return True
            if time.monotonic() >= deadline:
                return False
            self._sleep(poll_s)

    def record_version(self, version: str) -> None:
        self.custom.patch_namespaced_custom_object(
            RAY_GROUP,
            RAY_VERSION,
            self.namespace,
            RAYSERVICES,
            self.name,
            {"metadata": {"annotations": {INDEX_VERSION_ANNOTATION: version}}},
        )

    def reindex(
        self,
        corpus: str | None = None,
        job_timeout_s: float = 3600,
        switch_timeout_s: float = 120,
        poll_s: float = 2.0,
        progress: Callable[[str], None] = lambda message: None,
    ) -> ReindexResult:
        t0 = time.monotonic()
        self.rayservice()  # fail early, with a clear message, when the release is missing
        _, before = self.readiness()
        previous = (before or {}).get("index_version")
        job_name = self.create_reindex_job(corpus)
        progress(f"created Job {job_name}; waiting for it to finish")
        self.wait_for_job(job_name, job_timeout_s, poll_s)
        version = self.job_index_version(job_name)
        progress(f"index version {version} built; waiting for the service to switch")
        switched = self.wait_for_version(version, switch_timeout_s, min(poll_s, 1.0))
        if switched:
            self.record_version(version)
        return ReindexResult(job_name, version, previous, switched, time.monotonic() - t0)


def report_index_version(path: str = TERMINATION_LOG) -> str:
    """Run at the end of the index Job: put the store's current version where
    Kubernetes keeps it (the container's termination message)."""
    from shardqa.config import get_settings
    from shardqa.preprocessing.store import open_store

    version = open_store(get_settings().store).current_version()
    target = Path(os.environ.get("SHARDQA_TERMINATION_LOG", path))
    if target.parent.exists():
        target.write_text(version)
    print(version)
    return version


def _true(condition) -> bool:
    return condition is not None and condition.status == "True"


def _json_or_none(raw) -> Any:
    if raw is None:
        return None
    if isinstance(raw, (dict, list)):
        return raw
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None
