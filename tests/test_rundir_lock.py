"""One run per directory: a second process is refused with its holder named, a crash frees it."""
import subprocess
import sys
import time

import pytest

from raydd.errors import RayddError
from raydd.rundir import LOCK_FILE, lock

HOLD = "import sys, time; from pathlib import Path; from raydd.rundir import lock; " \
       "lock(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RayddError, match=rf"run is in use by raydd pid {holder.pid} on \S+ since .*; "
                                             r"wait for it to finish or use another --out") as e:
            lock(run)
        assert "\n" not in str(e.value)
    finally:
        holder.kill()       # SIGKILL: no cleanup runs, the OS drops the lock
        holder.wait()
    lock(run)               # now ours
    lock(run)               # and again: a process may claim its own directory for every stage
    assert (run / LOCK_FILE).read_text().startswith("raydd pid ")
    probe = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(60)", "pass"), str(run)],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "is in use by raydd pid" in probe.stderr


def test_a_refused_fresh_run_lets_go_of_its_lock_before_removing_it(tmp_path, monkeypatch):
    from pathlib import Path

    from raydd.cli import main
    monkeypatch.chdir(Path(__file__).parents[1])
    run = tmp_path / "run"
    # claimed (and locked) by teachers train, then refused by the data stage: the fresh run is removed
    assert main(["teachers", "train", "configs/digits.yaml", "--set", "data.source=cifar10",
                 "--set", f"data.dir={tmp_path / 'nodata'}", "--out", str(run)]) == 2
    assert not run.exists()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # this process no longer believes it holds the directory: the new holder is respected
        with pytest.raises(RayddError, match=rf"in use by raydd pid {holder.pid}"):
            lock(run)
    finally:
        holder.kill()
        holder.wait()
