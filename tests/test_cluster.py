"""connect(): explicit address, scheduler file, DIFFDASK_SCHEDULER, embedded LocalCluster."""

from __future__ import annotations

import json
import os

import pytest

from diffdask import ClusterError
from diffdask.cluster import SCHEDULER_ENV, connect


def _scheduler_address(client) -> str:
    return client.scheduler.address


def test_address_and_environment_reach_the_same_scheduler(cluster, monkeypatch):
    with connect(cluster.scheduler_address) as c:
        assert _scheduler_address(c) == cluster.scheduler_address
        assert c.submit(sum, [1, 2, 3]).result() == 6
    monkeypatch.setenv(SCHEDULER_ENV, cluster.scheduler_address)
    with connect() as c:
        assert _scheduler_address(c) == cluster.scheduler_address


def test_scheduler_file_from_argument_and_environment(cluster, tmp_path, monkeypatch):
    path = tmp_path / "scheduler.json"
    path.write_text(json.dumps({"address": cluster.scheduler_address, "type": "Scheduler"}))
    with connect(scheduler_file=str(path)) as c:
        assert _scheduler_address(c) == cluster.scheduler_address
    monkeypatch.setenv(SCHEDULER_ENV, str(path))
    with connect() as c:
        assert _scheduler_address(c) == cluster.scheduler_address


def test_default_is_a_local_cluster_bound_to_localhost(monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    with connect(n_workers=1, threads_per_worker=1) as c:
        assert c.scheduler.address.startswith("tcp://127.0.0.1:")
        assert all(w.startswith("tcp://127.0.0.1:") for w in c.scheduler_info()["workers"])
        info = c.scheduler_info()
        assert len(info["workers"]) == 1
        assert "127.0.0.1" in c.dashboard_link
        assert c.submit(pow, 2, 10).result() == 1024
        # Thread caps stay; the allocator setting that slows detector-sized temporaries 4× goes.
        environ = c.run(lambda: {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")})
        assert list(environ.values()) == [{"OMP_NUM_THREADS": "1", "MALLOC_TRIM_THRESHOLD_": None}]


def test_unreachable_or_missing_schedulers_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ClusterError, match="could not reach"):
        connect("tcp://127.0.0.1:1", timeout=2)
    with pytest.raises(ClusterError, match="does not exist"):
        connect(scheduler_file=str(tmp_path / "nope.json"))
    monkeypatch.setenv(SCHEDULER_ENV, str(tmp_path / "gone.json"))
    with pytest.raises(ClusterError, match="does not exist"):
        connect()
    monkeypatch.delenv(SCHEDULER_ENV)
    with pytest.raises(ClusterError, match="≥ 1"):
        connect(n_workers=0)


def test_an_endpoint_that_is_not_a_scheduler_is_a_quick_clear_error():
    """A real HTTP server on loopback where the scheduler should be: no hang, one clear error."""
    import http.server
    import threading
    import time

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        t0 = time.time()
        with pytest.raises(ClusterError, match="not a Dask scheduler.*8786"):
            connect(f"tcp://127.0.0.1:{server.server_address[1]}", timeout=2)
        assert time.time() - t0 < 10
    finally:
        server.shutdown()
        server.server_close()


def test_a_real_scheduler_passes_the_handshake_check(cluster):
    with connect(cluster.scheduler_address, timeout=5) as client:
        assert client.submit(pow, 3, 3).result() == 27


@pytest.mark.parametrize("text", ['{"address": 5', '{"address": 5}', "[1, 2]", ""])
def test_a_malformed_scheduler_file_is_a_clear_error(tmp_path, text):
    path = tmp_path / "scheduler.json"
    path.write_text(text)
    with pytest.raises(ClusterError, match="scheduler file .*(JSON|address)"):
        connect(scheduler_file=str(path), timeout=2)
