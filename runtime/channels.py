"""The channels between asyncopd's processes, and the blocking calls every role makes on them. You need not read this
to learn OPD: to the roles in asyncopd.py these calls are plain get, put and wait.

How one rollout unit (rollout_batch_size prompts) travels:

    rollout worker --rollout_q--> teacher --teacher_q--> learner rank 0 --shard_qs[r]--> learner rank r >= 1
          ^                                                   |
          +------ weights buffer + version, under lock -------+

A dict of CPU tensors put on a queue crosses through shared memory (torch.multiprocessing), not as a pickle
of its data. Every blocking call here polls: it beats the caller's heartbeat and gives up once `stop` is set,
so no role blocks forever on a peer that died.
"""
import ctypes
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event, Lock

import torch
import torch.multiprocessing as mp

ROLE = None  # this process's role name, set by coordinator.child_main: the heartbeat slot it beats in
POLL_S = 0.1  # how long one blocking call waits between checks of `stop`


@dataclass
class Channels:
    """Everything the processes share. Each field: producer -> consumer: what travels."""
    rollout_q: Queue  # rollout workers -> teacher: ({"unit": k, "gen_s": s}, trajectory)
    teacher_q: Queue  # teacher -> learner rank 0: ({"unit", "gen_s", "score_s"}, scored unit); offline: unused
    shard_qs: list[Queue | None]  # learner rank 0 -> rank r (entry r >= 1): its shard of each batch, or None to stop
    weights: dict[str, torch.Tensor] | None  # learner rank 0 -> rollout workers: the buffer in host shared memory
    #   (transport "shared"), HF names; None under "handoff" (weights_q) and offline
    weights_q: Queue  # learner rank 0 -> each rollout worker: its handle to a buffer on rank 0's device ("handoff")
    version: Synchronized  # learner rank 0 -> rollout workers: policy version of the weights now in the buffer
    lock: Lock  # the buffer: held by the learner while it writes, by a rollout worker while it reads
    released: Synchronized  # rollout workers -> learner rank 0: workers done with the buffer (its owner may then exit)
    metrics_q: Queue  # every role -> coordinator: (kind, record); kind: step, eval, teacher_eval, checkpoint, trace
    err_q: Queue  # every role -> coordinator: (role, error, traceback) of an exception
    beats: ctypes.Array  # every role -> coordinator: time of the role's last heartbeat, one slot per role (0: starting)
    signal: ctypes.c_int  # a child -> coordinator: the first SIGTERM/SIGINT a child received
    stop: Event  # coordinator (or a signalled child) -> every role: stop now; the learner checkpoints first
    learned: Event  # coordinator -> rollout, teacher: the learners finished, so senders of shared tensors may exit
    roles: list[str]  # role names, in the order of `beats`
    coordinator: int  # the coordinator's pid: a child that finds it gone exits at once
    threads: int  # torch CPU threads per process


def make_channels(cfg, roles: list[str], start_version: int, weights: dict | None, method: str) -> Channels:
    """The run's channels, from the context (fork or spawn, config.start_method) its children start with.
    weights: the shared buffer or None."""
    ctx = mp.get_context(method)
    return Channels(rollout_q=ctx.Queue(cfg.queue_size), teacher_q=ctx.Queue(cfg.queue_size),
                    shard_qs=[None] + [ctx.Queue(2) for _ in cfg.learner_devices[1:]], weights=weights,
                    weights_q=ctx.Queue(), version=ctx.Value("q", start_version), lock=ctx.Lock(),
                    released=ctx.Value("i", 0), metrics_q=ctx.Queue(), err_q=ctx.Queue(),
                    beats=ctx.Array("d", len(roles), lock=False), signal=ctx.Value("i", 0, lock=False),
                    stop=ctx.Event(), learned=ctx.Event(), roles=list(roles), coordinator=os.getpid(),
                    threads=cfg.threads)


def beat(ch):
    """Heartbeat: this role's main thread is alive and responsive (the coordinator watches the slot's age)."""
    if ROLE is not None:
        ch.beats[ch.roles.index(ROLE)] = time.time()


