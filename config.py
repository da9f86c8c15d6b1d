"""Configuration: every key with its default and meaning (`python asyncopd.py --help` prints them), the strict
YAML loader, and validate(), which checks everything that can be wrong with the input before any process starts
and says what to fix in one line.
"""
import dataclasses
import difflib
import math
import os
import tempfile
from dataclasses import dataclass, field

import torch
import yaml

import estimators
import task
import teacher_cache
from estimators import LossOptions


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
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template (instruct models)
    max_prompt_len: int = 64  # prompts longer than this are refused before start
    max_new_tokens: int = 48  # response length limit (EOS included)
    # sampling (rollout)
    engine: str = "hf"  # rollout engine: "hf" (transformers, CPU or GPU) or "vllm" (GPU)
    temperature: float = 1.0  # sampling temperature; the student's s and b use the same one
    top_p: float = 1.0  # nucleus sampling; < 1 breaks the support assumption of IS estimators
    # devices (one node)
    rollout_devices: list = field(default_factory=lambda: ["cpu"])  # a rollout worker each, e.g. [cuda:0, cuda:1]
    teacher_device: str = "cpu"  # e.g. "cuda:4"
    teacher_dtype: str = "auto"  # "auto" (bfloat16 on cuda, float32 on cpu), "bfloat16", "float32"; precompute too
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
    lr: float = 1e-3  # AdamW learning rate (constant)
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
    progress: bool = True  # tqdm bar on the console


# Per-key ranges, checked first by validate(): (keys, predicate, the fix). Every float must also be finite.
RANGES = [
    ("steps batch_size mini_batches eval_every max_prompt_len max_new_tokens threads precompute_prompts chunk_prompts "
     "dist_timeout_s",
     lambda v: v >= 1, "must be >= 1"),
    ("eval_size queue_size save_every rollout_batch_size step_off max_staleness micro_batch_tokens "
     "teacher_batch_tokens",
     lambda v: v >= 0, "is negative: must be >= 0 (see --help for what 0 means)"),
    ("lr stall_timeout_s", lambda v: v > 0, "must be > 0"),
    ("weight_decay grad_clip", lambda v: v >= 0, "must be >= 0"),
    ("betas", lambda v: len(v) == 2 and all(type(b) in (int, float) and 0 <= b < 1 for b in v),
     "must be two numbers in [0, 1), e.g. [0.9, 0.999]"),
    ("rollout_devices learner_devices", lambda v: len(v) > 0 and all(isinstance(d, str) for d in v),
     "must be a non-empty list of devices, e.g. [cpu] or [cuda:0, cuda:1]"),
    ("seed", lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
    ("out_dir data", lambda v: v != "", "is empty: give a path"),
    ("run_name", lambda v: v == "" or (os.path.basename(v) == v and v not in (".", "..") and not {"\\", "\0"} & set(v)),
     "must be a plain folder name (no path separator, not . or ..): the run folder stays inside out_dir"),
]


# Keys with a fixed set of values, checked right after RANGES
CHOICES = {"schedule": ("sync", "step_off", "async", "offline"), "teacher_dtype": ("auto", "bfloat16", "float32"),
           "weight_transport": ("auto", "shared", "handoff"), "start_method": ("auto", "fork", "spawn")}


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
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        head, _, rest = str(key).partition(".")
        if head not in names:
            close = difflib.get_close_matches(head, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ValueError(f"unknown config key {prefix}{head}{hint}")
        current = getattr(obj, head)
        if dataclasses.is_dataclass(current):
            sub = {rest: value} if rest else value
            if not isinstance(sub, dict):
                raise ValueError(f"config key {prefix}{head} is a section: give {prefix}{head}.FIELD=VALUE")
            _apply(current, sub, prefix=f"{prefix}{head}.")
        else:
            if rest:
                raise ValueError(f"config key {prefix}{head} has no field {rest}")
            setattr(obj, head, _coerce(value, current, prefix + head))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice (PyYAML silently keeps the last one)."""
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key in (k for k, _ in node.value if isinstance(k, yaml.ScalarNode)):
            if key.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key.value!r}", key.start_mark)
            seen.add(key.value)
        return super().construct_mapping(node, deep)


def _yaml(text, where):
    """Parsed YAML, or one ValueError line naming where (and the line) instead of PyYAML's multi-line report."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        opened = f" ({e.context} at line {ctx.line + 1})" if ctx and e.context else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{where}{at}: {problem}{opened}: fix the YAML") from None


def load_config(path=None, overrides=()):
    """Defaults <- YAML file <- key=value overrides (dotted keys reach the loss section)."""
    cfg = Config()
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} not found: give an existing YAML file")
        with open(path, encoding="utf-8", errors="replace") as f:
            updates = _yaml(f.read(), f"config file {path}")
        if updates is None:  # an empty file is more likely a mistake than a wish for the defaults
            raise ValueError(f"config file {path} is empty: write key: value lines, or leave it out for the defaults")
        if not isinstance(updates, dict):
            kind = type(updates).__name__
            raise ValueError(f"config file {path} is a YAML {kind}, not a mapping: write key: value lines")
        _apply(cfg, updates)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value: write e.g. steps=10")
        _apply(cfg, {key: _yaml(value, f"override {item}") if value else ""})
    return cfg


def training_dtype(cfg):
    """The student's dtype outside the learner's fp32 master weights: published weights and the rollout model."""
    return torch.bfloat16 if cfg.mixed_precision else torch.float32


def teacher_dtype(cfg):
    """One teacher dtype for online scoring and offline precompute, so the two caches agree."""
    if cfg.teacher_dtype == "auto":
        return torch.bfloat16 if cfg.teacher_device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.teacher_dtype]


