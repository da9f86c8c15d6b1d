"""Everything that can be wrong with a run's input, checked before any process starts: each problem is refused in one
line that names it and the fix. A check that needs a module's knowledge lives in that module
(estimators.validate_options, rollout.check_engine, runtime/checkpoint.check_resume, optional/offline.check_cache,
runtime/prompt_checks.py for the prompts as each model renders them); this file calls them in order and adds the checks
of the config's values, files, folders, devices, models (their safetensors headers) and sizes (cores, shared memory,
open files, path lengths). You need not read it to learn OPD.
"""
import dataclasses
import importlib.util
import json
import math
import os
import resource
import shutil
import tempfile
import time

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

import estimators
import rollout
import task
import teacher_cache
from batch_format import FIELD_SPECS
from config import Config, resolve_transport, role_devices, start_method, training_dtype
from optional import math_data, offline, vllm_teacher
from runtime import checkpoint, filesystem
from runtime.prompt_checks import check_prompts, check_template

# Per-key ranges, checked first by check_values(): (keys, predicate, the fix). Every float must also be finite.
RANGES = [
    ("steps batch_size mini_batches eval_every max_prompt_len max_new_tokens threads precompute_prompts chunk_prompts "
     "dist_timeout_s teacher_tensor_parallel",
     lambda v: v >= 1, "must be >= 1"),
    ("eval_size queue_size save_every rollout_batch_size step_off max_staleness micro_batch_tokens "
     "teacher_batch_tokens warmup_steps",
     lambda v: v >= 0, "is negative: must be >= 0 (see --help for what 0 means)"),
    ("dist_timeout_s", lambda v: v <= 7 * 86400, "is more than a week (604800 s): a collective waiting that long is "
     "hung (and datetime.timedelta overflows for huge values); lower it"),
    ("lr stall_timeout_s teacher_timeout_s", lambda v: v > 0, "must be > 0"),
    ("weight_decay grad_clip min_lr", lambda v: v >= 0, "must be >= 0"),
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
CHOICES = {"schedule": ("sync", "step_off", "async", "offline"), "lr_schedule": ("constant", "cosine", "linear"),
           "teacher_dtype": ("auto", "bfloat16", "float32"), "report_to": ("", "tensorboard", "wandb", "trackio"),
           "weight_transport": ("auto", "shared", "handoff"), "start_method": ("auto", "fork", "spawn"),
           "student_template": tuple(task.TEMPLATES), "teacher_template": tuple(task.TEMPLATES),
           "teacher_engine": ("hf", "vllm")}
# Keys only some schedules read ("precompute": the `asyncopd.py precompute` command): set to anything but the default
# on another schedule they would be ignored without a word, so they are refused.
SCHEDULE_KEYS = {"cache_dir": ("offline", "precompute"), "allow_teacher_mismatch": ("offline",),
                 "precompute_prompts": ("offline", "precompute"), "chunk_prompts": ("offline", "precompute"),
                 "step_off": ("step_off",), "max_staleness": ("async",)}
# Every field of a scored rollout unit whatever the estimator (batch_format.pack_trajectory, the engines' token_ids and
# behavior_logp, teacher_cache.score_unit's teacher_logp); the estimator adds its own (unit_fields).
UNIT_CORE = ("prompt_ids", "prompt_cu_seqlens", "cu_seqlens", "finished", "prompt_index", "token_ids", "behavior_logp",
             "policy_version", "loss_mask", "teacher_logp")
FD_RESERVE = 256  # open files each process keeps for itself (libraries, sockets, model files, logs); 1/4 below 1024
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_inputs(cfg: Config, precompute: bool = False) -> tuple[PreTrainedTokenizerBase, list[dict], list[dict]]:
    """Everything that can be wrong with the input of a run (precompute=True: of `asyncopd.py precompute`, which
    writes cache_dir instead of a run folder and scores with the teacher as an online run does). Fills the derived
    defaults (rollout_batch_size, queue_size). Returns (tokenizer, train prompts, eval prompts), so that nothing is
    loaded twice."""
    check_values(cfg, precompute)
    if precompute:
        if not cfg.cache_dir:
            raise ValueError("precompute needs cache_dir=PATH (where the chunks go)")
        writable(cfg.cache_dir, "cache_dir")
        fits(cfg.cache_dir, "cache_dir", [], f"chunk_00000.safetensors.tmp-{_PID}")
        if cfg.teacher_engine != "hf":  # optional/offline.py reads the teacher's config from the HF model
            raise ValueError("precompute scores with the HF teacher: set teacher_engine=hf")
        if cfg.engine == "vllm" and cfg.rollout_devices[0] not in ("cuda", "cuda:0", "cpu"):
            raise ValueError(f"precompute with engine=vllm runs vLLM in this process, which takes the first visible "
                             f"GPU, not {cfg.rollout_devices[0]}: set rollout_devices=[cuda:0] or CUDA_VISIBLE_DEVICES")
    else:
        writable(cfg.out_dir, "out_dir")
        if cfg.run_name and os.path.exists(os.path.join(cfg.out_dir, cfg.run_name)):  # would mix two runs' metrics
            raise ValueError(f"run_name={cfg.run_name}: {os.path.join(cfg.out_dir, cfg.run_name)} exists (resume "
                             "writes a new run folder too): choose another run_name, or delete that folder")
        check_run_paths(cfg)
    if cfg.resume and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.json")):
        raise ValueError(f"resume={cfg.resume}: no trainer_state.json there; give a checkpoint folder of a run")
    online = precompute or cfg.schedule != "offline"
    if cfg.resume and online:  # check_resume compares the teacher by the fingerprint of its files
        check_model_files(cfg.teacher, "teacher")
    checkpoint.check_resume(cfg)
    for d in role_devices(cfg):
        _check_device(d, "device")
    if len({d.startswith("cuda") for d in cfg.learner_devices}) > 1:
        raise ValueError(f"learner_devices={cfg.learner_devices} mixes cpu and cuda: use one kind")
    tok, teacher_tok = check_models(cfg, online=online)
    source = cfg.eval_data or cfg.data
    if source == "addition" and cfg.eval_size > task.DEFAULT_LIMIT["test"]:  # the split is drawn until it has them
        raise ValueError(f"eval_size={cfg.eval_size} is more than the {task.DEFAULT_LIMIT['test']} held-out problems "
                         f"of the addition task: set eval_size<={task.DEFAULT_LIMIT['test']} (0 = no evaluation)")
    if {cfg.data, cfg.eval_data} - {"addition", ""}:  # a real data set: its answers are graded by math-verify
        math_data.check_grader()
    train, evals = task.prepare_prompts(cfg, tok, teacher_tok)
    for rows, where in ((train, cfg.data), (evals, source)):
        check_prompts(cfg, rows, where, {"ids": tok, "teacher_ids": teacher_tok})
    if len(train) < cfg.rollout_batch_size:
        raise ValueError(f"{cfg.data} has {len(train)} prompts, fewer than one rollout unit ({cfg.rollout_batch_size})")
    if len(evals) < cfg.eval_size:  # read_rows gives what there is: the run would evaluate fewer without a word
        raise ValueError(f"eval_size={cfg.eval_size} but {source} has only {len(evals)} held-out prompts: set "
                         f"eval_size<={len(evals)} (0 = no evaluation), or give eval_data with more")
    if not precompute and cfg.schedule != "offline":  # only online runs pass units between processes
        check_memory(cfg, train)
    return tok, train, evals


def check_values(cfg: Config, precompute: bool = False) -> None:
    """Ranges, choices and the relations between keys, the loss options included; fills rollout_batch_size and
    queue_size when 0. One-line ValueErrors. precompute: for `asyncopd.py precompute` (see SCHEDULE_KEYS)."""
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
            shown = ", ".join(a or "''" for a in allowed)
            raise ValueError(f"{key}={getattr(cfg, key)!r}: use one of {shown}")
    estimators.validate_options(cfg.loss)
    if cfg.report_to and importlib.util.find_spec(cfg.report_to) is None:  # optional: refused here, not at start
        raise ValueError(f"report_to={cfg.report_to} needs the {cfg.report_to} package: .venv/bin/python -m pip "
                         f"install {cfg.report_to} (or leave report_to empty: metrics.jsonl has every record)")
    if cfg.eval_samples < 1 or (cfg.eval_samples > 1 and cfg.eval_temperature == 0) or \
            cfg.eval_temperature not in (0, cfg.temperature):  # the rollout engine evaluates, at its temperature
        raise ValueError(f"eval_samples={cfg.eval_samples} eval_temperature={cfg.eval_temperature}: use 1 and 0 "
                         f"(greedy), or k samples at the rollout's temperature={cfg.temperature} (Avg@k)")
    if "{problem}" not in cfg.prompt_template:
        raise ValueError(f"prompt_template={cfg.prompt_template[:60]!r} has no {{problem}}: write where it goes")
    if cfg.prompt_template != Config.prompt_template and not {cfg.data, cfg.eval_data} - {"addition", ""}:
        raise ValueError("prompt_template is read for real data sets only; the addition task has its own prompts: "
                         "drop prompt_template, or set data to a .jsonl/.parquet file")
    if cfg.min_lr > cfg.lr or cfg.warmup_steps > cfg.steps * cfg.mini_batches:
        raise ValueError(f"min_lr={cfg.min_lr} must be <= lr={cfg.lr}, and warmup_steps={cfg.warmup_steps} <= the "
                         f"run's optimizer steps (steps*mini_batches={cfg.steps * cfg.mini_batches})")
    default, modes = Config(), {cfg.schedule} | ({"precompute"} if precompute else set())
    for key, users in SCHEDULE_KEYS.items():
        if getattr(cfg, key) != getattr(default, key) and not modes & set(users):
            where = " and ".join("`asyncopd.py precompute`" if u == "precompute" else f"schedule={u}" for u in users)
            this = "`asyncopd.py precompute`" if precompute else f"schedule={cfg.schedule}"
            raise ValueError(f"{key}={getattr(cfg, key)!r} is read only by {where}; this run is {this} and would "
                             f"ignore it: drop {key}, or set schedule={users[0]}")
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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cfg.threads > cores:  # more only oversubscribes (and a huge count floods the console with OpenMP errors)
        raise ValueError(f"threads={cfg.threads} is more than the {cores} cores this process may use "
                         f"(os.sched_getaffinity): set threads<={cores}")
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


def _pid_max() -> str:
    """The longest process id, for the temp names a run writes (ckpt_NNNNN.tmp-PID)."""
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return "9" * len(f.read().strip())
    except OSError:
        return "9" * 7  # Linux's largest pid_max, 4194304


_PID = _pid_max()


def fits(folder: str, key: str, names: list[tuple[str, str]], tail: str) -> None:
    """folder/names.../tail, the longest path a run writes under `key`, fits the file system that will hold it: each
    name <= NAME_MAX bytes and the whole path < PATH_MAX (names: (key, folder) the run creates, e.g. run_name)."""
    parent = folder = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    name_max, path_max = os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX")
    created = os.path.relpath(folder, parent).split(os.sep) if parent != folder else []  # folders makedirs will add
    for part, owner in [(p, key) for p in created] + [(n, k) for k, n in names]:
        if len(part.encode()) > name_max:
            raise ValueError(f"{owner}: the name {part[:40]!r}... is {len(part.encode())} bytes, more than the "
                             f"{name_max} (NAME_MAX) a file name may have on the file system of {parent}: shorten it")
    path = os.path.join(folder, *(n for _, n in names), tail)
    if len(path.encode()) >= path_max:
        keys = " or ".join([key] + [k for k, _ in names if k != key])
        raise ValueError(f"{keys}: the run would write paths of {len(path.encode())} bytes ({key}/.../"
                         f"{os.path.basename(tail)}), more than PATH_MAX={path_max} allows on the file system of "
                         f"{parent}: give a shorter {keys}")


def check_run_paths(cfg: Config) -> None:
    """out_dir/run_name and the longest path a run writes there (a checkpoint's swapped-out copy,
    out_dir/run_name/ckpt_NNNNN.tmp-PID.old/FILE) fit the file system (see fits)."""
    name = cfg.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.schedule}-{cfg.loss.name}-999"  # make_run_dir's
    start = cfg.resume or cfg.student
    files = ["model.safetensors", "optimizer.pt", "trainer_state.json", "manifest.json"]
    files += os.listdir(start) if os.path.isdir(start) else []  # checkpoint.save copies the model folder's files
    tail = os.path.join(f"ckpt_{cfg.steps:05d}.tmp-{_PID}.old", max(files, key=lambda n: len(n.encode())))
    fits(cfg.out_dir, "out_dir", [("run_name", name)], tail)


