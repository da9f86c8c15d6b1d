"""Everything that can be wrong with a run's input, checked before any process starts: each problem is refused in one
line that names it and the fix. A check that needs a module's knowledge lives in that module
(estimators.validate_options, rollout.check_engine, runtime/checkpoint.check_resume, optional/offline.check_cache,
task.prepare_prompts); this file calls them in order and adds the checks of the config's values, files, folders,
devices and models. You need not read it to learn OPD.
"""
import dataclasses
import math
import os
import tempfile

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

import estimators
import rollout
import task
import teacher_cache
from config import Config, resolve_transport, role_devices, start_method
from optional import offline
from runtime import checkpoint

# Per-key ranges, checked first by check_values(): (keys, predicate, the fix). Every float must also be finite.
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


def check_inputs(cfg: Config, precompute: bool = False) -> tuple[PreTrainedTokenizerBase, list[dict], list[dict]]:
    """Everything that can be wrong with the input of a run (precompute=True: of `asyncopd.py precompute`, which
    writes cache_dir instead of a run folder and scores with the teacher as an online run does). Fills the derived
    defaults (rollout_batch_size, queue_size). Returns (tokenizer, train prompts, eval prompts), so that nothing is
    loaded twice."""
    check_values(cfg)
    if precompute:
        if not cfg.cache_dir:
            raise ValueError("precompute needs cache_dir=PATH (where the chunks go)")
        writable(cfg.cache_dir, "cache_dir")
        if cfg.engine == "vllm" and cfg.rollout_devices[0] not in ("cuda", "cuda:0", "cpu"):
            raise ValueError(f"precompute with engine=vllm runs vLLM in this process, which takes the first visible "
                             f"GPU, not {cfg.rollout_devices[0]}: set rollout_devices=[cuda:0] or CUDA_VISIBLE_DEVICES")
    else:
        writable(cfg.out_dir, "out_dir")
        if cfg.run_name and os.path.exists(os.path.join(cfg.out_dir, cfg.run_name)):  # would mix two runs' metrics
            raise ValueError(f"run_name={cfg.run_name}: {os.path.join(cfg.out_dir, cfg.run_name)} exists (resume "
                             "writes a new run folder too): choose another run_name, or delete that folder")
    if cfg.resume and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise ValueError(f"resume={cfg.resume}: no trainer_state.json there; give a checkpoint folder of a run")
    checkpoint.check_resume(cfg)
    for d in role_devices(cfg):
        _check_device(d, "device")
    if len({d.startswith("cuda") for d in cfg.learner_devices}) > 1:
        raise ValueError(f"learner_devices={cfg.learner_devices} mixes cpu and cuda: use one kind")
    tok = check_models(cfg, online=precompute or cfg.schedule != "offline")
    return (tok, *task.prepare_prompts(cfg, tok))


def check_values(cfg: Config) -> None:
    """Ranges, choices and the relations between keys, the loss options included; fills rollout_batch_size and
    queue_size when 0. One-line ValueErrors."""
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
    estimators.validate_options(cfg.loss)
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


def writable(path: str, key: str) -> None:
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


def _causal_lm(conf, what, path):
    """The transformers class that will load this model (an unknown architecture fails here, not in a child).
    Resolving it imports its modelling code, which forked children then inherit."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(conf)]
    except KeyError:
        raise ValueError(f"{what} {path}: model type {conf.model_type!r} is not a causal LM this transformers "
                         "loads: use a causal LM checkpoint (e.g. Qwen2/Qwen3/Llama)") from None


def check_models(cfg: Config, online: bool = True) -> PreTrainedTokenizerBase:
    """Student and teacher load and agree (vocabulary, tokenizer); the engine (online) or the cache (offline) can
    serve the estimator. Returns the student's tokenizer."""
    student_dir = _model_dir(cfg.resume or cfg.student, "student")
    s_conf, tok = _load(AutoConfig, student_dir, "student"), _load(AutoTokenizer, student_dir, "student")
    _causal_lm(s_conf, "student", student_dir)
    fields = estimators.required_fields(cfg.loss)
    if not online:
        offline.check_cache(cfg, student_dir, tok, fields)
    else:
        rollout.check_engine(cfg.engine, fields, mc_samples=cfg.loss.samples, temperature=cfg.temperature,
                             top_p=cfg.top_p, devices=cfg.rollout_devices)
        t_conf = _load(AutoConfig, _model_dir(cfg.teacher, "teacher"), "teacher")
        _causal_lm(t_conf, "teacher", cfg.teacher)
        if t_conf.vocab_size != s_conf.vocab_size:
            raise ValueError(f"vocabulary size mismatch: student {s_conf.vocab_size} vs teacher {t_conf.vocab_size}: "
                             "use a teacher with the student's tokenizer and embedding size")
        t_tok = _load(AutoTokenizer, cfg.teacher, "teacher")
        if teacher_cache.tokenizer_fingerprint(t_tok) != teacher_cache.tokenizer_fingerprint(tok):
            raise ValueError(f"tokenizer mismatch: student {student_dir} ({len(tok)} tokens) vs teacher {cfg.teacher} "
                             f"({len(t_tok)} tokens): OPD needs one tokenizer")
    if "teacher_dense_logp" in fields and s_conf.vocab_size > estimators.MAX_DENSE_VOCAB:
        raise ValueError(f"estimator {cfg.loss.name} needs the dense teacher distribution, too big at "
                         f"V={s_conf.vocab_size}: use forward_kl_topk, reverse_kl_mc or jsd on a finite support")
    return tok
