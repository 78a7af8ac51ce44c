"""A `raydd evaluate` driver SIGKILLed or interrupted mid-sweep: its finished trials are on disk and
never run again, and the counts it reports are those of the whole plan."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.ray


def _synset(root, digits):
    from raydd.data import load_info, sample_per_class
    from raydd.synset import Synset, save_synset
    x, y = sample_per_class(load_info(digits), "train", 2, seed=3)
    save_synset(root / "synset", Synset(x, y, meta={"num_classes": 10}))
    return root / "synset"


def _interrupt(argv, journal, sig, at_least):
    """Run ``argv`` until the journal lists ``at_least`` trials, then send ``sig``; returns the journal."""
    # its own session, so the local Ray it starts can be cleaned up after a killed driver
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(_lines(journal)) < at_least:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.1)
        os.kill(proc.pid, sig)
        output = proc.communicate(timeout=120)[0].decode()
        if sig == signal.SIGINT:
            assert proc.returncode in (2, 130), output[-2000:]
            assert "Traceback" not in output, output[-2000:]
            if proc.returncode == 2:
                assert re.search(r"raydd: error: \d of 6 evaluation trials did not finish", output), output[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        time.sleep(1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any Ray process the driver left behind
        except ProcessLookupError:
            pass
    return {r["key"]: r for r in map(json.loads, _lines(journal))}


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_killed_evaluate_keeps_finished_trials(tmp_path, digits):
    synset = _synset(tmp_path, digits)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "raydd", "evaluate", "configs/digits.yaml", "--synset", str(synset),
            "--set", f"data.dir={digits}", "--set", "evaluate.archs=[mlp]", "--set", "evaluate.modes=[hard]",
            "--set", "evaluate.seeds=3", "--set", "evaluate.epochs=50", "--set", "ray.num_cpus=1",
            "--out", str(out)]
    journal = out / "eval" / "trials.jsonl"

    done = _interrupt(argv, journal, signal.SIGKILL, at_least=1)
    assert 1 <= len(done) < 6 and not (out / "eval" / "results.json").exists()
    # Ctrl-C once more trial has finished: the report counts all 6 planned trials
    done = _interrupt(argv, journal, signal.SIGINT, at_least=len(done) + 1)
    assert len(done) < 6
    report = json.loads((out / "eval" / "results.json").read_text())
    assert len(report["trials"]) == 6 and not report["complete"]
    assert sum(t["status"] == "ok" for t in report["trials"]) == len(done)

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{6 - len(done)} trials to run ({len(done)} reused)" in again.stdout
    doc = json.loads((out / "eval" / "results.json").read_text())
    trials = {t["key"]: t for t in doc["trials"]}
    assert len(trials) == 6 and all(t["status"] == "ok" for t in trials.values())
    for key, rec in done.items():  # the same run of the trial, not a second one
        assert (trials[key]["trial_id"], trials[key]["started_at"]) == (rec["trial_id"], rec["started_at"])
    ran = [t for t in trials.values() if t["key"] not in done]
    assert all(t["started_at"] > max(r["started_at"] for r in done.values()) for t in ran)
    assert f"6 trials: {6 - len(done)} in this sweep's Tune experiment" in (out / "eval" / "results.md").read_text()
    assert f"{len(done)} reused" in (out / "eval" / "results.md").read_text()
    # every trial is on the journal exactly once: none ran twice
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert sorted(keys) == sorted(trials)