def load_teacher(cfg):
    """The frozen teacher as every scorer uses it (the teacher role and `precompute`)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=teacher_dtype(cfg))
    return model.to(cfg.teacher_device).eval()


def resolve_transport(cfg):
    """"shared", "handoff" or "none" (offline: no rollout). Handoff needs the rollout to see the learner's device,
    which a vLLM child (restricted to its own GPU) does not."""
    if cfg.schedule == "offline":
        return "none"
    if cfg.weight_transport != "auto":
        return cfg.weight_transport
    on_cuda = cfg.rollout_devices[0].startswith("cuda") and cfg.learner_devices[0].startswith("cuda")
    return "handoff" if cfg.engine == "hf" and on_cuda else "shared"


def visible_device(device, parent_visible):
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


def _check_device(dev, what):
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={dev} but CUDA is not available: use cpu or run on a GPU machine")
        idx = int(dev.split(":")[1]) if ":" in dev else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"{what}={dev} but only {torch.cuda.device_count()} GPUs are visible")
    elif dev != "cpu":
        raise ValueError(f"{what}={dev!r} is not a device: use cpu or cuda:N")


def _model_dir(path, what):
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what} model not found: looked for {os.path.abspath(path)}/config.json")
    return path


def _load(auto, path, what):
    """auto.from_pretrained(path), or one line naming the folder (a corrupt config.json or tokenizer.json)."""
    try:
        return auto.from_pretrained(path)
    except Exception as e:  # transformers and tokenizers raise many kinds
        why = " ".join(str(e).split())[:200]
        part = auto.__name__[4:].lower()  # AutoConfig -> config
        raise ValueError(f"{what} {path}: cannot load its {part} ({why}): fix or replace its files") from None


def writable(path, key):
    """`path` is a folder, or can be made one, that this user can write: tried by a probe folder in its nearest
    existing ancestor (os.access says yes to root on a read-only mount)."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{key}={path}: {parent} is a file, not a folder: give a folder path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".asyncopd-probe-", dir=parent))
    except OSError as e:
        raise ValueError(f"{key}={path}: cannot write in {parent} ({e.strerror}): give a writable folder") from None


def validate(cfg, run=True):
    """Everything that can be wrong with the input, checked before any process starts (run=False: no run folder,
    as for precompute). Fills the derived defaults (rollout_batch_size, queue_size).

    Returns (tokenizer, train prompts, eval prompts) so the checks are not done twice."""
    check_values(cfg)
    if run:
        writable(cfg.out_dir, "out_dir")
        if cfg.run_name and os.path.exists(os.path.join(cfg.out_dir, cfg.run_name)):  # would mix two runs' metrics
            raise ValueError(f"run_name={cfg.run_name}: {os.path.join(cfg.out_dir, cfg.run_name)} exists (resume "
                             "writes a new run folder too): choose another run_name, or delete that folder")
    if cfg.resume and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise ValueError(f"resume={cfg.resume}: no trainer_state.json there; give a checkpoint folder of a run")
    import learner
    learner.check_checkpoint(cfg)
    estimators.validate_options(cfg.loss)
    for d in role_devices(cfg):
        _check_device(d, "device")
    if len({d.startswith("cuda") for d in cfg.learner_devices}) > 1:
        raise ValueError(f"learner_devices={cfg.learner_devices} mixes cpu and cuda: use one kind")
    tok = check_models(cfg)
    return (tok, *load_prompts(cfg, tok))


