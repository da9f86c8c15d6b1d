"""The coordinator's machinery: how a child process starts and reports, the watch loop that notices a failed,
hung or signalled role, and the run's outputs (run folder, metrics.jsonl, trace.json, plots.png, summary table).
asyncopd.train() uses it; nothing here knows about OPD, and you need not read it to learn OPD.
"""
import contextlib
import dataclasses
import glob
import json
import math
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp
from tqdm import tqdm

from runtime import channels, childguard, filesystem
from runtime.strict_yaml import dump_yaml

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal or ssh session closed


class Interrupted(KeyboardInterrupt):
    """A stop signal before the run's children started: nothing to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The coordinator's SIGINT, SIGTERM and SIGHUP (handlers are process-wide: one instance, STOPS). Inside
    `with STOPS:` a signal before the children start raises Interrupted; once they have started
    (start_children) each is recorded, never fatal, until the block ends: watch() stops the run on the first (the
    learner checkpoints), kills the children on a second, and the summary and resume hint still print. The command
    line holds the block from its start to its last line; nested blocks share it."""

    def __init__(self):
        self.received, self.children, self.depth, self.old = [], False, 0, {}

    def __enter__(self):
        if self.depth == 0:
            self.received.clear()
            self.old = {s: signal.signal(s, self.on_signal) for s in STOP_SIGNALS}
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            self.children = False
            for s, handler in self.old.items():
                signal.signal(s, handler)

    def on_signal(self, signum, _frame):
        self.received.append((signum, time.time()))
        if not self.children:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def raising(self):
        """Within: a stop signal raises Interrupted again (work after the run that may simply stop: the offline
        evaluation of saved checkpoints)."""
        children, self.children = self.children, False
        try:
            yield
        finally:
            self.children = children


STOPS = StopSignals()


def child_main(role, fn, ch, *args):
    """Entry of every child: die with the coordinator, turn SIGTERM/SIGINT/SIGHUP into a clean stop of the whole run,
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

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)
        signal.siginterrupt(s, False)  # restart system calls: a collective in gloo/NCCL must not fail with EINTR
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by start_children() until here
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
    pids go to run_dir/pids.json. Children start with the stop signals blocked (the mask survives fork and exec) and
    unblock them once their handlers are in place: a Ctrl-C during their start stops the run instead of printing a
    traceback per child. From here on, the coordinator's own stop signals are recorded (STOPS), not raised."""
    context, procs = mp.get_context(method), {}
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    os.environ[childguard.COORDINATOR_ENV] = str(os.getpid())  # read by childguard in each child, first thing
    try:
        for role, fn, args in roles:  # not daemonic: vLLM starts a process of its own
            procs[role] = context.Process(target=child_main, args=(role, fn, ch, *args), name=f"asyncopd-{role}")
            procs[role].start()
        with open(os.path.join(run_dir, "pids.json"), "w") as f:
            json.dump({"coordinator": os.getpid(), **{r: p.pid for r, p in procs.items()}}, f)
        STOPS.children = True  # before the unblock: a signal pending since then stops the run, not the start-up
    except BaseException:
        for p in procs.values():
            p.kill()
            p.join()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        os.environ.pop(childguard.COORDINATOR_ENV, None)
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
        f.write(dump_yaml(dataclasses.asdict(cfg)))
    return path


