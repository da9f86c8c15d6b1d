"""The fault matrix on the CPU default with tiny models: signals (SIGTERM, SIGHUP, a second signal), hung (SIGSTOPped)
roles, kill -9 of the coordinator, a file system that fills up. Each case checks: seconds to exit, exit code,
checkpoint present, orphans, leftover /dev/shm. `pytest -s tests/test_faults.py` prints one row per case."""
import glob
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import MEASURED, ROOT
from test_pipeline import _alive

# The signal and stall rows are timing-dependent (SIGSTOP races against queue hand-offs on a loaded machine): a
# measurement run by hand, not part of `bash run.sh test`:
#   ASYNCOPD_SLOW=1 .venv/bin/python -m pytest -s tests/test_faults.py
# The full-disk rows are deterministic and run in CI (where a tmpfs can be mounted: root).
slow = pytest.mark.skipif(os.environ.get("ASYNCOPD_SLOW") != "1", reason="fault matrix: set ASYNCOPD_SLOW=1")

TINY = ["eval_size=0", "max_new_tokens=24", "batch_size=4", "threads=1", "progress=false", "steps=10000",
        "schedule=async", "loss.teacher_topk=4", "loss.student_topk=4", "loss.samples=4", "lr=0.01"]


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


def _row(case, took, code, ckpts, orphans, shm):
    """One row of the matrix, printed now and again after the results (conftest's "measured" section)."""
    if not MEASURED or not MEASURED[0].startswith("fault matrix"):
        MEASURED.insert(0, f"fault matrix: {'case':<34} {'exit s':>6} {'code':>5}  {'checkpoint':<11} {'orphans':>7} "
                           f"{'shm':>4}")
    MEASURED.append(f"fault matrix: {case:<34} {took:>6.1f} {code:>5}  {ckpts[-1] if ckpts else '-':<11} "
                    f"{len(orphans):>7} {shm:>4}")
    print("\n" + MEASURED[0] + "\n" + MEASURED[-1])


def _finish(case, proc, run, pids, family, shm_before, t0, timeout=60):
    out, err = proc.communicate(timeout=timeout)
    took = time.time() - t0
    time.sleep(0.5)
    orphans = [p for p in set(family) | set(pids.values()) if p != proc.pid and _alive(p)]
    ckpts = sorted(d for d in os.listdir(run) if d.startswith("ckpt_")) if os.path.isdir(run) else []
    # new /dev/shm names: reported, not asserted (other runs on the machine create and remove sem.mp-* too)
    shm = sorted(set(os.listdir("/dev/shm")) - shm_before)
    _row(case, took, proc.returncode, ckpts, orphans, len(shm))
    for p in orphans:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    return out, err, took, ckpts, orphans, shm


@slow
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


@slow
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


@slow
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_sighup_and_a_quick_repeat_stop_with_a_checkpoint(tmp_path, tiny_models, signum):
    """SIGHUP (a closed terminal or ssh session) stops the run as SIGTERM does. A repeat 0.3 s later (within a second:
    the same request) to the whole group still lets the learner checkpoint and the coordinator print its report."""
    shm_before = set(os.listdir("/dev/shm"))
    proc, run, pids, family = _start(tmp_path, tiny_models, "hup")
    t0 = time.time()
    os.killpg(proc.pid, signum)
    if signum == signal.SIGTERM:
        time.sleep(0.3)
        os.killpg(proc.pid, signum)
    name = signal.Signals(signum).name
    case = "SIGHUP to group" if signum == signal.SIGHUP else "SIGTERM x2 0.3 s apart to group"
    out, err, took, ckpts, orphans, shm = _finish(case, proc, run, pids, family, shm_before, t0)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert f"interrupted by {name}; the last checkpoint is step" in out and "learner steps" in out, out
    assert len(ckpts) == 1 and f"resume with resume={run}/{ckpts[0]}" in out
    state = json.load(open(os.path.join(run, ckpts[0], "trainer_state.json")))
    assert state["step"] >= 1 and state["step"] == _steps(run)[-1]["step"]
    assert took < 20 and not orphans


