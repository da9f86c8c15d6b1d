"""The batch format every role reads and writes: one packed, token-major dict of CPU tensors, and THE shift convention.

A rollout engine returns a trajectory in this format (pack_trajectory), the teacher adds its fields to it (the finite
teacher-score cache, teacher_cache.py), the learner selects, splits and pads it (select_sequences, split_by_tokens,
pad_batch). The dict crosses torch.multiprocessing queues through shared memory as is; optional/offline.py writes it
to disk (checksummed safetensors chunks) for Lightning OPD.

THE shift convention (stated here once; everything else calls `response_positions`):
A sequence is a prompt x_0..x_{P-1} followed by a response y_0..y_{L-1} (y_{L-1} may be EOS). Row r of every
per-token field describes y_r and the distribution that generated it, i.e. the model output at absolute position
P + r - 1  of the concatenated sequence. So rows use positions P-1 .. P+L-2: the first response token (scored from
the last prompt position) and the last (EOS) are both included, and nothing is one position off.

Layout: N = total response tokens, B = sequences. No [B, S, K] padding: per-token fields are stacked sequence after
sequence, and `cu_seqlens` says where each sequence's rows start and end.

  sequence fields                    shape      dtype
  prompt_ids                         [sum P]    int64   all prompts, concatenated
  prompt_cu_seqlens / cu_seqlens     [B+1]      int64   offsets into prompt_ids / into the N rows
  finished                           [B]        bool    response ended with EOS
  prompt_index                       [B]        int64   row of the prompt in its data set
  per-token fields (row r = y_r)
  token_ids                          [N]        int64   y_r
  behavior/teacher/proximal_logp     [N]        f32     b(y_r) / t(y_r) / learner-added (decoupled PPO)
  policy_version                     [N]        int64   learner version that generated y_r
  loss_mask                          [N]        bool    False = ignore this row
  teacher_topk_ids / _logp           [N, K]     i64/f32 teacher top-K, sorted by t descending
  student_topk_ids                   [N, Ks]    int64   rollout student's top-Ks support ...
  student_topk_behavior/teacher_logp [N, Ks]    f32     ... with b and t there
  mc_ids                             [N, M]     int64   col 0 = y_r, cols 1.. i.i.d. draws from b
  mc_behavior/teacher/proximal_logp  [N, M]     f32     b, t (and learner-added proximal) there
  teacher_mc_ids / _logp             [N, Mt]    i64/f32 Mt i.i.d. draws from the teacher, with t
  teacher_dense_logp                 [N, V]     f32     full teacher log-softmax (tests only)

Bytes per response token (int64 ids, as the contract fixes): core (token_ids, behavior_logp, teacher_logp,
policy_version, loss_mask) 25, teacher top-K 12 K, student support 16 Ks, rollout MC 16 M (+4 M proximal), teacher MC
12 Mt, dense 4 V; sequence fields add 8 per prompt token + 25 per sequence + 16 per cache, amortised over N.
"""
import itertools
from collections.abc import Sequence

import torch

Batch = dict[str, torch.Tensor]  # a dict in this format: a trajectory, a scored unit, a learner batch or shard
I64, F32, BOOL = torch.int64, torch.float32, torch.bool
# name -> dtype, rows its first dim counts ("N" response tokens, "B" sequences, "B+1" offsets, "P" prompt tokens)
# and the width group of its second dim (None = rank 1).
FIELD_SPECS = {name: dict(dtype=dtype, rows=rows, width=width) for rows, width, group in [
    ("P", None, dict(prompt_ids=I64)),
    ("B+1", None, dict(prompt_cu_seqlens=I64, cu_seqlens=I64)),
    ("B", None, dict(finished=BOOL, prompt_index=I64)),
    ("N", None, dict(token_ids=I64, behavior_logp=F32, teacher_logp=F32, policy_version=I64, loss_mask=BOOL,
                     proximal_logp=F32)),
    ("N", "K", dict(teacher_topk_ids=I64, teacher_topk_logp=F32)),
    ("N", "Ks", dict(student_topk_ids=I64, student_topk_behavior_logp=F32, student_topk_teacher_logp=F32)),
    ("N", "M", dict(mc_ids=I64, mc_behavior_logp=F32, mc_teacher_logp=F32, mc_proximal_logp=F32)),
    ("N", "Mt", dict(teacher_mc_ids=I64, teacher_mc_logp=F32)),
    ("N", "V", dict(teacher_dense_logp=F32)),
] for name, dtype in group.items()}
TEACHER_AT_ROLLOUT_IDS = {"student_topk_teacher_logp": "student_topk_ids", "mc_teacher_logp": "mc_ids"}  # t there
REQUIRED_FIELDS = ("prompt_ids", "prompt_cu_seqlens", "cu_seqlens", "token_ids")
# Under top-p the behaviour distribution is exactly 0 outside the nucleus, so b at the student's
# top-Ks ids may be -inf; every other log-prob is at a sampled id or from a full softmax.
MAY_BE_NEG_INF = {"student_topk_behavior_logp"}


