"""tools/gpu_check.py: its logic, shrunk (``--tiny``) and on the CPU; the real check needs a GPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.py"

ROWS = [("1 APM round", f) for f in ("fp32 s/round", "fp32 s/refresh round", "fp32 s/reuse round", "bf16 s/round",
                                     "bf16 s/refresh round", "bf16 s/reuse round", "bf16 speed-up x")]
ROWS += [("2 Ray service", f) for f in ("total rounds/s", "requests", "batches", "images", "requests/batch",
                                       "images/batch")]
ROWS += [("3 evaluation", f) for f in ("seconds", "s/epoch", "test acc")]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.ray
@pytest.mark.slow   # a local Ray and 5 worker processes: ~40 s on 2 loaded cores
def test_tiny_cpu_check_measures_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    res = _run("--device", "cpu", "--tiny", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    rows = got["rows"]
    assert [(r["part"], r["figure"]) for r in rows] == ROWS     # no GPU rows on the CPU
    for r in rows:
        assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]) and r["value"] > 0, r
        assert f"| {r['part']} | {r['figure']} | {r['value']:.4g} |" in res.stdout    # the printed table
    s, parts = got["setup"], got["parts"]
    assert (s["size"], s["width"], got["tiny"]) == (8, 16, True)
    for p in ("fp32", "bf16"):
        assert parts["round"][p]["rounds"] == s["cycles"] * s["refresh"]
        assert parts["round"][p]["peak_gpu_mib"] is None
    # Every group call reached the one service: per worker, one cycle of warm-up and the timed rounds
    # each send logits + input_grad, and every refresh one more logits call, each of the whole group.
    svc, n = parts["service"], s["ipc"] * s["num_classes"]
    rounds = s["refresh"] + s["worker_rounds"]
    per_worker = 2 * rounds + math.ceil(rounds / s["refresh"])
    assert svc["rounds"] == s["workers"] * s["worker_rounds"] == 4 * s["worker_rounds"]
    assert svc["requests"] == s["workers"] * per_worker and svc["images"] == svc["requests"] * n
    assert 1 <= svc["batches"] <= svc["requests"] and svc["service_device"] == "cpu"
    ev = parts["eval"]
    assert ev["epochs"] == s["eval_epochs"] and 0 < ev["test_acc"] <= 1
    assert got["environment"]["torch"] == torch.__version__


def test_cuda_without_a_gpu_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: --device cuda would run the check")
    res = _run("--device", "cuda", timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--device cpu" in lines[0]