@slow
def test_a_closed_terminal_hangs_up_the_run(tmp_path, tiny_models):
    """The real SIGHUP: the run's controlling terminal (a pty, as over ssh) closes while the progress bar writes to
    it. The kernel hangs up the foreground group; the run checkpoints, and writes to the dead terminal do not
    fail it."""
    student, teacher = tiny_models
    run = os.path.join(tmp_path, "pty")
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own, the pty its terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "asyncopd.py", "train", f"student={student}", f"teacher={teacher}",
                                  f"out_dir={tmp_path}", "run_name=pty", "progress=true",
                                  *[a for a in TINY if not a.startswith("progress=")]])
    deadline = time.time() + 120
    while time.time() < deadline and not _steps(run):
        try:
            os.read(fd, 1 << 16) if select.select([fd], [], [], 0.1)[0] else None
        except OSError:
            break
    pids = json.load(open(f"{run}/pids.json"))
    t0 = time.time()
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    took, code = time.time() - t0, os.waitstatus_to_exitcode(status)
    time.sleep(0.5)
    orphans = [p for p in pids.values() if p != pid and _alive(p)]
    ckpts = sorted(d for d in os.listdir(run) if d.startswith("ckpt_"))
    _row("closed terminal (pty)", took, code, ckpts, orphans, "-")
    assert code == 128 + signal.SIGHUP and len(ckpts) == 1 and not orphans and took < 20, (code, ckpts, orphans)
    state = json.load(open(os.path.join(run, ckpts[0], "trainer_state.json")))
    assert state["step"] >= 1 and state["step"] == _steps(run)[-1]["step"]


@slow
def test_a_second_signal_kills_the_children_and_still_reports(tmp_path, tiny_models):
    """The first SIGTERM waits for the learner's checkpoint (here: never, the learner is stopped); a second one,
    1.5 s later, kills the children at once. The report still prints, and its resume hint names the last complete
    checkpoint (the periodic one), never a partial folder."""
    shm_before = set(os.listdir("/dev/shm"))
    proc, run, pids, family = _start(tmp_path, tiny_models, "twice", "save_every=1")
    while not glob.glob(f"{run}/ckpt_00001"):
        time.sleep(0.05)
    os.kill(pids["learner"], signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err, took, ckpts, orphans, shm = _finish("SIGTERM, SIGTERM 1.5 s later", proc, run, pids, family,
                                                  shm_before, t0)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "then stopped at once by a second SIGTERM" in out and "learner steps" in out, out
    last = ckpts[-1]
    assert f"resume with resume={run}/{last}" in out and os.path.isfile(f"{run}/{last}/manifest.json"), out
    assert not glob.glob(f"{run}/*.tmp-*") and took < 20 and not orphans  # 10 s goal; 20 s: a loaded 2-core CI


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, unmounted after the test (mounting needs root: skipped elsewhere)."""
    path = tmp_path / "small"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk rows need root")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder, leave):
    """Fill folder's file system up to `leave` free bytes."""
    st = os.statvfs(folder)
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


@pytest.mark.parametrize("where", ["coordinator", "learner"])
def test_a_full_disk_ends_the_run(tmp_path, tiny_models, small_disk, where):
    """The disk fills up during a run. coordinator: no room left, so metrics.jsonl cannot grow; learner: room for
    the metrics but not for the next checkpoint (save_every=2). Either way every process exits within seconds, the
    last line names the file system and the fix (and the checkpoint to resume from), and no partial checkpoint
    folder is left. (Before: the coordinator waited forever on its living children.)"""
    shm_before = set(os.listdir("/dev/shm"))
    proc, run, pids, family = _start(small_disk, tiny_models, where, f"save_every={2 if where == 'learner' else 0}",
                                     until="step")
    if where == "learner":
        while not glob.glob(f"{run}/ckpt_00002"):
            time.sleep(0.05)
    t0 = time.time()
    _fill(small_disk, 0 if where == "coordinator" else 256 << 10)
    out, err, took, ckpts, orphans, shm = _finish(f"full disk ({where} writes)", proc, run, pids, family,
                                                  shm_before, t0)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(f"asyncopd: {where} failed:"), err[-2000:]
    assert f"no space left on {small_disk} (tmpfs, " in last and "free space there, or give out_dir" in last, last
    if where == "learner":
        assert "DiskFull" in last and f"the last checkpoint is step {int(ckpts[-1][5:])}: resume with " \
            f"resume={run}/{ckpts[-1]}" in last, last
        assert os.path.isfile(f"{run}/{ckpts[-1]}/manifest.json")
    else:
        assert "no checkpoint was saved" in last and not ckpts, last
    assert not glob.glob(f"{run}/*.tmp-*") and took < 20 and not orphans, (took, orphans)


@slow
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