def _segments(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment [n], index within its segment [n]) for segments of these lengths laid end to end."""
    seg = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens  # flat index of each segment's first element
    return seg, torch.arange(seg.numel(), device=lens.device) - first[seg]


def response_positions(prompt_lens: torch.Tensor, response_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch_index [N], position [N]): row r of sequence i is read at position P_i + r - 1."""
    prompt_lens, response_lens = torch.as_tensor(prompt_lens), torch.as_tensor(response_lens)
    if (prompt_lens < 1).any():
        raise ValueError("response_positions: every prompt needs >= 1 token (y_0 is scored at position P-1)")
    batch_index, r = _segments(response_lens)
    return batch_index, prompt_lens[batch_index] + r - 1


def pad_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response (input_ids, attention_mask [B,S]) and rows [N] = b*S + P_b + r - 1, the flat index
    into hidden.reshape(B*S, H) of each response row. Right padding keeps positions, and causal attention never lets
    a real position see a pad, so the pad id (0) is never read."""
    P, L = batch["prompt_cu_seqlens"].diff(), batch["cu_seqlens"].diff()
    if P.numel() == 0:
        raise ValueError("pad_batch: empty batch (B = 0); drop it before the forward pass")
    B, S, device = P.numel(), int((P + L).max()), P.device
    input_ids = torch.zeros((B, S), dtype=I64, device=device)
    input_ids[_segments(P)] = batch["prompt_ids"]  # prompt token j of sequence b sits at (b, j)
    b, pos = response_positions(P, L)
    input_ids[b, pos + 1] = batch["token_ids"]  # y_r sits at P + r, one after the position that scores it
    attention_mask = (torch.arange(S, device=device)[None, :] < (P + L)[:, None]).long()
    return input_ids, attention_mask, b * S + pos


def check_generate_request(engine: object, prompts: Sequence[Sequence[int]], prompt_index: Sequence[int],
                           policy_version: int, student_topk: int, mc_samples: int) -> None:
    """What every rollout engine's generate() checks first (rollout.py's interface)."""
    if len(prompts) == 0 or len(prompts) != len(prompt_index):
        raise ValueError(f"generate got {len(prompts)} prompts and {len(prompt_index)} prompt_index entries: "
                         "give one index per prompt, at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate got an empty prompt: every prompt needs at least one token (e.g. BOS)")
    if policy_version != engine.policy_version:
        raise ValueError(f"generate(policy_version={policy_version}) but the engine holds version "
                         f"{engine.policy_version}: call load_weights(state_dict, {policy_version}) first")
    if student_topk < 0 or mc_samples < 0:
        raise ValueError(f"student_topk={student_topk} mc_samples={mc_samples}: must be >= 0")


def pack_trajectory(prompts: Sequence[Sequence[int]], prompt_index: Sequence[int], lengths: Sequence[int],
                    finished: Sequence[bool], policy_version: int, per_token: Batch) -> Batch:
    """A rollout engine's output in this format: sequence fields + per-token fields (already packed, token-major)."""
    n = int(sum(lengths))
    return {**packed_prompts(prompts), "cu_seqlens": torch.tensor([0] + list(lengths)).cumsum(0),
            "finished": torch.as_tensor(finished, dtype=torch.bool),
            "prompt_index": torch.as_tensor(prompt_index, dtype=torch.int64),
            "policy_version": torch.full((n,), policy_version, dtype=torch.int64),
            "loss_mask": torch.ones(n, dtype=torch.bool),
            **{k: v.cpu().to(torch.int64 if k.endswith("ids") else torch.float32) for k, v in per_token.items()}}


