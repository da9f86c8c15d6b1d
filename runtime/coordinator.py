"""The coordinator's machinery: how a child process starts and reports, the watch loop that notices a failed,
hung or signalled role, and the run's outputs (run folder, metrics.jsonl, trace.json, plots.png, summary table).
asyncopd.train() uses it; nothing here knows about OPD, and you need not read it to learn OPD.
"""
import dataclasses
import json
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp
import yaml
from tqdm import tqdm

from runtime import channels, childguard


def child_main(role, fn, ch, *args):
    """Entry of every child: die with the coordinator, turn SIGTERM/SIGINT into a clean stop of the whole run,
    report any exception to the coordinator as (role, error, traceback)."""
    childguard.die_with(ch.coordinator)  # again: the main module may not be asyncopd.py (tools, tests), or forked
    os.environ.pop(childguard.COORDINATOR_ENV, None)  # a forked child did not re-import childguard, which pops it
    channels.ROLE = role  # its first beat comes with its first wait or stage: model loading is not watched
    received = []

    def on_signal(signum, _frame):
        if received:  # a second signal to this child (the coordinator's terminate): the default action, at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        received.append(signum)
        if not ch.signal.value:
            ch.signal.value = signum  # lock-free: the coordinator learns which signal stopped the run
        # the main thread may hold the event's lock (it polls is_set): set it from another thread
        threading.Thread(target=ch.stop.set, daemon=True).start()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
        signal.siginterrupt(s, False)  # restart system calls: a collective in gloo/NCCL must not fail with EINTR
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked by run() until here
    torch.set_num_threads(ch.threads)
    try:
        fn(ch, *args)
    except BaseException as e:  # noqa: BLE001 - everything is reported, then the child exits non-zero
        ch.err_q.put((role, f"{type(e).__name__}: {e}", traceback.format_exc()))
        sys.exit(1)