def _check_device(dev, what):
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={dev} but CUDA is not available: use cpu or run on a GPU machine")
        idx = int(dev.split(":")[1]) if ":" in dev else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"{what}={dev} but only {torch.cuda.device_count()} GPUs are visible")
    elif dev != "cpu":
        raise ValueError(f"{what}={dev!r} is not a device: use cpu or cuda:N")


def check_model_files(path: str, what: str) -> list[dict]:
    """A model folder holds config.json, a tokenizer and whole safetensors weights: model.safetensors, or
    model.safetensors.index.json and every shard it names, each file as long as its header declares. Reads the
    headers only, never a weight. Returns the headers ({tensor name: dtype, shape, data_offsets})."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what} model not found: looked for {os.path.abspath(path)}/config.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        raise ValueError(f"{what} {path}: no tokenizer ({' or '.join(TOKENIZER_FILES)}): save one there "
                         "(tokenizer.save_pretrained) or copy the model folder whole")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        names = ["model.safetensors"]
    elif os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{what} {index}: not a readable index ({type(e).__name__}): copy or download the "
                             "model again") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(path, str(n)))]
        if missing or not names:
            raise ValueError(f"{what} {path}: {missing[:1] or 'no shard'} named by model.safetensors.index.json "
                             f"missing ({len(missing)} of {len(names)} shards): copy or download the model again")
    else:
        raise ValueError(f"{what} {path}: no model.safetensors (nor model.safetensors.index.json): save the weights "
                         "there with save_pretrained (safetensors), or copy the model folder whole")
    return [_safetensors_header(os.path.join(path, n), what) for n in names]


def _safetensors_header(path, what):
    """The file's JSON header (8-byte little-endian length, then the JSON); its size must be 8 + that length + the
    end of the last tensor's data, as safetensors lays it out."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        raw = f.read(n) if 0 < n <= min(size - 8, 100_000_000) else b""  # 100 MB: safetensors' own header limit
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(f"{what} {path}: not a safetensors file (its header is unreadable): the file is damaged; "
                         "copy or download the model again") from None
    if size != 8 + n + end:
        kind = "truncated" if size < 8 + n + end else "longer than its header says"
        raise ValueError(f"{what} {path}: {size} bytes but its header declares {8 + n + end}, so it is {kind}: copy "
                         "or download the model again")
    return header


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