def packed_prompts(prompts: Sequence[Sequence[int]]) -> Batch:
    """{"prompt_ids", "prompt_cu_seqlens"} of these prompts; with another rendering of a batch's prompts (the teacher's,
    task.prepare_prompts) dict(batch, **packed_prompts(...)) is the same responses after other prompt tokens."""
    return {"prompt_ids": torch.tensor([t for p in prompts for t in p], dtype=torch.int64),
            "prompt_cu_seqlens": torch.tensor([0] + [len(p) for p in prompts]).cumsum(0)}


def widths(batch: Batch) -> dict[str, int]:
    """{"K": .., "Ks": .., "M": .., "Mt": .., "V": ..} for the width groups present in batch."""
    out = {}
    for name, t in batch.items():
        w = FIELD_SPECS.get(name, {}).get("width")
        if w is not None and t.dim() == 2:
            out.setdefault(w, int(t.shape[1]))
    return out


def validate_batch(batch: Batch, vocab_size: int | None = None, where: str = "") -> None:
    """Check names, shapes, dtypes and ranges; raise ValueError (one line) at the first problem."""
    def bad(name: str, problem: str) -> None:
        raise ValueError(f"field '{name}'{' in ' + where if where else ''}: {problem}")

    for name in [n for n in REQUIRED_FIELDS if n not in batch]:
        bad(name, f"missing (every batch needs {', '.join(REQUIRED_FIELDS)})")
    for name, t in batch.items():
        if name not in FIELD_SPECS:
            bad(name, f"unknown field; known fields are {sorted(FIELD_SPECS)}")
        if not isinstance(t, torch.Tensor) or t.dtype != FIELD_SPECS[name]["dtype"]:
            bad(name, f"dtype {getattr(t, 'dtype', type(t).__name__)}, expected a {FIELD_SPECS[name]['dtype']} tensor")
    for cu_name, ids_name in (("cu_seqlens", "token_ids"), ("prompt_cu_seqlens", "prompt_ids")):
        cu, ids = batch[cu_name], batch[ids_name]
        if cu.dim() != 1 or cu.numel() < 1 or cu[0] != 0 or (cu.diff() < 0).any():
            bad(cu_name, f"must be 1-D, start at 0 and never decrease (got {cu.tolist()[:8]}...)")
        if ids.shape[:1] != (int(cu[-1]),):
            bad(cu_name, f"ends at {int(cu[-1])} but {ids_name} has shape {tuple(ids.shape)}")
    if (batch["prompt_cu_seqlens"].diff() < 1).any():
        bad("prompt_cu_seqlens", "every prompt needs >= 1 token (y_0 is scored at position P-1)")
    B = batch["cu_seqlens"].numel() - 1
    n_rows = {"N": int(batch["cu_seqlens"][-1]), "B": B, "B+1": B + 1, "P": int(batch["prompt_cu_seqlens"][-1])}
    group = widths(batch)
    V = vocab_size if vocab_size is not None else group.get("V")
    if group.get("V", V) != V:
        bad("teacher_dense_logp", f"width {group['V']} != vocab_size {V}")
    for name, t in batch.items():
        rows, w = FIELD_SPECS[name]["rows"], FIELD_SPECS[name]["width"]
        rank = 1 if w is None else 2
        if t.dim() != rank or t.shape[0] != n_rows[rows]:
            bad(name, f"shape {tuple(t.shape)}, expected rank {rank} with {n_rows[rows]} rows ({rows})")
        if rank == 2 and t.shape[1] != group[w]:
            bad(name, f"width {t.shape[1]} disagrees with {w} = {group[w]} of the other fields")
        if name.endswith("_ids") and t.numel() and (t.min() < 0 or (V is not None and t.max() >= V)):
            bad(name, f"ids must lie in [0, {V}); got range [{int(t.min())}, {int(t.max())}]")
        if name.endswith("_logp") and t.numel():
            ok = t.isfinite() | (t == float("-inf")) if name in MAY_BE_NEG_INF else t.isfinite()
            if not ok.all():
                bad(name, f"non-finite log-prob at row {int((~ok).nonzero()[0, 0])}")
            if t.max() > 1e-4:
                bad(name, f"log-prob {float(t.max()):.4g} > 0 (must be a log-probability)")
        if name in ("policy_version", "prompt_index") and t.numel() and t.min() < 0:
            bad(name, "must be >= 0")
        if name in ("teacher_topk_ids", "student_topk_ids") and (t.sort(1).values.diff(dim=1) == 0).any():
            bad(name, "top-K ids must be distinct within a row")
        if name == "teacher_topk_logp" and (t.diff(dim=1) > 0).any():
            bad(name, "must be sorted in descending order along the K axis")
        if name == "mc_ids" and t.shape[1] > 0 and not torch.equal(t[:, 0], batch["token_ids"]):
            bad(name, "column 0 must equal token_ids (the generated token)")