class Watch:
    """What the coordinator has seen so far: records and summary, signals, stalled roles (see watch())."""

    def __init__(self, cfg, run_dir, start_step):
        # bounded: the last step record and running staleness figures, not every step (metrics.jsonl has them)
        self.summary = {"evals": [], "teacher_accuracy": None, "last_step": None, "stale": [math.inf, 0.0, 0.0, 0]}
        self.stopping, self.stalled, self.longest = [], [], 0.0  # (signal, time) received; (role, seconds silent)
        self.cfg, self.plain = cfg, not (cfg.progress and sys.stderr.isatty())  # a log file keeps lines, not a bar
        say(f"asyncopd: run folder {run_dir}")
        self.bar = tqdm(total=cfg.steps, initial=start_step, disable=self.plain, dynamic_ncols=True, desc=cfg.schedule)
        self.log = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self.tracker = Tracker(cfg, run_dir) if cfg.report_to else None
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
        if self.tracker:
            self.tracker.log(kind, rec)
        if self.plain:
            self.plain_line(kind, rec)
        if kind == "teacher_eval":
            self.summary["teacher_accuracy"] = rec
        elif kind == "checkpoint":
            self.summary["checkpoint"], self.summary["checkpoint_step"] = rec["path"], rec["step"]
        elif kind in ("step", "eval"):
            if kind == "eval":
                self.summary["evals"].append(rec)
            else:  # staleness: min, sum of batch means, max, batches
                self.summary["last_step"], old = rec, self.summary["stale"]
                self.summary["stale"] = [min(old[0], rec["stale_min"]), old[1] + rec["stale_mean"],
                                         max(old[2], rec["stale_max"]), old[3] + 1]
            evals = self.summary["evals"]
            last = self.summary["last_step"] or {"loss": 0, "stale_mean": 0, "tokens_per_s": 0}
            try:
                self.bar.update(int(kind == "step"))
                self.bar.set_postfix(loss=f"{last['loss']:.3f}", stale=f"{last['stale_mean']:.1f}",
                                     tok_s=f"{last['tokens_per_s']:.0f}",
                                     acc=f"{evals[-1]['accuracy']:.2f}" if evals else "-")
            except OSError:  # the terminal is gone (SIGHUP): the run goes on without a bar
                self.bar.disable = True

    def plain_line(self, kind, rec):
        """The console without a bar: a line per evaluation, and per log_every learner steps (and the last)."""
        if kind == "eval":
            say(f"eval  step {rec['step']}: held-out accuracy {accuracy_text(rec, self.cfg.eval_samples)}")
        elif kind == "step" and (rec["step"] % self.cfg.log_every == 0 or rec["step"] == self.cfg.steps):
            say(f"step  {rec['step']}/{self.cfg.steps}: loss {rec['loss']:.4f}  reverse KL {rec['rkl_token']:.4f}  "
                f"staleness {rec['stale_mean']:.2f}  {rec['tokens_per_s']:.0f} tokens/s  lr {rec['lr']:.3g}  "
                f"{rec['time'] - self.t0:.0f} s")

    def close(self) -> OSError | None:
        """Close the bar, the tracker and the files; the first error of a write (the trace's end, say) is returned,
        not raised."""
        errors = []
        closers = [self.bar.close, lambda: self.trace.write("]}\n"), self.trace.close, self.log.close]
        for close in closers + ([self.tracker.close] if self.tracker else []):
            try:
                close()
            except OSError as e:
                errors.append(e)
        return errors[0] if errors else None

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


class Tracker:
    """report_to: the metrics records, also sent to TensorBoard (run_dir/tensorboard/), Weights & Biases or trackio
    (project "asyncopd", this run's name; WANDB_MODE=offline keeps wandb local, trackio is local: its store is
    TRACKIO_DIR, by default ~/.cache/huggingface/trackio). The x axis is the learner step."""

    def __init__(self, cfg, run_dir):
        name, config = os.path.basename(run_dir), dataclasses.asdict(cfg)
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: optional
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        elif cfg.report_to == "wandb":
            import wandb  # optional
            self.writer = wandb.init(project="asyncopd", name=name, dir=run_dir, config=config)
        else:
            import trackio  # optional
            self.writer = trackio.init(project="asyncopd", name=name, config=config)

    def log(self, kind, rec):
        numbers = {f"{kind}/{k}": v for k, v in rec.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}
        if "step" not in rec or not numbers:  # (teacher_eval: one number, shown in the summary)
            return
        if hasattr(self.writer, "add_scalar"):
            for name, value in numbers.items():
                self.writer.add_scalar(name, value, rec["step"])
        else:
            self.writer.log(numbers, step=rec["step"])

    def close(self):
        (self.writer.close if hasattr(self.writer, "add_scalar") else self.writer.finish)()


def say(line: str, stream=None) -> None:
    """print, unless the terminal is gone (SIGHUP): the run folder keeps everything."""
    try:
        print(line, file=stream or sys.stdout, flush=True)
    except OSError:
        pass


