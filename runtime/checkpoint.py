"""Durable checkpoints: a run folder's ckpt_NNNNN/ (the student in Hugging Face format, the optimizer, the RNG state,
trainer_state.json), written whole or not at all, and checked on resume before any process starts. You need not read
this to learn OPD.
"""
import dataclasses
import functools
import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from config import Config
from estimators import LossOptions
from learner import Learner, StudentForLoss
from optional import offline
from runtime import filesystem


def full_state_dict(student: StudentForLoss) -> dict[str, torch.Tensor]:
    """All ranks must call (it all-gathers); rank 0 gets CPU tensors with HF key names."""
    sd = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def resume_point(cfg: Config) -> tuple[str, int, int]:
    """(weights folder, learner step, policy version) a run starts from: the student at 0, or the checkpoint."""
    if not cfg.resume:
        return cfg.student, 0, 0
    with open(os.path.join(cfg.resume, "trainer_state.json")) as f:
        state = json.load(f)
    return cfg.resume, state["step"], state["version"]


def save(ln: Learner, step: int, start_dir: str, run_dir: str) -> str | None:
    """All ranks call (collectives); rank 0 writes run_dir/ckpt_NNNNN into a temp folder, with a manifest.json
    (sha256 of every file) written last, then renames it: a crash never leaves a folder that looks finished.
    Returns the folder on rank 0."""
    cfg, student = ln.cfg, ln.student
    sd = full_state_dict(student)
    osd = get_optimizer_state_dict(student, ln.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ln.rank != 0:
        return None
    path = os.path.join(run_dir, f"ckpt_{step:05d}")
    if cfg.resume and os.path.realpath(path) == os.path.realpath(cfg.resume):  # stopped at once, resumed in place
        return path  # never rewrite the checkpoint the run started from (the rollout may be reading it)
    tensors = [*sd.values(), *(t for t in _leaves(osd) if isinstance(t, torch.Tensor))]
    needed = sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)
    if shutil.disk_usage(run_dir).free < needed:  # refuse before writing: no half-written folder
        raise filesystem.DiskFull(path, needed)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write(ln, sd, osd, step, start_dir, tmp)
    except Exception as e:
        full = filesystem.is_full(e) or shutil.disk_usage(run_dir).free < needed  # (torch.save does not say why)
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder is never left, never counted
        if full:
            raise filesystem.DiskFull(path, needed) from e
        raise
    if os.path.isdir(path):  # a folder of an earlier run under this run_name: swap it out, then delete it
        os.replace(path, f"{tmp}.old")
    os.replace(tmp, path)
    shutil.rmtree(f"{tmp}.old", ignore_errors=True)
    _fsync(run_dir)  # the rename itself is durable
    return path


def _leaves(tree):
    """The leaves of nested dicts and lists (an optimizer state dict)."""
    if isinstance(tree, (dict, list, tuple)):
        for v in tree.values() if isinstance(tree, dict) else tree:
            yield from _leaves(v)
    else:
        yield tree


