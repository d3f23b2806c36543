"""`shardqa cluster ...`: the service on Kubernetes, through the API server."""

from __future__ import annotations

import json
from contextlib import contextmanager

import typer

from shardqa.cli_options import finite

cluster_app = typer.Typer(
    name="cluster",
    help="Status and reindexing of shardqa on Kubernetes (KubeRay RayService installed by the Helm chart).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

NAMESPACE = typer.Option(None, "--namespace", "-n", help="namespace of the release; default: the kubeconfig context's")
NAME = typer.Option("shardqa", "--name", help="RayService name (the chart's full name, e.g. <release>-shardqa)")
CONTEXT = typer.Option(None, "--context", help="kubeconfig context; default: the current one")


def _cluster(namespace: str | None, name: str, context: str | None):
    from shardqa.monitoring.cluster import ShardQACluster, api_client_from_config, default_namespace

    return ShardQACluster(api_client_from_config(context), namespace or default_namespace(context), name)


@contextmanager
def _reaching_the_cluster():
    """The API server unreachable, or answering with something that is not
    JSON: one line saying so, not urllib3's retry chain."""
    import urllib3

    from shardqa.errors import one_line
    from shardqa.monitoring.cluster import ClusterError

    try:
        yield
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        where = getattr(exc, "url", None) or ""
        raise ClusterError(f"cannot reach the Kubernetes API server{' (' + where + ')' if where else ''}: "
                           f"{one_line(reason, 200)}") from None
    except ValueError as exc:  # json's decode error included
        raise ClusterError(f"the Kubernetes API server answered something unexpected: {one_line(exc, 200)}") from None


@cluster_app.command("status")
def status(
    namespace: str = NAMESPACE,
    name: str = NAME,
    context: str = CONTEXT,
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
) -> None:
    """RayService status, ready replicas per shard and the index version being served."""
    with _reaching_the_cluster():
        st = _cluster(namespace, name, context).status()
    if as_json:
        typer.echo(json.dumps(st.to_dict(), indent=2))
    else:
        typer.echo(f"RayService {st.namespace}/{st.name}: {st.service_status} ({'ready' if st.ready else 'not ready'})")
        typer.echo(f"application {'shardqa'}: {st.application_status or 'unknown'}")
        if st.index_version is not None or st.index_ready is not None:
            state = "ready" if st.index_ready else f"not ready: {st.index_reason or 'unknown'}"
            typer.echo(f"index: version {st.index_version or '-'}, {st.index_shards or '-'} shards ({state})")
        typer.echo(f"{'shard':>5}  {'deployment':<12} {'status':<10} ready/target")
        for d in st.shards:
            typer.echo(f"{d.shard:>5}  {d.name:<12} {d.status:<10} {_count(d.ready_replicas)}/{_count(d.target_replicas)}")
        for d in st.others:
            typer.echo(f"{'-':>5}  {d.name:<12} {d.status:<10} {_count(d.ready_replicas)}/{_count(d.target_replicas)}")
        for problem in st.problems:
            typer.echo(f"warning: {problem}", err=True)
    if not st.healthy:
        raise typer.Exit(1)


@cluster_app.command("reindex")
def reindex(
    namespace: str = NAMESPACE,
    name: str = NAME,
    context: str = CONTEXT,
    corpus: str = typer.Option(None, "--corpus", help="corpus path inside the image or a mounted volume; default: the chart's"),
    job_timeout: float = typer.Option(3600.0, "--job-timeout", min=1, callback=finite, help="seconds to wait for the index Job"),
    switch_timeout: float = typer.Option(120.0, "--switch-timeout", min=1, callback=finite, help="seconds to wait for the service to switch"),
) -> None:
    """Build a new index version in a Job, wait for it, and wait until the service switches to it."""
    with _reaching_the_cluster():
        cluster = _cluster(namespace, name, context)
        result = cluster.reindex(corpus, job_timeout, switch_timeout, progress=lambda m: typer.echo(m, err=True))
    if not result.switched:
        from shardqa.monitoring.cluster import ClusterError

        raise ClusterError(
            f"index version {result.version} was built by Job {result.job}, but the service still does not "
            f"serve it after {switch_timeout:.0f}s (check `shardqa cluster status`)"
        )
    typer.echo(
        f"switched to index version {result.version} (was {result.previous_version or 'none'}) "
        f"via Job {result.job} in {result.seconds:.0f}s"
    )


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
