"""The Serve application: shard deployments bound into the ingress.

`build_app` is an application builder, usable from a Serve config file or a
KubeRay RayService `serveConfigV2`:

    applications:
      - name: shardqa
        route_prefix: /
        import_path: shardqa.services.app:build_app
        args:
          store: redis://redis:6379/0
          cache_url: redis://redis:6379/1
          replicas_per_shard: 2

`args` takes any `shardqa.config.Settings` field (overriding the environment
of the process that builds the app), plus `shards` (else read from the
store's current index) and `shards_config` (a mapping or a JSON/YAML file
path, see `service_config.load_shards_config`).
"""

from __future__ import annotations

from typing import Any, Mapping

from shardqa.services.service_config import (
    INGRESS_NUM_CPUS,
    ServiceConfig,
    load_shards_config,
    make_service_config,
    settings_with,
)

APP_NAME = "shardqa"


def shard_deployment_name(shard: int) -> str:
    return f"shard-{shard}"


def service_config_from_args(args: Mapping[str, Any] | None) -> ServiceConfig:
    args = dict(args or {})
    shards_config = load_shards_config(args.pop("shards_config", None))
    shards = args.pop("shards", None)
    settings = settings_with(args)
    if shards is None:
        from shardqa.preprocessing.store import open_store

        shards = open_store(settings.store).manifest().shards
    return make_service_config(settings, int(shards), shards_config)


def build_graph(config: ServiceConfig):
    """The bound application for a resolved configuration."""
    from shardqa.services.deployments import IngressDeployment, ShardDeployment

    settings = config.settings
    shard_apps = []
    for shard in range(config.shards):
        res = config.resources(shard)
        shard_apps.append(
            ShardDeployment.options(
                name=shard_deployment_name(shard),
                num_replicas=res.replicas,
                ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
                # Enough queued requests to fill a batch; beyond that, the
                # handle routes to another replica or waits.
                max_ongoing_requests=max(2 * settings.max_batch_size, 8),
            ).bind(shard, config)
        )
    return IngressDeployment.options(
        num_replicas=settings.ingress_replicas,
        ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
        max_ongoing_requests=256,
    ).bind(config, *shard_apps)


def build_app(args: dict[str, Any] | None = None):
    """Ray Serve application builder (`import_path: shardqa.services.app:build_app`)."""
    return build_graph(service_config_from_args(args))
