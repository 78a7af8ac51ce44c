"""A SIGKILLed driver leaves its local Ray's DashboardAgent and RuntimeEnvAgent running (GCS and raylet
die with it); the next raydd process that claims the same run directory stops exactly those, and
never a process of a live driver, of another host, or one that merely reuses a recorded pid."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from raydd import raycluster
from raydd.io import write_json

RECORD = raycluster.RAY_RECORD


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _record(run, driver, victims, **extra):
    rec = {"driver": raycluster._proc(driver.pid), "host": socket.gethostname(), "boot_id": raycluster._boot_id(),
           "session_dir": "/tmp/ray/session_x", "processes": [raycluster._proc(v.pid) for v in victims], **extra}
    write_json(run / RECORD, rec)
    return rec


def test_only_the_recorded_processes_of_a_dead_driver_are_stopped(tmp_path):
    driver, victim, bystander = _sleeper(), _sleeper(), _sleeper()
    try:
        rec = _record(tmp_path, driver, [victim])
        assert raycluster.reap_orphans(tmp_path) == []          # the driver lives: its Ray is its own
        _record(tmp_path, driver, [victim], host="another-host")
        driver.kill()
        driver.wait()
        assert raycluster.reap_orphans(tmp_path) == []          # another machine's record
        rec["processes"] = [{**rec["processes"][0], "start": rec["processes"][0]["start"] - 1},  # reused pid
                            raycluster._proc(bystander.pid) | {"start": 1}]
        write_json(tmp_path / RECORD, rec)
        assert raycluster.reap_orphans(tmp_path) == [] and not (tmp_path / RECORD).exists()
        assert victim.poll() is None and bystander.poll() is None
        write_json(tmp_path / RECORD, {**rec, "processes": [raycluster._proc(victim.pid)]})
        assert raycluster.reap_orphans(tmp_path) == [victim.pid]
        assert victim.wait(timeout=10) == -signal.SIGKILL and bystander.poll() is None
    finally:
        for p in (driver, victim, bystander):
            p.kill()
            p.wait()


def _alive(procs):
    return [p for p in procs if raycluster._alive(p)]


def _settled(procs, quiet=3.0, limit=60.0):
    """The processes still alive once none has exited for ``quiet`` s. GCS, raylet and workers follow
    their dead parent at their own pace (seconds on loaded cores); what is left then are the orphans."""
    end = time.time() + limit
    left, since = _alive(procs), time.time()
    while time.time() - since < quiet and time.time() < end:
        time.sleep(0.2)
        if len(now := _alive(procs)) != len(left):
            left, since = now, time.time()
    return left


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_stops_what_a_killed_driver_left(tmp_path, digits):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "raydd", "teachers", "train", "configs/digits.yaml", "--set", f"data.dir={digits}",
            "--set", "teachers.count=1", "--set", "teachers.epochs=2", "--set", "teachers.arch=convnet:width=8",
            "--set", "ray.num_cpus=1", "--out", str(run)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (run / RECORD).exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read().decode()[-2000:]
            time.sleep(0.1)
        first.kill()                                             # SIGKILL: no cleanup of any kind
        first.wait()
        procs = json.loads((run / RECORD).read_text())["processes"]
        left = _settled(procs)
        names = {p["cmd"] for p in left}
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names   # the orphans on ports
        again = subprocess.run(argv, capture_output=True, text=True, timeout=240)
        assert again.returncode == 0, again.stderr[-2000:]
        line = next(x for x in again.stderr.splitlines() if "left by the killed raydd driver" in x)
        assert f"driver pid {first.pid} of {run}" in line
        assert {p["pid"] for p in left} <= set(map(int, line.split("pids ")[1].split()))  # stopped, not expired
        assert _alive(procs) == []
        assert (run / "teachers" / "teachers.json").exists()
        # the rerun's own Ray shut down with it; its record names only processes that are gone now
        assert _alive(json.loads((run / RECORD).read_text())["processes"]) == []
    finally:
        for pid in (first.pid,):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if (run / RECORD).exists():
            for p in _alive(json.loads((run / RECORD).read_text())["processes"]):
                os.kill(p["pid"], signal.SIGKILL)