def check_models(cfg: Config, online: bool = True) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase | None]:
    """Student and teacher load and agree (vocabulary, tokenizer; each can render its prompt template); the engine
    (online) or the cache (offline) can serve the estimator. Returns the student's and (online) the teacher's
    tokenizer."""
    student_dir = cfg.resume or cfg.student
    check_model_files(student_dir, "student")
    s_conf, tok = _load(AutoConfig, student_dir, "student"), _load(AutoTokenizer, student_dir, "student")
    _causal_lm(s_conf, "student", student_dir)
    check_template(tok, cfg.student_template, "student_template", student_dir)
    t_tok = None
    fields = estimators.required_fields(cfg.loss)
    read = {FIELD_SPECS[f]["width"] for f in fields if f in FIELD_SPECS}
    for key, width in (("teacher_topk", "K"), ("student_topk", "Ks")):  # top-K of V ids: at most V
        if width in read and getattr(cfg.loss, key) > s_conf.vocab_size:
            raise ValueError(f"loss.{key}={getattr(cfg.loss, key)} is more than the vocabulary ({s_conf.vocab_size} "
                             f"tokens, {student_dir}): {cfg.loss.name} takes the top loss.{key} of them; set "
                             f"loss.{key}<={s_conf.vocab_size}")
    if not online:
        offline.check_cache(cfg, student_dir, tok, fields)
    else:
        rollout.check_engine(cfg.engine, fields, mc_samples=cfg.loss.samples, temperature=cfg.temperature,
                             top_p=cfg.top_p, devices=cfg.rollout_devices)
        check_model_files(cfg.teacher, "teacher")
        t_conf = _load(AutoConfig, cfg.teacher, "teacher")
        _causal_lm(t_conf, "teacher", cfg.teacher)
        if t_conf.vocab_size != s_conf.vocab_size:
            raise ValueError(f"vocabulary size mismatch: student {s_conf.vocab_size} vs teacher {t_conf.vocab_size}: "
                             "use a teacher with the student's tokenizer and embedding size")
        t_tok = _load(AutoTokenizer, cfg.teacher, "teacher")
        if teacher_cache.tokenizer_fingerprint(t_tok) != teacher_cache.tokenizer_fingerprint(tok):
            raise ValueError(f"tokenizer mismatch: student {student_dir} ({len(tok)} tokens) vs teacher {cfg.teacher} "
                             f"({len(t_tok)} tokens): OPD needs one tokenizer")
        check_template(t_tok, cfg.teacher_template, "teacher_template", cfg.teacher)
        vllm_teacher.check_config(cfg, fields & teacher_cache.TEACHER_FIELDS | {"teacher_logp"}, t_conf.vocab_size)
    if "teacher_dense_logp" in fields and s_conf.vocab_size > estimators.MAX_DENSE_VOCAB:
        raise ValueError(f"estimator {cfg.loss.name} needs the dense teacher distribution, too big at "
                         f"V={s_conf.vocab_size}: use forward_kl_topk, reverse_kl_mc or jsd on a finite support")
    return tok, t_tok


