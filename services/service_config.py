"""What one deployment of the service is made of: the settings every replica
runs with, and the resources of each shard's deployment.

Replicas may run on other machines whose environment knows nothing of the
command line that started them, so the resolved settings travel with the
deployment graph (as the constructor arguments of each deployment) instead of
being re-read from the environment inside each replica.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import ValidationError

from shardqa.config import Settings, get_settings, settings_error_line
from shardqa.errors import ShardQAError, one_line

#: Logical CPUs the ingress replica reserves. It tokenises questions, routes
#: and merges, all light work next to a model forward pass.
INGRESS_NUM_CPUS = 0.5
#: Replicas per shard deployment: a typo such as 1e9 fails here, not in Ray.
MAX_REPLICAS = 1000


class ServiceConfigError(ShardQAError):
    code = "invalid_service_config"


@dataclass(frozen=True)
class ShardResources:
    """Replicas and per-replica resources of one shard's deployment."""

    replicas: int
    num_cpus: float
    num_gpus: float

    def threads(self, settings: Settings) -> int:
        """Intra-op threads of one model copy: the configured number, else as
        many as the replica reserves CPUs, so replicas sharing a small
        machine do not each start a thread per core and thrash."""
        if settings.threads:
            return settings.threads
        return max(1, int(self.num_cpus))


@dataclass(frozen=True)
class ServiceConfig:
    settings: Settings
    shards: int
    shard_resources: tuple[ShardResources, ...] = field(default=())

    def resources(self, shard: int) -> ShardResources:
        return self.shard_resources[shard]

    @property
    def total_cpus(self) -> float:
        return sum(r.replicas * r.num_cpus for r in self.shard_resources) + INGRESS_NUM_CPUS * self.settings.ingress_replicas

    @property
    def total_gpus(self) -> float:
        return sum(r.replicas * r.num_gpus for r in self.shard_resources)


def settings_with(overrides: Mapping[str, Any] | None = None, base: Settings | None = None) -> Settings:
    """The settings in force plus explicit overrides (None values are ignored,
    so unset command-line options keep the environment's values)."""
    base = base or get_settings()
    updates = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(updates) - set(Settings.model_fields))
    if unknown:
        raise ServiceConfigError(f"unknown setting(s): {', '.join(unknown)}")
    # Validate through the model so an override gets the same checks as an
    # environment variable would.
    merged = base.model_dump()
    merged.update(updates)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise ServiceConfigError(settings_error_line(exc, env=False)) from None


def load_shards_config(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """A shards config: a mapping, or a JSON/YAML file, of the form

        {"default": {"replicas": 2, "num_cpus": 1, "num_gpus": 0},
         "shards": {"0": {"replicas": 3}}}

    Both keys are optional; unspecified values come from the settings.
    """
    if source is None:
        return {}
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ServiceConfigError(f"cannot read shards config {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ServiceConfigError(f"shards config {path} is not UTF-8 text") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            raise ServiceConfigError(f"shards config {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {one_line(exc)}") from None
    if not isinstance(data, Mapping):
        raise ServiceConfigError('a shards config is a mapping with the keys "default" and/or "shards"')
    unknown = _unknown_keys(data, ("default", "shards"))
    if unknown:
        raise ServiceConfigError(f'a shards config is a mapping with the keys "default" and/or "shards", not {unknown}')
    return dict(data)


def _unknown_keys(entry: Mapping[str, Any], known: tuple[str, ...]) -> str:
    """The keys of `entry` not in `known`, quoted, each with the known key it
    is likely a typo of; "" when there are none."""
    from difflib import get_close_matches

    out = []
    for key in entry:
        if key not in known:
            near = get_close_matches(str(key), known, n=1)
            out.append(repr(str(key)) + (f" (did you mean {near[0]}?)" if near else ""))
    return ", ".join(out)


def _resources(entry: Mapping[str, Any], fallback: ShardResources, where: str) -> ShardResources:
    if not isinstance(entry, Mapping):
        raise ServiceConfigError(f"{where}: expected a mapping of replicas, num_cpus, num_gpus")
    unknown = _unknown_keys(entry, ("replicas", "num_cpus", "num_gpus"))
    if unknown:
        raise ServiceConfigError(f"{where}: unknown key(s) {unknown}; expected replicas, num_cpus, num_gpus")
    replicas = entry.get("replicas", fallback.replicas)
    if isinstance(replicas, bool) or not (isinstance(replicas, int) or (isinstance(replicas, float) and replicas.is_integer())):
        raise ServiceConfigError(f"{where}: replicas must be a whole number, got {replicas!r}")
    try:
        res = ShardResources(
            replicas=int(replicas),
            num_cpus=float(entry.get("num_cpus", fallback.num_cpus)),
            num_gpus=float(entry.get("num_gpus", fallback.num_gpus)),
        )
    except (TypeError, ValueError):
        raise ServiceConfigError(f"{where}: replicas, num_cpus and num_gpus must be numbers") from None
    if not (1 <= res.replicas <= MAX_REPLICAS and 0 <= res.num_cpus < math.inf and 0 <= res.num_gpus < math.inf):
        raise ServiceConfigError(f"{where}: needs 1 <= replicas <= {MAX_REPLICAS} and finite, non-negative num_cpus/num_gpus")
    return res


def make_service_config(settings: Settings, shards: int, shards_config: Mapping[str, Any] | None = None) -> ServiceConfig:
    if shards < 1:
        raise ServiceConfigError(f"the index has {shards} shards; at least one is needed")
    cfg = dict(shards_config or {})
    base = ShardResources(settings.replicas_per_shard, settings.num_cpus_per_replica, settings.num_gpus_per_replica)
    default = _resources(cfg.get("default", {}), base, "shards config 'default'")
    per_shard = cfg.get("shards", {}) or {}
    if not isinstance(per_shard, Mapping):
        raise ServiceConfigError("shards config 'shards' must map shard numbers to settings")
    overrides: dict[int, ShardResources] = {}
    for key, entry in per_shard.items():
        try:
            shard = int(key)
        except (TypeError, ValueError):
            raise ServiceConfigError(f"shards config: {key!r} is not a shard number") from None
        if not 0 <= shard < shards:
            raise ServiceConfigError(f"shards config names shard {shard}, but the index has shards 0..{shards - 1}")
        overrides[shard] = _resources(entry, default, f"shards config shard {shard}")
    return ServiceConfig(settings, shards, tuple(overrides.get(s, default) for s in range(shards)))
