"""A local Ray head on 127.0.0.1 for the tests and benchmarks, stopped without touching any other Ray.

``ray stop`` stops every Ray process on the machine (a user's cluster, a colleague's benchmark head), so the
head runs as ``ray start --head --block`` in its own session: SIGTERM to it makes Ray kill what it started
(its shutdown hooks; its children also die with it by PDEATHSIG), and its process group is the fallback.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from caer_fast.testing.serving import free_port

# this interpreter's ray, whatever `ray` is on PATH
RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
# A loopback test cluster without token auth: Ray 2.60 turns it on once ~/.ray/auth_token exists (any local
# ray.init writes one), and a head and a driver that disagree about it cannot talk. Drivers take it too.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
# no drain on SIGTERM (Ray waits up to 30 s for one by default): nothing on a test head needs it
_HEAD_ENV = {**RAY_ENV, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


@dataclass(frozen=True)
class RayHead:
    address: str  # host:port, for ray.init / --ray
    port: int
    temp_dir: str
    pid: int  # the `ray start --block` process; also its process group


def _procs():
    """(pid, process group, state, command line) of every process readable in /proc."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # the name in (...) may hold spaces
        yield int(d.name), int(fields[2]), fields[0], cmd


def head_processes(head: RayHead) -> list:
    """Live (not zombie) processes of ``head``: its process group, and any raylet / gcs_server whose command
    line names its temp dir or its GCS port (in case one left the group)."""
    return [(pid, cmd[:160]) for pid, pgid, state, cmd in _procs() if state != "Z" and (
        pgid == head.pid or (("raylet" in cmd or "gcs_server" in cmd)
                             and (head.temp_dir in cmd or f"--gcs_server_port={head.port}" in cmd
                                  or f"--gcs-address=127.0.0.1:{head.port}" in cmd)))]


def _wait_gone(head: RayHead, timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while (left := head_processes(head)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@contextmanager
def ray_head(num_cpus: int = 2, object_store_memory: int = 300_000_000, timeout: float = 180,
             stop_timeout: float = 60):
    """Start a Ray head on 127.0.0.1 (a free port, a fresh temp dir), yield a :class:`RayHead` once it
    is up, and stop exactly that head (and remove its temp dir) on exit. Raises RuntimeError with Ray's output
    if it does not come up within ``timeout`` s, or if any of its processes outlive the stop."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    log_path = Path(temp) / "ray_start.log"
    cmd = [*RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--temp-dir={temp}",
           f"--object-store-memory={object_store_memory}", "--disable-usage-stats"]
    with open(log_path, "wb") as log:  # a file, not a pipe: nobody reads it while the head runs
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, **_HEAD_ENV), start_new_session=True)
    head = RayHead(f"127.0.0.1:{port}", port, temp, proc.pid)
    try:
        _wait_up(head, proc, log_path, timeout)
        yield head
    finally:
        try:
            _stop(head, proc, log_path, stop_timeout)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


def _wait_up(head, proc, log_path, timeout):
    # `ray start` writes the address file after the node (GCS, raylet) is started, just before it blocks
    address_file = Path(head.temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {proc.returncode}:\n{log_path.read_text()}")
        if address_file.exists():
            try:
                socket.create_connection(("127.0.0.1", head.port), timeout=2).close()
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray head on port {head.port} not up after {timeout:.0f} s; its output so far:\n"
                               f"{log_path.read_text()}")
        time.sleep(0.2)


def _stop(head, proc, log_path, timeout):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
        left = _wait_gone(head, 10)
    except subprocess.TimeoutExpired:
        left = head_processes(head)
    if left:  # its shutdown hooks did not finish the job: kill the group (ours alone) and any stray daemon
        print(f"ray_head: SIGKILL to what is left of the head on port {head.port}: {left}", file=sys.stderr)
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
        left = _wait_gone(head, 10)
        if left:
            raise RuntimeError(f"processes of the Ray head on port {head.port} outlived SIGKILL: {left}\n"
                               f"{log_path.read_text()[-4000:]}")
