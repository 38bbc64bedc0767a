"""caer_fast.testing.ray_head: the test head stops alone (`ray stop` would take every Ray on the machine with
it) and leaves none of its processes behind."""
import socket

import pytest

from caer_fast.testing.ray_head import ray_head

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


def _tree(pid: int) -> dict:
    p = psutil.Process(pid)
    return {q.pid: " ".join(q.cmdline())[:120] for q in [p, *p.children(recursive=True)]}


def _alive(pids) -> dict:
    out = {}
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out[pid] = pids[pid]
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_a_head_stops_alone_and_leaves_nothing_behind():
    small = {"num_cpus": 1, "object_store_memory": 100_000_000}
    with ray_head(**small) as other:  # stands for a user's own cluster
        other_procs = _tree(other.pid)
        with ray_head(**small) as ours:
            ours_procs = _tree(ours.pid)
            for daemon in ("raylet", "gcs_server"):
                assert any(daemon in c for c in ours_procs.values()), ours_procs
        assert not _alive(ours_procs)
        assert _alive(other_procs) == other_procs  # all of the other head's processes, not just some
        socket.create_connection(("127.0.0.1", other.port), timeout=5).close()
    assert not _alive(other_procs)