def watch(cfg, ch, procs, run_dir, start_step):
    """Coordinator loop: log metrics, drive the progress bar, notice a failed role within a second, a hung one
    (no heartbeat) within its stall limit, a write of its own that fails (a full disk), and stop on SIGINT, SIGTERM or
    SIGHUP with a checkpoint (a second signal: the children are killed at once). However the loop ends, every child is
    reaped and a partial checkpoint folder removed before it returns the summary, or raises RuntimeError naming the
    failed role and the checkpoint to resume from."""
    try:
        w, error = Watch(cfg, run_dir, start_step), None
    except OSError as e:
        end_children(ch, procs, [], quick=True)
        raise RuntimeError(f"coordinator failed: {filesystem.write_error(e, run_dir)}") from None
    learners = [p for r, p in procs.items() if r.startswith("learner")]
    with STOPS:  # (nested in the command line's: a signal during the report below is recorded, not fatal)
        stopping = STOPS.received
        try:
            while True:
                if ch.signal.value and not stopping:  # a child got the signal (or the whole group did)
                    stopping.append((ch.signal.value, time.time()))
                if stopping:
                    ch.stop.set()
                    if signal.SIGHUP in (s for s, _ in stopping):
                        w.bar.disable = True  # its terminal is likely gone
                # a repeat within 1 s is the same request: `timeout` signals the coordinator, then its whole group
                if len(stopping) > 1 and stopping[-1][1] - stopping[0][1] > 1.0:
                    w.summary["killed_by"] = stopping[-1][0]
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
                done = all(p.exitcode == 0 for p in procs.values()) or \
                    ((stopping or w.stalled) and all(p.exitcode is not None for p in learners))
                try:
                    w.take(*ch.metrics_q.get(timeout=0 if done else channels.POLL_S))
                    continue  # (done: the late records first: final eval, checkpoint)
                except queue.Empty:
                    if done:
                        break
        except OSError as e:  # a write of the coordinator's own failed: the run cannot be logged, stop it
            error = ("coordinator", filesystem.write_error(e, run_dir), traceback.format_exc())
        finally:
            end_children(ch, procs, [r for r, _ in w.stalled], quick=error is not None or bool(w.stalled)
                         or "killed_by" in w.summary)
            try:  # records the loop did not reach (killed at once: the checkpoint a learner finished)
                while True:
                    w.take(*ch.metrics_q.get_nowait())
            except (queue.Empty, OSError):
                pass
            closed = w.close()
            for tmp in glob.glob(os.path.join(run_dir, "ckpt_*.tmp-*")):  # a save cut short: never resumed from
                shutil.rmtree(tmp, ignore_errors=True)
        if closed and not error:
            error = ("coordinator", filesystem.write_error(closed, run_dir), "")
        if w.stalled:
            error = stall_error(cfg, w.stalled[0], w.summary)
        if error:
            role, msg, tb = error
            try:
                with open(os.path.join(run_dir, "error.log"), "w") as f:
                    f.write(f"{role}: {msg}\n{tb}")
            except OSError:  # (a full disk) the message is all there is
                tb = ""
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(run_dir, "error.log"))
            where = f" (traceback in {run_dir}/error.log)" if tb else ""
            raise RuntimeError(f"{role} failed: {msg}{where}" + ("" if w.stalled else resume_hint(w.summary)))
        w.summary["interrupted"] = stopping[0][0] if stopping else None
        try:
            plot_run(run_dir)
        except OSError as e:
            hint = resume_hint(w.summary)
            raise RuntimeError(f"coordinator failed: {filesystem.write_error(e, run_dir)}{hint}") from None
    return w.summary


def resume_hint(summary: dict) -> str:
    """'; resume with resume=CKPT' for the last finished checkpoint, or what to do without one."""
    ckpt = summary.get("checkpoint")
    if not ckpt:
        return "; no checkpoint was saved: rerun from the start"
    return f"; the last checkpoint is step {summary.get('checkpoint_step')}: resume with resume={ckpt}"


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
    ax[0, 1].errorbar([r["step"] for r in evals], [r["accuracy"] for r in evals], marker="o", capsize=3,
                      yerr=[r.get("accuracy_se", 0.0) for r in evals])  # (zero for greedy)
    ax[0, 1].set(xlabel="learner step", ylabel="held-out accuracy", title="student accuracy (+- standard error)",
                 ylim=(0, 1))
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


def accuracy_text(rec: dict, samples: int) -> str:
    """An evaluation record's accuracy: greedy '93.0%', or Avg@k with its standard error '91.2% +- 1.3 (Avg@32)'."""
    se = f" +- {100 * rec.get('accuracy_se', 0.0):.1f} (Avg@{samples})" if samples > 1 else ""
    return f"{100 * rec['accuracy']:.1f}%{se}"


def summary_table(cfg, s):
    last, evals, (low, total, high, n) = s["last_step"], s["evals"], s["stale"]
    fmt = lambda rec: "-" if rec is None else accuracy_text(rec, cfg.eval_samples)  # noqa: E731
    rows = [("schedule / estimator", f"{cfg.schedule} / {cfg.loss.name}"),
            ("teacher accuracy", fmt(s["teacher_accuracy"])),
            ("student accuracy before", fmt(evals[0] if evals else None)),
            ("student accuracy after", fmt(evals[-1] if len(evals) > 1 else None)),
            ("learner steps", f"{last['step'] if last else 0}"),
            ("trained tokens / s", f"{last['tokens_per_s']:.0f}" if last else "-"),
            ("staleness min / mean / max", f"{low:.0f} / {total / n:.2f} / {high:.0f}" if n else "-"),
            ("run folder", s["run_dir"] + "  (metrics.jsonl, plots.png, trace.json, ckpt_*)")]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
