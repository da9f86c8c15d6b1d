"""Offline OPD (Lightning OPD, arXiv 2604.13010): the teacher scores the SFT student's rollouts once, into a
cache on disk; the learner then trains from it with no rollout or teacher process.

    python asyncopd.py precompute configs/offline.yaml      # writes cache_dir/chunk_00000.safetensors, ...
    python asyncopd.py train configs/offline.yaml           # schedule: offline

The precompute loop is asyncopd.precompute; this file holds what it and the offline learner need around it.
The cache is batch_format.py's dict (scored by teacher_cache.py), chunk by chunk, each a safetensors file with a
sha256 over its tensors and meta; a chunk is written atomically, so an interrupted precompute resumes at the first
missing chunk. Training refuses a cache that does not fit the student (tokenizer, vocabulary, fields) or that was
scored by a teacher other than the one that made the student's SFT data ("teacher consistency").
"""
import contextlib
import hashlib
import json
import math
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

import estimators
import rollout
import schedule
import task
import teacher_cache
from batch_format import bytes_per_token, concat, select_sequences, validate_batch, widths
from config import Config
from runtime import coordinator

FORMAT_VERSION = 2  # 2: a sha256 over tensors and meta, and each chunk's sequence range
REQUIRED_META = ("teacher_fingerprint", "tokenizer_fingerprint", "vocab_size", "student_version")
PER_CHUNK_META = ("num_tokens", "num_sequences", "chunk_index", "first_sequence", "sha256")  # may differ between chunks
CHUNK_NAME = re.compile(r"^chunk_(\d{5})\.safetensors$")
PROMPT_KEYS = ("prompt_template", "student_template", "teacher_template")  # how the cached prompts were rendered