def _write(ln, sd, osd, step, start_dir, tmp):
    """The checkpoint's files into the folder tmp, manifest.json last."""
    cfg, student = ln.cfg, ln.student
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(start_dir):  # config, tokenizer, generation config
        if os.path.isfile(os.path.join(start_dir, name)) and not name.endswith((".safetensors", ".pt")) \
                and name not in ("trainer_state.json", "manifest.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(start_dir, name), tmp)
    if student.model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    torch.save({"optimizer": osd, "rng": torch.get_rng_state()}, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "version": step * cfg.mini_batches, "config": dataclasses.asdict(cfg),
                   "teacher_fingerprint": teacher_fingerprint(cfg), "lr_schedule": ln.lr_schedule.state_dict()}, f,
                  indent=1)
    write_manifest(tmp)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str) -> None:
    """folder/manifest.json = sha256 of every file in it, after fsyncing each (the manifest is written last)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        if name != "manifest.json":
            _fsync(os.path.join(folder, name))
            files[name] = _sha256(os.path.join(folder, name))
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# Keys a resumed run may change: how long it runs, evaluation, save cadence, logging, where the processes sit, and
# performance knobs that leave the numbers alone. Every other key (loss.* too) defines the run, so a resume that
# changes it is refused (check_resume): the teacher by the fingerprint of its files, learner_devices by its count.
MAY_CHANGE = {
    "steps",  # how long
    "eval_data", "eval_size", "eval_every", "eval_teacher", "save_every",  # evaluation and checkpoints
    "out_dir", "run_name", "resume", "progress",  # where it writes, logging
    "threads", "start_method", "rollout_devices", "teacher_device", "engine",  # where the processes sit
    "teacher_engine", "teacher_tensor_parallel", "teacher_url", "teacher_timeout_s",
    "queue_size", "weight_transport", "activation_checkpointing", "micro_batch_tokens", "teacher_batch_tokens",
    "dist_timeout_s", "stall_timeout_s", "gpu_memory_utilization", "loss.chunk_size",  # performance and limits
    "max_prompt_len", "precompute_prompts", "chunk_prompts", "allow_teacher_mismatch",  # input checks, precompute
}
PATH_KEYS = {"student", "teacher", "data", "cache_dir"}  # compared as the folders or files they name


@functools.lru_cache(maxsize=None)  # hashing reads every byte of the weights: once per folder and process
def _fingerprint(path: str) -> str:
    return offline.fingerprint(path)


def teacher_fingerprint(cfg: Config) -> str | None:
    """The teacher's identity: optional.offline.fingerprint of its folder (config, weights, tokenizer); None for
    schedule=offline, which has no teacher (its cache records the one that scored it)."""
    return None if cfg.schedule == "offline" else _fingerprint(os.path.realpath(cfg.teacher))


def _flat(config: dict) -> dict:
    """Config keys (loss.* dotted) -> values, a key the dict lacks (an older checkpoint's) at its default."""
    config, default = config if isinstance(config, dict) else {}, Config()
    loss = config.get("loss") if isinstance(config.get("loss"), dict) else {}
    out = {f.name: config.get(f.name, getattr(default, f.name)) for f in dataclasses.fields(Config) if f.name != "loss"}
    if "chat_template" in config and "student_template" not in config:  # before the two: one switch for both models
        out["student_template"] = out["teacher_template"] = "chat" if config["chat_template"] else "raw"
    return out | {f"loss.{f.name}": loss.get(f.name, f.default) for f in dataclasses.fields(LossOptions)}


def resume_diff(cfg: Config, state: dict) -> list[str]:
    """'key old -> new' for every key outside MAY_CHANGE where this config differs from the checkpoint's run."""
    old, new, diff = _flat(state.get("config")), _flat(dataclasses.asdict(cfg)), []
    keys = [k for k in new if k not in MAY_CHANGE or (k == "steps" and new["lr_schedule"] != "constant")]
    for key in keys:  # (steps sets the horizon of a decaying lr: it may change only under a constant one)
        a, b, label, same = old[key], new[key], key, old[key] == new[key]
        if key == "teacher" and "teacher_fingerprint" in state:  # the same weights elsewhere are the same teacher
            a, b, label = state["teacher_fingerprint"], teacher_fingerprint(cfg), "teacher (fingerprint)"
            same = a == b
        elif key == "learner_devices":  # the devices may move; the world size decides the shards
            a, b, label = len(a) if isinstance(a, list) else a, len(b), "learner ranks"
            same = a == b
        elif key in PATH_KEYS and isinstance(a, str) and a and b:  # ./models/x is models/x
            same = os.path.realpath(a) == os.path.realpath(b)
        if not same:
            diff.append(f"{label} {a!r} -> {b!r}")
    return diff


def check_resume(cfg: Config) -> None:
    """resume=DIR, before any process starts: every file matches the manifest, and trainer_state.json fits this
    config (the run's defining keys unchanged, see MAY_CHANGE; version = step * mini_batches; steps beyond the
    checkpoint). One-line errors."""
    if not cfg.resume:
        return
    try:
        with open(os.path.join(cfg.resume, "manifest.json")) as f:
            files = dict(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"resume={cfg.resume}: no readable manifest.json ({type(e).__name__}), so the checkpoint is "
                         "unfinished or damaged: resume from another ckpt_* folder") from None
    for name in sorted(set(files) | {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"}):
        path = os.path.join(cfg.resume, name)  # hashing reads every byte: a few seconds per GB
        problem = "missing" if not os.path.isfile(path) else "not in manifest.json" if name not in files \
            else "damaged (sha256 differs from manifest.json)" if _sha256(path) != files[name] else None
        if problem:
            raise ValueError(f"resume: {path} is {problem}: resume from another ckpt_* folder")
    with open(os.path.join(cfg.resume, "trainer_state.json")) as f:
        state = json.load(f)
    state = state if isinstance(state, dict) else {}
    step, version = state.get("step"), state.get("version")
    where = f"resume: {cfg.resume}/trainer_state.json"
    if not isinstance(step, int) or not isinstance(version, int) or step < 0:
        raise ValueError(f"{where} has step={step!r} version={version!r}: not a checkpoint of asyncopd")
    diff = resume_diff(cfg, state)
    if diff:
        raise ValueError(f"resume: this run differs from the checkpoint's in {', '.join(diff)}: drop those keys to "
                         f"continue the run, or start a new run from the checkpoint with student={cfg.resume} "
                         "(no resume)")
    if version != step * cfg.mini_batches:
        raise ValueError(f"{where} has version {version} but step {step} * mini_batches {cfg.mini_batches} = "
                         f"{step * cfg.mini_batches}: the file was edited; resume from another ckpt_* folder")
    if cfg.steps <= step:
        raise ValueError(f"resume: steps={cfg.steps} is not above the checkpoint's step {step}: raise steps")


def load_optimizer(ln: Learner, resume: str) -> None:
    """The optimizer state (broadcast from rank 0), the lr schedule's position (every rank) and (rank 0) the RNG
    state of checkpoint `resume`."""
    state = torch.load(os.path.join(resume, "optimizer.pt"), weights_only=False) if ln.rank == 0 else {"optimizer": {}}
    set_optimizer_state_dict(ln.student, ln.opt, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with open(os.path.join(resume, "trainer_state.json")) as f:
        schedule = json.load(f).get("lr_schedule")
    if schedule:  # (older checkpoints: a constant lr, whose schedule has no position to restore)
        ln.lr_schedule.load_state_dict(schedule)
    if ln.rank == 0:
        torch.set_rng_state(state["rng"])