@contextmanager
def span(ch, role, name):
    """A busy stage of `role`, recorded for trace.json (the coordinator's stall limit grows with the longest)."""
    t0 = time.time()
    yield
    beat(ch)
    ch.metrics_q.put(("trace", {"role": role, "name": name, "t0": t0, "t1": time.time()}))


def wait_until(ch, ready):
    """Poll `ready()` until true; False if the run is stopping."""
    while not ready():
        beat(ch)
        if ch.stop.is_set():
            return False
        time.sleep(0.01)
    return True


def get(ch, q):
    """The next item of q, or None once the run is stopping."""
    while not ch.stop.is_set():
        beat(ch)
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            pass
        except (OSError, EOFError):  # the sender exited on the stop before its shared-memory tensors were received
            if not ch.stop.is_set():  # (refused, reset, or closed mid-handshake: EOFError)
                raise
    return None


def receive(ch, q):
    """The items of q, one per next(), None once the run is stopping. A background thread takes them off q:
    rebuilding a shared-memory tensor asks its sender for the file descriptor, so a stopped (hung) sender blocks
    q.get() whatever its timeout; the consumer waits on the thread's local queue and still sees `stop` (the
    learner then checkpoints). The thread's errors are raised in the consumer, unless the run is stopping."""
    local = queue.Queue()

    def pump():
        while not ch.stop.is_set():
            try:
                local.put(q.get(timeout=POLL_S))
            except queue.Empty:
                pass
            except Exception as e:  # handed over: raised by the consumer below
                local.put(e)
                return

    threading.Thread(target=pump, daemon=True, name="receive").start()  # daemon: may stay blocked at exit
    while True:
        item = get(ch, local)
        if isinstance(item, Exception):
            if not ch.stop.is_set():
                raise item
            item = None
        yield item


def put(ch, q, item):
    """Put item on q, waiting while it is full; drops it once the run is stopping."""
    while not ch.stop.is_set():
        beat(ch)
        try:
            return q.put(item, timeout=POLL_S)
        except queue.Full:
            pass


@contextmanager
def holding(ch, lock, take: bool = True):
    """`with holding(ch, lock, take) as held:` the lock taken (if take) while the body runs; held is False where it was
    not taken (take=False, or the run is stopping)."""
    held = take and acquire(ch, lock)
    try:
        yield held
    finally:
        if held:
            lock.release()


def acquire(ch, lock):
    """Take the weights lock, beating while waiting (a stopped peer may hold it: the coordinator then names the
    peer, not us); False once the run is stopping."""
    while not lock.acquire(timeout=POLL_S):
        beat(ch)
        if ch.stop.is_set():
            return False
    return True


def sync_devices(*devices):
    """Wait for queued copies on each CUDA device: copies across devices (and into a CUDA IPC buffer) are
    asynchronous, so a reader must not be told the weights are ready before this returns."""
    for d in {torch.device(d) for d in devices}:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def get_shard(ch, rank: int, timeout_s: float):
    """Ranks >= 1: their shard of the next batch from rank 0, or None (rank 0's stop marker). After a stop,
    rank 0's marker (or last shard) still comes, within a step, so that all ranks checkpoint together;
    none within timeout_s (dist_timeout_s) means rank 0 is gone."""
    stopped = None
    while True:
        try:
            beat(ch)
            return ch.shard_qs[rank].get(timeout=0.1)
        except queue.Empty:
            if ch.stop.is_set():
                stopped = stopped or time.time()
                if time.time() - stopped > timeout_s:
                    why = f"no batch or stop marker from rank 0 within dist_timeout_s={timeout_s} s of a stop"
                    raise RuntimeError(f"learner rank {rank}: {why}: see rank 0's error") from None


def hold_until_released(ch, workers, grace_s=10.0):
    """The buffer's owner stays alive until every rollout worker dropped its handle (CUDA IPC needs the producer
    alive while consumers hold it); once the run is stopping, a crashed worker is not waited for past grace_s."""
    deadline = None
    while ch.released.value < workers:
        beat(ch)
        if ch.stop.is_set():
            deadline = deadline or time.time() + grace_s
            if time.time() > deadline:
                return
        time.sleep(0.01)
