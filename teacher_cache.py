"""The teacher: one forward pass per rollout unit adds the teacher log-probs t the estimator needs to the unit's batch
(batch_format.py), i.e. it fills the finite teacher-score cache: t at the generated token, the teacher's top-K, t at the
rollout student's top-K_s support or Monte Carlo draws, the teacher's own draws, or (small vocabularies) all of t.
A teacher beyond one GPU scores on vLLM (teacher_engine=vllm, optional/vllm_teacher.py): the same fields, no draws.

Rows follow batch_format.py's shift convention: row r of every field is scored from position P + r - 1.
"""
import hashlib
import json
import os

import tokenizers
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import estimators
from batch_format import (
    FIELD_SPECS,
    TEACHER_AT_ROLLOUT_IDS,
    Batch,
    packed_prompts,
    pad_batch,
    select_sequences,
    split_by_tokens,
    to_device,
    validate_batch,
)
from config import Config
from optional import vllm_teacher
from schedule import TEACHER_STREAM, unit_generator

TEACHER_FIELDS = {name for name in FIELD_SPECS if "teacher" in name}  # what score() can add


def scoring_dtype(cfg: Config) -> torch.dtype:
    """One teacher dtype for online scoring and offline precompute, so the two caches agree (key teacher_dtype)."""
    if cfg.teacher_dtype == "auto":
        return torch.bfloat16 if cfg.teacher_device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.teacher_dtype]


def load_teacher(cfg: Config) -> PreTrainedModel | vllm_teacher.TeacherOnVLLM:
    """The frozen teacher as every scorer uses it (the teacher role and `precompute`); a vLLM one has score() too."""
    if cfg.teacher_engine == "vllm":  # at teacher_url, or in this process on its GPUs: optional/vllm_teacher.py
        return vllm_teacher.from_config(cfg, scoring_dtype(cfg))
    model = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=scoring_dtype(cfg))
    return model.to(cfg.teacher_device).eval()


def score_unit(cfg: Config, teacher: PreTrainedModel | vllm_teacher.TeacherOnVLLM, traj: Batch, unit: int,
               prompts: list[dict] | None = None) -> Batch:
    """Rollout unit `unit` scored: the trajectory plus the teacher fields the estimator needs. t at the generated
    token is always scored (4 bytes/token), so every run logs a reverse-KL estimate. prompts: the data set's rows; where
    they hold the teacher's own rendering of a prompt ("teacher_ids", teacher_template), the teacher reads the student's
    response tokens after it. The unit keeps the student's prompt: the learner's s is read after that."""
    fields = estimators.needs(cfg.loss).teacher | {"teacher_logp"}
    rows = [prompts[i] for i in traj["prompt_index"].tolist()] if prompts else []
    seen = traj  # where the teacher renders the prompts as the student does, "teacher_ids" is the "ids" list itself
    if any(row.get("teacher_ids", row["ids"]) is not row["ids"] for row in rows):
        seen = dict(traj, **packed_prompts([row["teacher_ids"] for row in rows]))
    scored = teacher.score(seen, fields, cfg.loss.teacher_topk) if not isinstance(teacher, PreTrainedModel) else score(
        teacher, to_device(seen, cfg.teacher_device), fields, cfg.loss.teacher_topk, cfg.loss.samples,
        batch_tokens=cfg.teacher_batch_tokens, generator=unit_generator(cfg, unit, TEACHER_STREAM, cfg.teacher_device))
    return dict(to_device(scored, "cpu"), prompt_ids=traj["prompt_ids"], prompt_cu_seqlens=traj["prompt_cu_seqlens"])