def check_values(cfg):
    """Ranges and the relations between keys; fills rollout_batch_size and queue_size when 0."""
    for keys, ok, fix in RANGES:
        for key in keys.split():
            if not ok(getattr(cfg, key)):
                raise ValueError(f"{key}={getattr(cfg, key)!r} {fix}")
    for opts, prefix in ((cfg, ""), (cfg.loss, "loss.")):
        for f in dataclasses.fields(opts):
            if isinstance(getattr(opts, f.name), float) and not math.isfinite(getattr(opts, f.name)):
                raise ValueError(f"{prefix}{f.name}={getattr(opts, f.name)}: must be a finite number")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r}: use one of {', '.join(allowed)}")
    cfg.rollout_batch_size = cfg.rollout_batch_size or cfg.batch_size
    cfg.queue_size = cfg.queue_size or 2 * max(1, cfg.batch_size // cfg.rollout_batch_size)
    world = len(cfg.learner_devices)
    if cfg.batch_size % cfg.rollout_batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of rollout_batch_size="
                         f"{cfg.rollout_batch_size}")
    if cfg.batch_size % (cfg.mini_batches * world):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by mini_batches*learner ranks="
                         f"{cfg.mini_batches * world}")
    if cfg.schedule == "async" and cfg.max_staleness < cfg.mini_batches - 1:
        raise ValueError(f"max_staleness={cfg.max_staleness} < mini_batches-1={cfg.mini_batches - 1}: "
                         "the later mini-batches of a batch are that stale even in sync; raise max_staleness")
    if resolve_transport(cfg) == "handoff" and cfg.engine != "hf":
        raise ValueError(f"weight_transport=handoff needs engine=hf: a {cfg.engine} rollout sees only its own GPU, "
                         "so it cannot open a buffer on the learner's; use weight_transport=shared")
    if start_method(cfg) == "fork":
        if any(str(d).startswith("cuda") for d in role_devices(cfg)):
            raise ValueError("start_method=fork with a cuda device: CUDA cannot be used in a forked child; "
                             "use start_method=spawn (or auto)")
        if cfg.threads > 1:  # as torch's DataLoader workers: forked, one thread
            raise ValueError(f"start_method=fork with threads={cfg.threads}: a forked child may hang in OpenMP (its "
                             "thread pool does not survive a fork); use threads=1 or start_method=spawn (or auto)")
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={cfg.gpu_memory_utilization}: must be in (0, 1], e.g. 0.8")
    if not 0 < cfg.temperature <= 10 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"temperature={cfg.temperature} top_p={cfg.top_p}: need 0 < temperature and 0 < top_p <= 1")


def role_devices(cfg):
    """Every device a role of the run uses (rollout workers, teacher, learner ranks)."""
    return [*cfg.rollout_devices, cfg.teacher_device, *cfg.learner_devices]


def start_method(cfg):
    """How the coordinator starts its children (see the start_method key)."""
    if cfg.start_method != "auto":
        return cfg.start_method
    return "fork" if cfg.threads == 1 and all(str(d) == "cpu" for d in role_devices(cfg)) else "spawn"