def checksum(cache, meta):
    """sha256 (hex) over the meta (as json, without its own sha256) and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(cache):
        t = cache[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # no copy: hashes the (memory-mapped) bytes in place
    return h.hexdigest()


def save(cache, path, meta):
    """One safetensors file, written atomically; meta (+ format_version, fields, widths, sizes, sha256) as json
    under "asyncopd"."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"save: meta lacks {missing} (needed to guard offline training); add them")
    validate_batch(cache, vocab_size=meta["vocab_size"], where=f"save {path}")
    meta = dict(meta, format_version=FORMAT_VERSION, fields=sorted(cache), widths=widths(cache),
                num_tokens=int(cache["cu_seqlens"][-1]), num_sequences=cache["cu_seqlens"].numel() - 1)
    meta["sha256"] = checksum(cache, meta)  # flipped bytes in a tensor or the meta are refused on load
    tmp = f"{path}.tmp-{os.getpid()}"  # never matches CHUNK_NAME, so a crash leaves no "finished" chunk
    tensors = {k: v.detach().cpu().contiguous() for k, v in cache.items()}
    save_file(tensors, tmp, metadata={"asyncopd": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())  # bytes on disk before the rename makes the file look finished
    os.replace(tmp, path)


def load(path, mmap=True):
    """(cache, meta). With mmap the tensors are views of the memory-mapped file (read on touch)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["asyncopd"])
            cache = {k: f.get_tensor(k) for k in f.keys()}
        vocab_size = meta["vocab_size"]
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: truncated, corrupt or not an asyncopd cache ({type(e).__name__}: {e}); delete it "
                         "and recompute") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: cache format_version {meta.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}: delete the cache and rerun `python asyncopd.py precompute` to rebuild it")
    if meta.get("sha256") != checksum(cache, meta):
        raise ValueError(f"{path}: sha256 mismatch, the file was altered or damaged; delete it, rerun the precompute")
    if not mmap:
        cache = {k: v.clone() for k, v in cache.items()}
    validate_batch(cache, vocab_size=vocab_size, where=os.fspath(path))
    return cache, meta


def write_chunk(directory, index, cache, meta, first_sequence):
    """directory/chunk_{index:05d}.safetensors, atomically (tmp file + os.replace); it records its index and
    its sequence range (first_sequence, num_sequences), so load_dir refuses a chunk copied, swapped or duplicated."""
    os.makedirs(directory, exist_ok=True)
    save(cache, os.path.join(directory, f"chunk_{index:05d}.safetensors"),
         dict(meta, chunk_index=index, first_sequence=first_sequence))


def finished_chunks(directory):
    """Indices of the complete chunks (tmp files from an interrupted write are not counted)."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return {int(m.group(1)) for m in map(CHUNK_NAME.match, names) if m}


def load_dir(directory):
    """(cache, meta) of all chunks 0..n-1 concatenated in order; every chunk's meta must agree, chunk i must
    say it is chunk i and hold the sequences that follow chunk i-1's."""
    indices = sorted(finished_chunks(directory))
    if not indices:
        raise ValueError(f"{directory}: no chunk_*.safetensors files; run the precompute first")
    if indices != list(range(len(indices))):
        gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ValueError(f"{directory}: chunks {gaps} are missing; rerun the precompute to finish them")
    paths = [os.path.join(directory, f"chunk_{i:05d}.safetensors") for i in indices]
    parts = [load(p) for p in paths]  # each chunk is checksummed and validated by load()
    meta0 = {k: v for k, v in parts[0][1].items() if k not in PER_CHUNK_META}
    first = 0
    for i, (p, (_, m)) in enumerate(zip(paths, parts, strict=True)):
        if (m.get("chunk_index"), m.get("first_sequence")) != (i, first):
            raise ValueError(f"{p}: holds chunk {m.get('chunk_index')} (sequences from {m.get('first_sequence')}) "
                             f"where chunk {i} (sequences from {first}) belongs: a chunk was copied or moved; "
                             "delete it and rerun the precompute")
        first += m["num_sequences"]
        for k in sorted(set(meta0) | (set(m) - set(PER_CHUNK_META))):
            if m.get(k) != meta0.get(k):
                raise ValueError(f"{p}: meta '{k}' = {m.get(k)!r} but {paths[0]} has {meta0.get(k)!r}; chunks from "
                                 "different runs cannot be mixed")
    cache = concat([c for c, _ in parts])
    return cache, dict(meta0, num_tokens=int(cache["cu_seqlens"][-1]),
                       num_sequences=cache["cu_seqlens"].numel() - 1, num_chunks=len(paths))


def fingerprint(model_dir):
    """sha256 over config.json, every *.safetensors (sorted) and tokenizer.json if present; 16 hex."""
    config_path = os.path.join(model_dir, "config.json")
    weights = sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not os.path.isfile(config_path) or not weights:
        raise ValueError(f"fingerprint: {model_dir} needs config.json and *.safetensors "
                         "(save_pretrained with safe_serialization)")
    tok = os.path.join(model_dir, "tokenizer.json")
    h = hashlib.sha256()
    for path in [config_path] + weights + ([tok] if os.path.isfile(tok) else []):
        h.update(os.path.basename(path).encode() + b"\0")  # names too: a renamed shard is another model
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def sft_teacher(student_dir):
    """Teacher fingerprint recorded by sft.py in the student it produced (None if absent)."""
    path = os.path.join(student_dir, "asyncopd_sft.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("teacher_fingerprint")


def check_cache(cfg: Config, student_dir: str, tok: PreTrainedTokenizerBase, fields) -> None:
    """Lightning OPD guards: the cache exists, is intact, fits the student's tokenizer, holds the
    estimator's fields, and was scored by the teacher that made the student's SFT data."""
    if not cfg.cache_dir:
        raise ValueError("schedule=offline needs cache_dir=PATH: run `python asyncopd.py precompute` first")
    cache, meta = load_dir(cfg.cache_dir)
    if meta["tokenizer_fingerprint"] != teacher_cache.tokenizer_fingerprint(tok):
        raise ValueError(f"cache {cfg.cache_dir} was built with tokenizer {meta['tokenizer_fingerprint']}, the student "
                         f"{student_dir} has {teacher_cache.tokenizer_fingerprint(tok)}: precompute with this student")
    vocab = AutoConfig.from_pretrained(student_dir).vocab_size
    if meta["vocab_size"] != vocab:
        raise ValueError(f"cache {cfg.cache_dir} has vocabulary size {meta['vocab_size']}, the student {student_dir} "
                         f"has {vocab}: precompute with a teacher of the student's vocabulary")
    if meta["num_sequences"] != meta.get("prompts"):
        raise ValueError(f"cache {cfg.cache_dir} holds {meta['num_sequences']} of the {meta.get('prompts')} sequences "
                         "of its precompute: rerun the precompute to finish it")
    missing = sorted(fields - set(cache) - set(estimators.needs(cfg.loss).proximal.values()))
    if missing:
        raise ValueError(f"cache {cfg.cache_dir} lacks {missing} needed by {cfg.loss.name}: precompute with this loss")
    for key in PROMPT_KEYS[:2]:  # the student is evaluated on prompts rendered as it was trained on them
        if meta.get(key, getattr(Config, key)) != getattr(cfg, key):
            raise ValueError(f"cache {cfg.cache_dir} was rolled out with {key}={meta.get(key, getattr(Config, key))!r},"
                             f" this run has {getattr(cfg, key)!r}: set it as the cache has it")
    sft = sft_teacher(student_dir)
    if sft is None and not cfg.allow_teacher_mismatch:
        raise ValueError(f"teacher consistency: {student_dir} has no asyncopd_sft.json naming its SFT teacher: SFT it "
                         "with `python -m tools.sft student --teacher DIR`, or allow_teacher_mismatch=true")
    if sft != meta["teacher_fingerprint"] and not cfg.allow_teacher_mismatch:
        raise ValueError(f"teacher consistency: cache {cfg.cache_dir} was scored by teacher "
                         f"{meta['teacher_fingerprint']} "
                         f"but the student's SFT data came from teacher {sft} ({student_dir}/asyncopd_sft.json); "
                         "use the SFT teacher, or allow_teacher_mismatch=true for the ablation")


def open_cache(cfg: Config, tok: PreTrainedTokenizerBase, teacher: PreTrainedModel,
               n_prompts: int) -> tuple[dict, list[tuple[int, list[int]]]]:
    """Start, or resume, a precompute into cache_dir: (the meta every chunk records, [(chunk, its prompt indices)] still
    to compute). Finished chunks are reused; a rerun with other settings is refused; half-written files are removed."""
    fields = estimators.required_fields(cfg.loss)
    meta = {"teacher_fingerprint": fingerprint(cfg.teacher), "teacher_dtype": str(teacher_cache.scoring_dtype(cfg)),
            "tokenizer_fingerprint": teacher_cache.tokenizer_fingerprint(tok), "vocab_size": teacher.config.vocab_size,
            "student_version": 0, "student_fingerprint": fingerprint(cfg.student),
            "estimator": cfg.loss.name, "seed": cfg.seed}
    n = min(cfg.precompute_prompts, n_prompts)
    # everything that decides a chunk's content: a rerun must match it to reuse the finished chunks
    meta.update(prompts=n, chunk_prompts=cfg.chunk_prompts, data=cfg.data, required_fields=sorted(fields),
                temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                teacher_topk=cfg.loss.teacher_topk, student_topk=cfg.loss.student_topk, samples=cfg.loss.samples,
                **{k: getattr(cfg, k) for k in PROMPT_KEYS})
    done = finished_chunks(cfg.cache_dir)
    if done:
        old = load(os.path.join(cfg.cache_dir, f"chunk_{min(done):05d}.safetensors"))[1]
        diff = [k for k in meta if old.get(k) != meta[k]]
        if diff:
            raise ValueError(f"{cfg.cache_dir} holds chunks of another precompute ({diff[0]} {old.get(diff[0])!r} "
                             f"there, {meta[diff[0]]!r} now): use another cache_dir or delete it")
    for name in os.listdir(cfg.cache_dir) if os.path.isdir(cfg.cache_dir) else []:
        if ".safetensors.tmp-" in name:  # a write cut short by an interruption
            os.remove(os.path.join(cfg.cache_dir, name))
    return meta, [(c, list(range(c * cfg.chunk_prompts, min(n, (c + 1) * cfg.chunk_prompts))))
                  for c in range(math.ceil(n / cfg.chunk_prompts)) if c not in done]


def cache_report(directory: str, computed: int, seconds: float) -> str:
    """One line on a finished cache: its size, and how much of it this precompute computed."""
    cache, meta = load_dir(directory)
    return (f"cache {directory}: {meta['num_sequences']} sequences, {meta['num_tokens']} tokens in "
            f"{meta['num_chunks']} chunks, {bytes_per_token(cache):.0f} bytes/token ({computed} chunks computed in "
            f"{seconds:.1f}s, {meta['num_chunks'] - computed} reused)")


def offline_batches(cfg: Config, start_step: int):
    """Offline schedule: rollout units read from the precomputed disk cache, in seeded epoch order."""
    cache, _ = load_dir(cfg.cache_dir)
    n_seq = len(cache["cu_seqlens"]) - 1
    for unit in range(start_step * schedule.units_per_batch(cfg), cfg.steps * schedule.units_per_batch(cfg)):
        yield {"unit": unit}, select_sequences(cache, schedule.unit_prompt_indices(cfg, n_seq, unit))


def offline_evals(cfg: Config, tok: PreTrainedTokenizerBase, evals: list[dict], points: list[tuple[str, int]],
                  run_dir: str) -> list[dict]:
    """Offline runs have no rollout role to evaluate: grade the (model dir, step) points after training."""
    torch.set_num_threads(cfg.threads)
    recs = []
    # the checkpoints are saved: a stop signal just ends the grading (the command line reports it)
    with coordinator.STOPS.raising(), contextlib.suppress(KeyboardInterrupt):
        for path, step in points:
            engine = rollout.make_engine(path, kind="hf", device=cfg.rollout_devices[0], temperature=cfg.temperature,
                                         top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            rates = task.pass_rates(engine, tok, evals, samples=cfg.eval_samples, greedy=cfg.eval_temperature == 0)
            recs.append({"version": step * cfg.mini_batches, "step": step, **task.avg_at_k(rates)})
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.writelines(json.dumps({"kind": "eval", **r}) + "\n" for r in recs)
    coordinator.plot_run(run_dir)
    return recs