@torch.no_grad()
def score(teacher_model: PreTrainedModel, traj: Batch, fields: set | frozenset, teacher_topk: int = 0,
          teacher_mc: int = 0, *, generator: torch.Generator | None = None, chunk_size: int = 1024,
          batch_tokens: int = 0) -> Batch:
    """Teacher forward over the padded batch: traj + the requested fields. t = the teacher's float32 log_softmax
    (temperature 1), `chunk_size` rows at a time: no [N, V] unless teacher_dense_logp is asked for. teacher_mc_ids:
    `teacher_mc` i.i.d. draws with replacement from softmax(t) by `generator`. batch_tokens > 0: one forward per
    split_by_tokens group, the rows gathered back into one [N, H] first, so the output (draws too) is one forward's."""
    fields = set(fields)
    if fields - TEACHER_FIELDS:
        raise ValueError(f"score: {sorted(fields - TEACHER_FIELDS)} are not teacher fields; "
                         f"choose from {sorted(TEACHER_FIELDS)}")
    if teacher_model.training:
        raise ValueError("score: teacher_model is in training mode; call teacher_model.eval() first")
    V = teacher_model.lm_head.out_features
    for f, ids_field in TEACHER_AT_ROLLOUT_IDS.items():
        if f in fields and ids_field not in traj:
            raise ValueError(f"score: '{f}' needs '{ids_field}' in the trajectory; ask the rollout for it")
    if fields & {"teacher_topk_ids", "teacher_topk_logp"} and not 1 <= teacher_topk <= V:
        raise ValueError(f"score: teacher top-K fields need teacher_topk in [1, {V}], got {teacher_topk}")
    if fields & {"teacher_mc_ids", "teacher_mc_logp"} and teacher_mc < 1:  # with replacement: may exceed V
        raise ValueError(f"score: teacher MC fields need teacher_mc >= 1, got {teacher_mc}")
    validate_batch(traj, vocab_size=V, where="score input")
    device, cu = teacher_model.lm_head.weight.device, traj["cu_seqlens"]
    groups = split_by_tokens(traj, batch_tokens) or [[]]  # B = 0: pad_batch refuses it below
    hidden = None
    for group in groups:
        sub = select_sequences(traj, group) if len(groups) > 1 else traj
        input_ids, attention_mask, rows = pad_batch(sub)
        h = teacher_model.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                use_cache=False)[0]
        h = h.reshape(-1, h.shape[-1])[rows.to(device)]  # [n, H], row r = position P+r-1
        if len(groups) == 1:
            hidden = h
            break
        if hidden is None:
            hidden = h.new_empty(int(cu[-1]), h.shape[-1])
        hidden[torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in group]).to(device)] = h  # traj's rows
    parts = {f: [] for f in fields}
    for lo in range(0, max(hidden.shape[0], 1), chunk_size):  # N = 0 still runs one (empty) chunk: right shapes
        sl = slice(lo, lo + chunk_size)
        t = torch.log_softmax(teacher_model.lm_head(hidden[sl]).float(), dim=-1)  # [n, V] float32
        got = {"teacher_dense_logp": t, "teacher_logp": t.gather(1, traj["token_ids"][sl].to(device)[:, None])[:, 0]}
        if fields & {"teacher_topk_ids", "teacher_topk_logp"}:
            got["teacher_topk_logp"], got["teacher_topk_ids"] = torch.topk(t, teacher_topk, dim=-1, sorted=True)
        for f, ids_field in TEACHER_AT_ROLLOUT_IDS.items():
            if f in fields:
                got[f] = t.gather(1, traj[ids_field][sl].to(device))
        if fields & {"teacher_mc_ids", "teacher_mc_logp"}:
            got["teacher_mc_ids"] = torch.multinomial(t.exp(), teacher_mc, replacement=True, generator=generator)
            got["teacher_mc_logp"] = t.gather(1, got["teacher_mc_ids"])
        for f in fields:
            parts[f].append(got[f])
    out = dict(traj, **{f: torch.cat(p).to(traj["token_ids"].device) for f, p in parts.items()})
    validate_batch(out, vocab_size=V, where="score output")
    return out


def tokenizer_fingerprint(tokenizer_or_dir: str | os.PathLike | PreTrainedTokenizerBase) -> str:
    """sha256 (16 hex) of the sorted vocabulary with added tokens: a dir and its loaded tokenizer agree."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        path = os.path.join(tokenizer_or_dir, "tokenizer.json") if os.path.isdir(tokenizer_or_dir) else tokenizer_or_dir
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer_fingerprint: no tokenizer.json at {path}; "
                             "pass the tokenizer object instead")
        vocab = tokenizers.Tokenizer.from_file(os.fspath(path)).get_vocab(with_added_tokens=True)
    else:  # an HF / tokenizers tokenizer
        vocab = tokenizer_or_dir.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