def unit_fields(cfg: Config) -> set[str]:
    """The fields a scored rollout unit of this run carries: UNIT_CORE, what the estimator reads, and what the engine
    writes beside it (generate(student_topk=) writes ids and b, generate(mc_samples=) draws and b)."""
    need = estimators.needs(cfg.loss)
    return set(UNIT_CORE) | need.rollout | need.teacher | (
        {"student_topk_ids", "student_topk_behavior_logp"} if need.student_topk else set()) | (
        {"mc_ids", "mc_behavior_logp"} if need.mc_samples else set())


def _mem_available():
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_memory(cfg: Config, train: list[dict]) -> None:
    """The rollout units that can be in flight at once fit in shared memory and in the open-files limit. A unit crosses
    the torch.multiprocessing queues as shared-memory tensors, one file descriptor per tensor (file_descriptor
    sharing); worst case: rollout_batch_size sequences of the longest train prompt + max_new_tokens tokens. In flight:
    queue_size in each of the two queues, a batch in the learner, one in each rollout worker and in the teacher; plus
    the shared weight buffer (weight_transport=shared)."""
    fields, V = unit_fields(cfg), AutoConfig.from_pretrained(cfg.resume or cfg.student).vocab_size
    B, P, T = cfg.rollout_batch_size, max(len(r["ids"]) for r in train), cfg.max_new_tokens
    rows = {"P": B * P, "B": B, "B+1": B + 1, "N": B * T}
    width = {None: 1, "K": cfg.loss.teacher_topk, "Ks": cfg.loss.student_topk, "M": cfg.loss.samples,
             "Mt": cfg.loss.samples, "V": V}
    size = {f: rows[s["rows"]] * width[s["width"]] * s["dtype"].itemsize for f, s in FIELD_SPECS.items() if f in fields}
    per_batch, workers = cfg.batch_size // cfg.rollout_batch_size, len(cfg.rollout_devices)
    units = 2 * cfg.queue_size + per_batch + workers + 1
    weights = []  # the shared weight buffer: every tensor of the student, in the training dtype
    if resolve_transport(cfg) == "shared":
        weights = [math.prod(v["shape"]) for h in check_model_files(cfg.resume or cfg.student, "student")
                   for k, v in h.items() if k != "__metadata__"]
    big = max(size, key=size.get)  # the field to name, and the key that sets its width
    group = FIELD_SPECS[big]["width"]
    widths = {"K": "loss.teacher_topk, ", "Ks": "loss.student_topk, ", "M": "loss.samples, ", "Mt": "loss.samples, "}
    lower = "use an estimator without [N, V] fields, or lower " if group == "V" else f"lower {widths.get(group, '')}"
    flight = (f"{units} rollout units in flight (queue_size={cfg.queue_size} in each of 2 queues + a batch of "
              f"batch_size/rollout_batch_size={per_batch} in the learner + {workers + 1} in the rollout and teacher)")
    fix = "queue_size or batch_size/rollout_batch_size"
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    files, reserve = units * len(fields) + len(weights), min(FD_RESERVE, soft // 4)
    if torch.multiprocessing.get_sharing_strategy() == "file_descriptor" and soft != resource.RLIM_INFINITY \
            and files > soft - reserve:
        raise ValueError(f"open files: {flight} x {len(fields)} tensors each (+ {len(weights)} weight tensors) = "
                         f"{files} file descriptors (one per shared tensor), more than the open-files limit {soft} "
                         f"(ulimit -n) less {reserve} for the processes' own files: lower {fix}, or raise ulimit -n")
    unit = sum(size.values())
    total = units * unit + sum(weights) * training_dtype(cfg).itemsize
    shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None
    for free, where in ((shm, "free in /dev/shm"), (_mem_available(), "of MemAvailable")):
        if free is not None and total > free:
            human = filesystem.size
            raise ValueError(f"shared memory: {flight} x {human(unit)} each ({B} sequences x ({P} prompt + "
                             f"max_new_tokens={T}) tokens; largest field {big} [{rows[FIELD_SPECS[big]['rows']]} x "
                             f"{width[group]}]) = {human(total)} with the weights, more than the {human(free)} "
                             f"{where}: {lower}rollout_batch_size, max_new_tokens, {fix}")