def visible_device(device: str, parent_visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a child that must see only `device` ("cuda:N", numbered as the parent sees the GPUs):
    the parent's own restriction (e.g. "4,5,6,7") maps N to its N-th entry."""
    index = int(device.split(":")[1]) if ":" in device else 0
    if parent_visible is None:
        return str(index)
    entries = [e.strip() for e in parent_visible.split(",") if e.strip()]
    if index >= len(entries):
        raise ValueError(f"{device} but CUDA_VISIBLE_DEVICES={parent_visible!r} shows {len(entries)} GPUs: "
                         "use a device index below that")
    return entries[index]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_children(ch, roles, run_dir, method):
    """One process per (role, fn, args), forked or spawned (config.start_method), entered through child_main; their
    pids go to run_dir/pids.json. Children start with SIGTERM/SIGINT blocked (the mask survives fork and exec) and
    unblock them once their handlers are in place: a Ctrl-C during their start stops the run instead of printing a
    traceback per child."""
    context, procs, stop_signals = mp.get_context(method), {}, {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    os.environ[childguard.COORDINATOR_ENV] = str(os.getpid())  # read by childguard in each child, first thing
    try:
        for role, fn, args in roles:  # not daemonic: vLLM starts a process of its own
            procs[role] = context.Process(target=child_main, args=(role, fn, ch, *args), name=f"asyncopd-{role}")
            procs[role].start()
    except BaseException:
        for p in procs.values():
            p.kill()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        os.environ.pop(childguard.COORDINATOR_ENV, None)
    with open(os.path.join(run_dir, "pids.json"), "w") as f:
        json.dump({"coordinator": os.getpid(), **{r: p.pid for r, p in procs.items()}}, f)
    return procs


def make_run_dir(cfg):
    """A new folder: a given run_name must not exist (validate() says so first); a timestamp name gets a suffix."""
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.schedule}-{cfg.loss.name}"
    os.makedirs(cfg.out_dir, exist_ok=True)
    for k in range(1, 1000):
        path = os.path.join(cfg.out_dir, name if k == 1 else f"{name}-{k}")
        try:
            os.mkdir(path)  # atomic: two runs never share a folder
            break
        except FileExistsError:
            if cfg.run_name:
                raise ValueError(f"run_name={cfg.run_name}: {path} exists: choose another run_name") from None
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    return path


class Watch:
    """What the coordinator has seen so far: records and summary, signals, stalled roles (see watch())."""

    def __init__(self, cfg, run_dir, start_step):
        # bounded: the last step record and running staleness figures, not every step (metrics.jsonl has them)
        self.summary = {"evals": [], "teacher_accuracy": None, "last_step": None, "stale": [math.inf, 0.0, 0.0, 0]}
        self.stopping, self.stalled, self.longest = [], [], 0.0  # (signal, time) received; (role, seconds silent)
        self.bar = tqdm(total=cfg.steps, initial=start_step, disable=not cfg.progress, dynamic_ncols=True,
                        desc=cfg.schedule)
        self.log = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        # trace.json (chrome://tracing, ui.perfetto.dev): one row per role, its busy spans; streamed, not kept
        self.trace, self.pids, self.t0, self.sep = open(os.path.join(run_dir, "trace.json"), "w"), {}, time.time(), ""
        self.trace.write('{"traceEvents": [\n')

    def take(self, kind, rec):
        """One record from a role: a trace span, or a metrics line (step, eval, teacher_eval, checkpoint)."""
        if kind == "trace":
            if not rec["name"].startswith(("wait", "hold")):  # the longest busy stage sets the stall limit
                self.longest = max(self.longest, rec["t1"] - rec["t0"])
            if rec["role"] not in self.pids:
                self.pids[rec["role"]] = len(self.pids)
                self.trace_event({"name": "process_name", "ph": "M", "args": {"name": rec["role"]}}, rec["role"])
            self.trace_event({"name": rec["name"], "ph": "X", "ts": (rec["t0"] - self.t0) * 1e6,
                              "dur": (rec["t1"] - rec["t0"]) * 1e6}, rec["role"])
            return
        self.log.write(json.dumps({"kind": kind, **rec}) + "\n")
        self.log.flush()
        if kind == "teacher_eval":
            self.summary["teacher_accuracy"] = rec["accuracy"]
        elif kind == "checkpoint":
            self.summary["checkpoint"], self.summary["checkpoint_step"] = rec["path"], rec["step"]
        elif kind in ("step", "eval"):
            if kind == "eval":
                self.summary["evals"].append(rec)
            else:  # staleness: min, sum of batch means, max, batches
                self.summary["last_step"], old = rec, self.summary["stale"]
                self.summary["stale"] = [min(old[0], rec["stale_min"]), old[1] + rec["stale_mean"],
                                         max(old[2], rec["stale_max"]), old[3] + 1]
                self.bar.update(1)
            evals = self.summary["evals"]
            last = self.summary["last_step"] or {"loss": 0, "stale_mean": 0, "tokens_per_s": 0}
            self.bar.set_postfix(loss=f"{last['loss']:.3f}", stale=f"{last['stale_mean']:.1f}",
                                 tok_s=f"{last['tokens_per_s']:.0f}",
                                 acc=f"{evals[-1]['accuracy']:.2f}" if evals else "-")

    def trace_event(self, event, role):
        self.trace.write(self.sep + json.dumps(dict(event, pid=self.pids[role], tid=0)) + "\n")
        self.sep = ","

    def check_stalls(self, cfg, ch, procs):
        """Roles silent longer than the stall limit (longest silent first: a peer blocked on it goes quiet later)
        are recorded and the run is stopped; the learner then checkpoints its last finished step."""
        now, limit = time.time(), max(cfg.stall_timeout_s, 5 * self.longest)
        silent = sorted((now - beat, role) for role, beat in zip(ch.roles, ch.beats[:], strict=True)
                        if beat and procs[role].exitcode is None)  # beat 0: still importing or loading
        for age, role in reversed(silent):
            if age > limit and role not in dict(self.stalled):
                self.stalled.append((role, age))
                ch.stop.set()


def watch(cfg, ch, procs, run_dir, start_step):
    """Coordinator loop: log metrics, drive the progress bar, notice a failed role within a second, a hung one
    (no heartbeat) within its stall limit, and stop on SIGTERM/SIGINT with a checkpoint (a second signal: at once).
    Returns the summary; raises RuntimeError naming the failed role."""
    w, error = Watch(cfg, run_dir, start_step), None
    old = {s: signal.signal(s, lambda signum, _: w.stopping.append((signum, time.time())))  # the loop acts
           for s in (signal.SIGINT, signal.SIGTERM)}
    learners = [p for r, p in procs.items() if r.startswith("learner")]
    try:
        while True:
            try:
                w.take(*ch.metrics_q.get(timeout=channels.POLL_S))
            except queue.Empty:
                pass
            if ch.signal.value and not w.stopping:  # a child got the signal (or the whole group did)
                w.stopping.append((ch.signal.value, time.time()))
            if w.stopping:
                ch.stop.set()
            # a repeat within 1 s is the same request: `timeout` signals the coordinator, then its whole group
            if len(w.stopping) > 1 and w.stopping[-1][1] - w.stopping[0][1] > 1.0:
                name = signal.Signals(w.stopping[-1][0]).name
                error = ("coordinator", f"second {name}: stopped at once, without a checkpoint", "")
                break
            w.check_stalls(cfg, ch, procs)
            if any(r.startswith("learner") for r, _ in w.stalled):
                break  # a hung learner cannot save: nothing to wait for
            failed = any(p.exitcode not in (None, 0) for p in procs.values()) or not ch.err_q.empty()
            if failed and not w.stalled:  # after a stall, the stopped role is the cause, not its peers' exits
                error = diagnose(ch, procs)
                break
            if all(p.exitcode == 0 for p in learners):
                ch.learned.set()  # the producers may exit now
            if all(p.exitcode == 0 for p in procs.values()) or \
                    ((w.stopping or w.stalled) and all(p.exitcode is not None for p in learners)):
                while not ch.metrics_q.empty():  # late records: final eval, checkpoint
                    w.take(*ch.metrics_q.get())
                break
    finally:
        w.bar.close()
        w.log.close()
        w.trace.write("]}\n")
        w.trace.close()
        end_children(ch, procs, [r for r, _ in w.stalled], quick=error is not None or bool(w.stalled))
        for s, h in old.items():  # last: a signal during the clean-up above is recorded, not fatal
            signal.signal(s, h)
    if w.stalled:
        error = stall_error(cfg, w.stalled[0], w.summary)
    if error:
        role, msg, tb = error
        with open(os.path.join(run_dir, "error.log"), "w") as f:
            f.write(f"{role}: {msg}\n{tb}")
        raise RuntimeError(f"{role} failed: {msg}" + (f" (traceback in {run_dir}/error.log)" if tb else ""))
    w.summary["interrupted"] = w.stopping[0][0] if w.stopping else None
    plot_run(run_dir)
    return w.summary


def end_children(ch, procs, stalled, quick):
    """Stop every child: a stalled one at once; the others get 5 s (0.5 s after a failure) to finish, then
    SIGTERM (a child that got no signal yet treats it as a stop), then SIGKILL."""
    ch.stop.set()
    for role in stalled:
        procs[role].kill()
    deadline = time.time() + (0.5 if quick else 5)
    for p in procs.values():
        p.join(timeout=max(0.0, deadline - time.time()))
        if p.is_alive():
            p.terminate()
            p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join()
    for q in (ch.rollout_q, ch.teacher_q, ch.metrics_q, ch.err_q, ch.weights_q):
        q.cancel_join_thread()


def stall_error(cfg, stalled, summary):
    role, silent = stalled
    ckpt = summary.get("checkpoint")
    then = (f"checkpoint of step {summary.get('checkpoint_step')} in {ckpt}; "
            f"resume with resume={ckpt}") if ckpt else "no checkpoint: the learner hung before it could save"
    return role, (f"the {role} process made no progress for {silent:.0f} s (stopped or hung; stall_timeout_s="
                  f"{cfg.stall_timeout_s:g}): {then}"), ""


def diagnose(ch, procs):
    """(role, message, traceback) of the root cause: a role killed by a signal (its peers then fail
    on broken queues) before the first reported exception."""
    time.sleep(0.5)  # let the other roles' reports and exits arrive
    reports = []
    while not ch.err_q.empty():
        reports.append(ch.err_q.get())
    killed = [(r, p.exitcode) for r, p in procs.items() if p.exitcode is not None and p.exitcode < 0]
    if killed:
        role, code = killed[0]
        name = signal.Signals(-code).name
        why = " (the kernel's out-of-memory killer, or another process: see dmesg)" if name == "SIGKILL" else ""
        return role, f"the {role} process died (killed by {name}{why})", "\n".join(tb for _, _, tb in reports)
    if reports:
        return reports[0]
    role, code = next((r, p.exitcode) for r, p in procs.items() if p.exitcode not in (None, 0))
    return role, f"the {role} process exited with code {code} without a report", ""


def plot_run(run_dir):
    """PNG plots from metrics.jsonl: loss/KL, eval accuracy, staleness histogram, throughput."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [r for r in recs if r["kind"] == "step"]
    evals = [r for r in recs if r["kind"] == "eval"]
    if not steps:
        return
    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    ax[0, 0].plot(x, [r["loss"] for r in steps], label="estimator loss")
    ax[0, 0].plot(x, [r["rkl_token"] for r in steps], label="reverse KL (sampled, current student)")
    ax[0, 0].set(xlabel="learner step", title="loss / KL")
    ax[0, 0].legend()
    ax[0, 1].plot([r["step"] for r in evals], [r["accuracy"] for r in evals], marker="o")
    ax[0, 1].set(xlabel="learner step", ylabel="held-out accuracy", title="student accuracy", ylim=(0, 1))
    hist = [0] * max(len(r["stale_hist"]) for r in steps)
    for r in steps:
        hist = [h + c for h, c in zip(hist, r["stale_hist"] + [0] * len(hist), strict=False)]  # padded with 0s
    ax[1, 0].bar(range(len(hist)), hist)
    ax[1, 0].set(xlabel="staleness (optimizer steps)", ylabel="trained tokens", title="token staleness histogram")
    ax[1, 1].plot(x, [r["tokens_per_s"] for r in steps])
    ax[1, 1].set(xlabel="learner step", ylabel="trained tokens / s", title="throughput (cumulative)")
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "plots.png"), dpi=80)
    plt.close(fig)


def summary_table(cfg, s):
    last, evals, (low, total, high, n) = s["last_step"], s["evals"], s["stale"]
    fmt = lambda a: "-" if a is None else f"{100 * a:.1f}%"  # noqa: E731
    rows = [("schedule / estimator", f"{cfg.schedule} / {cfg.loss.name}"),
            ("teacher accuracy", fmt(s["teacher_accuracy"])),
            ("student accuracy before", fmt(evals[0]["accuracy"] if evals else None)),
            ("student accuracy after", fmt(evals[-1]["accuracy"] if len(evals) > 1 else None)),
            ("learner steps", f"{last['step'] if last else 0}"),
            ("trained tokens / s", f"{last['tokens_per_s']:.0f}" if last else "-"),
            ("staleness min / mean / max", f"{low:.0f} / {total / n:.2f} / {high:.0f}" if n else "-"),
            ("run folder", s["run_dir"] + "  (metrics.jsonl, plots.png, trace.json, ckpt_*)")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