def bytes_per_token(batch: Batch) -> float:
    """Total bytes / N: per-token fields exactly, sequence fields amortised over the response tokens."""
    N = int(batch["cu_seqlens"][-1])
    if N == 0:
        raise ValueError("bytes_per_token: the batch has no response tokens")
    return sum(t.numel() * t.element_size() for t in batch.values()) / N


def select_sequences(batch: Batch, seq_idx: Sequence[int] | torch.Tensor) -> Batch:
    """Batch holding only sequences seq_idx (in that order): mini-batches, micro-batches, FSDP rank shards."""
    seq_idx = torch.as_tensor(seq_idx, dtype=I64, device=batch["cu_seqlens"].device).reshape(-1)
    B = batch["cu_seqlens"].numel() - 1
    if seq_idx.numel() and (seq_idx.min() < 0 or seq_idx.max() >= B):
        raise ValueError(f"select_sequences: indices must lie in [0, {B}); got {seq_idx.tolist()[:8]}")
    out, index = {}, {"B": seq_idx}
    for cu_name, rows in (("cu_seqlens", "N"), ("prompt_cu_seqlens", "P")):
        cu = batch[cu_name]
        lens = cu[seq_idx + 1] - cu[seq_idx]
        seg, within = _segments(lens)
        index[rows] = cu[seq_idx][seg] + within  # flat rows of the selected sequences, in order
        out[cu_name] = torch.cat([torch.zeros(1, dtype=I64, device=cu.device), torch.cumsum(lens, 0)])
    return out | {name: t[index[FIELD_SPECS[name]["rows"]]] for name, t in batch.items()
                  if FIELD_SPECS[name]["rows"] != "B+1"}


def split_by_tokens(batch: Batch, budget: int, seq_idx: Sequence[int] | None = None) -> list[list[int]]:
    """Groups of sequence indices (seq_idx, default all), longest first, greedy, each padding to len(group) * longest
    <= `budget` prompt+response tokens; a longer sequence runs alone, over budget. budget 0: one group, as given."""
    seq_idx = list(range(batch["cu_seqlens"].numel() - 1)) if seq_idx is None else [int(i) for i in seq_idx]
    if budget <= 0 or not seq_idx:
        return [seq_idx] if seq_idx else []
    lens = (batch["prompt_cu_seqlens"].diff() + batch["cu_seqlens"].diff()).tolist()
    groups = []
    for i in sorted(seq_idx, key=lambda i: (-lens[i], i)):  # a group's first sequence is its longest
        if groups and (len(groups[-1]) + 1) * lens[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def concat(batches: Sequence[Batch]) -> Batch:
    """One batch from several with the same fields and widths (sequences in the given order)."""
    if not batches:
        raise ValueError("concat: no batches given")
    first = batches[0]
    for i, c in enumerate(batches):
        if set(c) != set(first):
            raise ValueError(f"concat: batch {i} has fields {sorted(c)}, batch 0 has {sorted(first)}")
        for n in first:
            if (c[n].dtype, c[n].shape[1:]) != (first[n].dtype, first[n].shape[1:]):
                raise ValueError(f"concat: field '{n}' of batch {i} is {c[n].dtype}{tuple(c[n].shape)}, "
                                 f"batch 0 has {first[n].dtype}{tuple(first[n].shape)}")
    out = {n: torch.cat([c[n] for c in batches]) for n in first if FIELD_SPECS[n]["rows"] != "B+1"}
    for n in [n for n in first if FIELD_SPECS[n]["rows"] == "B+1"]:  # offsets: shift by the rows before
        before = itertools.accumulate((int(c[n][-1]) for c in batches[:-1]), initial=0)
        out[n] = torch.cat([first[n][:1]] + [c[n][1:] + o for c, o in zip(batches, before, strict=True)])
    return out


def to_device(batch: dict, device: str | torch.device) -> dict:
    """The same dict with every tensor on `device` (other values as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
