"""The fault matrix of issue #11 on the CPU default with tiny models: signals, hung (SIGSTOPped) roles, kill -9 of
the coordinator. Each case checks: seconds to exit, exit code, checkpoint present, orphans, leftover /dev/shm.
`pytest -s tests/test_faults.py` prints one row per case."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_pipeline import _alive

# The matrix is timing-dependent (SIGSTOP races against queue hand-offs on a loaded machine): a measurement
# run by hand, not part of `bash run.sh test`. ASYNCOPD_SLOW=1 .venv/bin/python -m pytest -s tests/test_faults.py
pytestmark = pytest.mark.skipif(os.environ.get("ASYNCOPD_SLOW") != "1", reason="fault matrix: set ASYNCOPD_SLOW=1")

TINY = ["eval_size=0", "max_new_tokens=24", "batch_size=4", "threads=1", "progress=false", "steps=10000",
        "schedule=async", "loss.teacher_topk=4", "loss.student_topk=4", "loss.samples=4", "lr=0.01"]
ROWS = []


def _descendants(pid):
    """Children of the coordinator (roles and multiprocessing's resource tracker), read from /proc."""
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(p))
        except (OSError, IndexError):
            pass
    return found


def _steps(run):
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if r["kind"] == "step"]
    except FileNotFoundError:
        return []


def _start(tmp_path, tiny_models, name, *extra, until="step"):
    """Start a run in its own process group; wait for its first step (until="step") or its children (until="spawn")."""
    student, teacher = tiny_models
    cmd = [sys.executable, os.path.join(ROOT, "asyncopd.py"), "train", f"student={student}", f"teacher={teacher}",
           f"out_dir={tmp_path}", f"run_name={name}", *TINY, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    run, deadline = os.path.join(tmp_path, name), time.time() + 120
    ready = (lambda: _steps(run)) if until == "step" else (lambda: os.path.isfile(f"{run}/pids.json"))
    while time.time() < deadline and not ready():
        time.sleep(0.05)
    assert ready(), f"the run never reached {until}: {proc.poll()}"
    pids = json.load(open(f"{run}/pids.json"))
    return proc, run, pids, _descendants(proc.pid)


def _finish(case, proc, run, pids, family, shm_before, t0, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    took = time.time() - t0
    time.sleep(0.5)
    orphans = [p for p in set(family) | set(pids.values()) if p != proc.pid and _alive(p)]
    ckpts = sorted(d for d in os.listdir(run) if d.startswith("ckpt_")) if os.path.isdir(run) else []
    # new /dev/shm names: reported, not asserted (other runs on the machine create and remove sem.mp-* too)
    shm = sorted(set(os.listdir("/dev/shm")) - shm_before)
    ROWS.append((case, f"{took:.1f}", proc.returncode, ckpts[-1] if ckpts else "-", len(orphans), len(shm)))
    print(f"\n{'case':<34} {'exit s':>6} {'code':>5}  {'checkpoint':<11} {'orphans':>7} {'shm':>4}")
    last = ckpts[-1] if ckpts else "-"
    print(f"{case:<34} {took:>6.1f} {proc.returncode:>5}  {last:<11} {len(orphans):>7} {len(shm):>4}")
    for p in orphans:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    return out, err, took, ckpts, orphans, shm


@pytest.mark.parametrize("target", ["group", "teacher", "learner"])
def test_sigterm_checkpoints_the_last_step(tmp_path, tiny_models, target):
    """`timeout`, systemd, Slurm, Kubernetes: SIGTERM to the whole group, or to one process of the run."""
    shm_before = set(os.listdir("/dev/shm"))
    proc, run, pids, family = _start(tmp_path, tiny_models, "term")
    t0 = time.time()
    if target == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(pids[target], signal.SIGTERM)
    out, err, took, ckpts, orphans, shm = _finish(f"SIGTERM to {target}", proc, run, pids, family, shm_before, t0)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert len(ckpts) == 1 and "resume with resume=" in out
    state = json.load(open(os.path.join(run, ckpts[0], "trainer_state.json")))
    assert state["step"] >= 1 and state["step"] == _steps(run)[-1]["step"]
    assert took < 20 and not orphans  # 10 s goal; 20 s: a loaded 2-core CI machine


@pytest.mark.parametrize("role", ["teacher", "rollout", "learner"])
def test_a_stopped_role_is_named_and_the_run_ends(tmp_path, tiny_models, role):
    """SIGSTOP stands for a hung process: its heartbeat stops. A stopped teacher or rollout: the learner checkpoints
    its last finished step. A stopped learner cannot save: it is killed, and the message says so."""
    shm_before = set(os.listdir("/dev/shm"))
    proc, run, pids, family = _start(tmp_path, tiny_models, "stall", "stall_timeout_s=5")
    os.kill(pids[role], signal.SIGSTOP)
    t0 = time.time()
    out, err, took, ckpts, orphans, shm = _finish(f"SIGSTOP {role} (stall_timeout_s=5)", proc, run, pids, family,
                                                  shm_before, t0)
    assert proc.returncode == 1 and f"the {role} process made no progress" in err, err[-2000:]
    assert err.splitlines()[-1].startswith(f"asyncopd: {role} failed:")  # the cause is the last line
    if role == "learner":
        assert not ckpts and "no checkpoint" in err
    else:  # the learner receives in a background thread (channels.receive): a stopped sender cannot block it
        assert len(ckpts) == 1 and f"resume with resume={run}/{ckpts[0]}" in err, err[-2000:]
    assert took < 5 + 20 and not orphans


def test_a_second_signal_exits_at_once(tmp_path, tiny_models):
    """The first SIGTERM waits for the learner's checkpoint (here: never, the learner is stopped); a second one,
    a second later, ends the run at once."""
    shm_before = set(os.listdir("/dev/shm"))
    proc, run, pids, family = _start(tmp_path, tiny_models, "twice")
    os.kill(pids["learner"], signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err, took, ckpts, orphans, shm = _finish("SIGTERM, SIGTERM 1.5 s later",
                                                  proc, run, pids, family, shm_before, t0)
    assert proc.returncode == 1 and "second SIGTERM: stopped at once, without a checkpoint" in err, err[-2000:]
    assert took < 20 and not orphans  # 10 s goal; 20 s: a loaded 2-core CI machine


@pytest.mark.parametrize("moment", ["spawn", "step"])
def test_kill_9_of_the_coordinator_leaves_no_process(tmp_path, tiny_models, moment):
    """spawn: spawned children (start_method=spawn, as on GPUs) are still importing torch; childguard sets
    PR_SET_PDEATHSIG before those imports. step: the run (forked children, the cpu default) is training."""
    shm_before = set(os.listdir("/dev/shm"))
    spawned = ["start_method=spawn"] if moment == "spawn" else []
    proc, run, pids, family = _start(tmp_path, tiny_models, "kill9", *spawned, until=moment)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    deadline = time.time() + 30
    while time.time() < deadline and [p for p in set(family) | set(pids.values()) if _alive(p)]:
        time.sleep(0.1)
    out, err, took, ckpts, orphans, shm = _finish(f"kill -9 coordinator at {moment}", proc, run, pids, family,
                                                  shm_before, t0)
    assert family and not orphans
    assert took < 20
