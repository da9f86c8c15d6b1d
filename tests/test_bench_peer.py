"""tools/bench.py peer at a tiny budget: the asyncopd side end to end (checkpoints graded after the run, off the
clock), the table's properties, and the one-line refusal when TRL is not importable (CI has no TRL); tools/bench.py
pipeline's refusal of a run too short to time."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tools import bench


def test_peer_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "THRESHOLDS", (0.5, 0.8, 1.01))  # the last one is never reached
    shipped = os.path.join(ROOT, "models", "teacher")  # 99.4% as its own student: the others at the first checkpoint
    [r] = bench.main(["peer", "--systems", "asyncopd", "--seeds", "0", "--steps", "4", "--save-every", "2", "--eval-n",
                      "16", "--out", str(tmp_path), f"student={shipped}", f"teacher={shipped}", "batch_size=8",
                      "rollout_batch_size=8", "lr=1e-6"])
    steps, times, _ = zip(*r["points"], strict=True)
    assert steps == (2, 4) and 0 < r["start_s"] < times[0] < times[1] and r["step_s"] > 0  # times grow with steps
    assert [r["hits"][k] for k in ("0.50", "0.80", "1.01")] == [(2, times[0]), (2, times[0]), None]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("asyncopd "))
    assert row.count(f"{times[0]:.1f} (2)") == 2 and row.count("not reached") == 1
    assert not any(n.startswith("ckpt_") for n in os.listdir(tmp_path / "asyncopd-0"))  # graded, then removed
    assert (tmp_path / "peer.png").is_file()
    assert json.load(open(tmp_path / "peer.json"))[0]["points"] == [list(p) for p in r["points"]]


def test_peer_refuses_without_trl(tmp_path):
    fake = tmp_path / "trl"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no trl here')\n")  # TRL missing, even where it is installed
    argv = [sys.executable, "-m", "tools.bench", "peer", "--systems", "asyncopd,trl-gkd", "--out", str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "pip install trl==1.16.0" in out.stderr and not os.path.exists(tmp_path / "asyncopd-0")


def test_pipeline_refuses_too_few_steps_before_running(tmp_path):
    with pytest.raises(SystemExit, match="--steps 3 leaves nothing to time"):
        bench.main(["pipeline", "--steps", "3", f"out_dir={tmp_path}"])
    assert os.listdir(tmp_path) == []  # no run was started


def test_pipeline_rounds_report_medians_and_spread(tmp_path, tiny_models):
    student, teacher = tiny_models
    overrides = [f"student={student}", f"teacher={teacher}", "steps=4", "batch_size=8", "rollout_batch_size=4",
                 "max_new_tokens=8", f"out_dir={tmp_path}"]
    rows = bench.throughput(overrides, [("sync", ["schedule=sync"]), ("async", ["schedule=async"])], repeats=2)
    assert [r["schedule"] for r in rows] == ["sync", "async"] and all(r["runs"] == 2 for r in rows)
    assert rows[0]["speedup"] == 1.0  # each round against its own sync run
    for r in rows:
        assert r["efficiency_min"] <= r["efficiency"] <= r["efficiency_max"]  # the median of two rounds: their mean
        assert r["efficiency"] == pytest.approx((r["efficiency_min"] + r["efficiency_max"]) / 2, rel=1e-12)
    assert len(os.listdir(tmp_path)) == 4  # two rounds of two schedules, each a run of its own