def _causal_lm(conf, what, path):
    """The transformers class that will load this model (an unknown architecture fails here, not in a child).
    Resolving it imports its modelling code, which forked children then inherit."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(conf)]
    except KeyError:
        raise ValueError(f"{what} {path}: model type {conf.model_type!r} is not a causal LM this transformers "
                         "loads: use a causal LM checkpoint (e.g. Qwen2/Qwen3/Llama)") from None


def check_models(cfg):
    """Student and teacher load and agree (vocabulary, tokenizer); the engine and the cache can serve the
    estimator. Returns the student's tokenizer."""
    from transformers import AutoConfig, AutoTokenizer
    student_dir = _model_dir(cfg.resume or cfg.student, "student")
    s_conf, tok = _load(AutoConfig, student_dir, "student"), _load(AutoTokenizer, student_dir, "student")
    _causal_lm(s_conf, "student", student_dir)
    fields = estimators.required_fields(cfg.loss)
    if cfg.schedule == "offline":
        import offline
        offline.check_offline_cache(cfg, student_dir, tok, fields)
    else:
        import rollout
        rollout.engine_supports(cfg.engine, fields, cfg.loss.samples, cfg.temperature, cfg.top_p, cfg.rollout_devices)
        t_conf = _load(AutoConfig, _model_dir(cfg.teacher, "teacher"), "teacher")
        _causal_lm(t_conf, "teacher", cfg.teacher)
        if t_conf.vocab_size != s_conf.vocab_size:
            raise ValueError(f"vocabulary size mismatch: student {s_conf.vocab_size} vs teacher {t_conf.vocab_size}: "
                             "use a teacher with the student's tokenizer and embedding size")
        t_tok = _load(AutoTokenizer, cfg.teacher, "teacher")
        if teacher_cache.tokenizer_fingerprint(t_tok) != teacher_cache.tokenizer_fingerprint(tok):
            raise ValueError(f"tokenizer mismatch: student {student_dir} ({len(tok)} tokens) vs teacher {cfg.teacher} "
                             f"({len(t_tok)} tokens): OPD needs one tokenizer")
    if "teacher_dense_logp" in fields and s_conf.vocab_size > 65536:
        raise ValueError(f"estimator {cfg.loss.name} needs the dense teacher distribution, too big at "
                         f"V={s_conf.vocab_size}: use forward_kl_topk, reverse_kl_mc or jsd on a finite support")
    return tok


def _encode_batch(tok, texts):
    """Token ids of many texts in one call: 0.2 s for the 20k addition prompts, against 1.2 s row by row (the
    fast tokenizer's Rust backend directly; transformers' own batched call spends 0.5 s converting its output)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a tokenizer without a Rust backend
        return tok(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def load_prompts(cfg, tok):
    """Train and eval prompts, each row with its token ids ("ids"); a bad row is named by its number."""
    train = task.load_prompts(cfg.data, "train", None)
    evals = task.load_prompts(cfg.eval_data or cfg.data, "test", cfg.eval_size) if cfg.eval_size else []
    known = set()  # characters the tokenizer is known to represent
    for rows, where in ((train, cfg.data), (evals, cfg.eval_data or cfg.data)):
        batch = None if cfg.chat_template else _encode_batch(tok, [r["prompt"] for r in rows])
        for i, row in enumerate(rows):
            try:
                row["ids"] = task.encode_prompt(tok, row["prompt"], cfg.chat_template, known, cfg.max_prompt_len,
                                                batch[i] if batch else None)
            except ValueError as e:
                raise ValueError(f"{where} row {i + 1}: {e}") from None
    if len(train) < cfg.rollout_batch_size:
        raise ValueError(f"{cfg.data} has {len(train)} prompts, fewer than one rollout unit ({cfg.rollout_batch_size})")
    return train, evals


def config_help():
    """Every config key with its default and the comment written next to it in Config / LossOptions."""
    import inspect
    import re
    lines = ["usage: python asyncopd.py [train|precompute] [CONFIG.yaml] [key=value ...]   (loss keys: loss.KEY=VALUE)",
             "", "config keys (default  # meaning):"]
    for cls, prefix in ((Config, ""), (LossOptions, "loss.")):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s{4}(\w+): \w+ = (.*?)\s+#\s(.*)$", line)
            if m and m.group(1) != "loss":
                default = getattr(cls(), m.group(1))
                lines.append(f"  {prefix + m.group(1):<26} {default!r:<18} # {m.group(3)}")
            elif re.match(r"\s{4}#\s{3}", line):  # a comment continued on the next line
                lines[-1] += " " + line.strip()[1:].strip()
            elif re.match(r"\s{4}#\s\S", line):  # a section of keys
                lines.append(f" {line.strip()[2:]}:")
    return "\n".join(lines)
