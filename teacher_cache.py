"""Finite teacher-score cache: a packed, token-major dict of plain tensors.

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
A dict of CPU tensors crosses torch.multiprocessing queues through shared memory as is; offline.py writes it to disk
(safetensors chunks, checksummed) for Lightning OPD.
"""
import hashlib
import itertools
import json
import os

import torch

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
REQUIRED_FIELDS = ("prompt_ids", "prompt_cu_seqlens", "cu_seqlens", "token_ids")
TEACHER_FIELDS = {name for name in FIELD_SPECS if "teacher" in name}  # what score() can add
# Under top-p the behaviour distribution is exactly 0 outside the nucleus, so b at the student's
# top-Ks ids may be -inf; every other log-prob is at a sampled id or from a full softmax.
MAY_BE_NEG_INF = {"student_topk_behavior_logp"}
GATHERED = {"student_topk_teacher_logp": "student_topk_ids", "mc_teacher_logp": "mc_ids"}  # t at rollout ids


def _segments(lens):
    """(segment [n], index within its segment [n]) for segments of these lengths laid end to end."""
    seg = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens  # flat index of each segment's first element
    return seg, torch.arange(seg.numel(), device=lens.device) - first[seg]


def response_positions(prompt_lens, response_lens):
    """(batch_index [N], position [N]): row r of sequence i is read at position P_i + r - 1."""
    prompt_lens, response_lens = torch.as_tensor(prompt_lens), torch.as_tensor(response_lens)
    if (prompt_lens < 1).any():
        raise ValueError("response_positions: every prompt needs >= 1 token (y_0 is scored at position P-1)")
    batch_index, r = _segments(response_lens)
    return batch_index, prompt_lens[batch_index] + r - 1


def pad_batch(cache, pad_token_id=0):
    """Right-padded prompt+response (input_ids, attention_mask [B,S]) and rows [N] = b*S + P_b + r - 1, the flat index
    into hidden.reshape(B*S, H) of each response row. Right padding keeps positions; causal attention skips pads."""
    P, L = cache["prompt_cu_seqlens"].diff(), cache["cu_seqlens"].diff()
    if P.numel() == 0:
        raise ValueError("pad_batch: empty batch (B = 0); drop it before the forward pass")
    B, S, device = P.numel(), int((P + L).max()), P.device
    input_ids = torch.full((B, S), pad_token_id, dtype=I64, device=device)
    input_ids[_segments(P)] = cache["prompt_ids"]  # prompt token j of sequence b sits at (b, j)
    b, pos = response_positions(P, L)
    input_ids[b, pos + 1] = cache["token_ids"]  # y_r sits at P + r, one after the position that scores it
    attention_mask = (torch.arange(S, device=device)[None, :] < (P + L)[:, None]).long()
    return input_ids, attention_mask, b * S + pos


def widths(cache):
    """{"K": .., "Ks": .., "M": .., "Mt": .., "V": ..} for the width groups present in cache."""
    out = {}
    for name, t in cache.items():
        w = FIELD_SPECS.get(name, {}).get("width")
        if w is not None and t.dim() == 2:
            out.setdefault(w, int(t.shape[1]))
    return out


def validate(cache, vocab_size=None, where=""):
    """Check names, shapes, dtypes and ranges; raise ValueError (one line) at the first problem."""
    def bad(name, problem):
        raise ValueError(f"field '{name}'{' in ' + where if where else ''}: {problem}")

    for name in [n for n in REQUIRED_FIELDS if n not in cache]:
        bad(name, f"missing (every cache needs {', '.join(REQUIRED_FIELDS)})")
    for name, t in cache.items():
        if name not in FIELD_SPECS:
            bad(name, f"unknown field; known fields are {sorted(FIELD_SPECS)}")
        if not isinstance(t, torch.Tensor) or t.dtype != FIELD_SPECS[name]["dtype"]:
            bad(name, f"dtype {getattr(t, 'dtype', type(t).__name__)}, expected a {FIELD_SPECS[name]['dtype']} tensor")
    for cu_name, ids_name in (("cu_seqlens", "token_ids"), ("prompt_cu_seqlens", "prompt_ids")):
        cu, ids = cache[cu_name], cache[ids_name]
        if cu.dim() != 1 or cu.numel() < 1 or cu[0] != 0 or (cu.diff() < 0).any():
            bad(cu_name, f"must be 1-D, start at 0 and never decrease (got {cu.tolist()[:8]}...)")
        if ids.shape[:1] != (int(cu[-1]),):
            bad(cu_name, f"ends at {int(cu[-1])} but {ids_name} has shape {tuple(ids.shape)}")
    if (cache["prompt_cu_seqlens"].diff() < 1).any():
        bad("prompt_cu_seqlens", "every prompt needs >= 1 token (y_0 is scored at position P-1)")
    B = cache["cu_seqlens"].numel() - 1
    n_rows = {"N": int(cache["cu_seqlens"][-1]), "B": B, "B+1": B + 1, "P": int(cache["prompt_cu_seqlens"][-1])}
    group = widths(cache)
    V = vocab_size if vocab_size is not None else group.get("V")
    if group.get("V", V) != V:
        bad("teacher_dense_logp", f"width {group['V']} != vocab_size {V}")
    for name, t in cache.items():
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
        if name == "mc_ids" and t.shape[1] > 0 and not torch.equal(t[:, 0], cache["token_ids"]):
            bad(name, "column 0 must equal token_ids (the generated token)")


def bytes_per_token(cache):
    """Total bytes / N: per-token fields exactly, sequence fields amortised over the response tokens."""
    N = int(cache["cu_seqlens"][-1])
    if N == 0:
        raise ValueError("bytes_per_token: the cache has no response tokens")
    return sum(t.numel() * t.element_size() for t in cache.values()) / N


def select_sequences(cache, seq_idx):
    """Cache holding only sequences seq_idx (in that order): mini-batches, FSDP rank shards."""
    seq_idx = torch.as_tensor(seq_idx, dtype=I64, device=cache["cu_seqlens"].device).reshape(-1)
    B = cache["cu_seqlens"].numel() - 1
    if seq_idx.numel() and (seq_idx.min() < 0 or seq_idx.max() >= B):
        raise ValueError(f"select_sequences: indices must lie in [0, {B}); got {seq_idx.tolist()[:8]}")
    out, index = {}, {"B": seq_idx}
    for cu_name, rows in (("cu_seqlens", "N"), ("prompt_cu_seqlens", "P")):
        cu = cache[cu_name]
        lens = cu[seq_idx + 1] - cu[seq_idx]
        seg, within = _segments(lens)
        index[rows] = cu[seq_idx][seg] + within  # flat rows of the selected sequences, in order
        out[cu_name] = torch.cat([torch.zeros(1, dtype=I64, device=cu.device), torch.cumsum(lens, 0)])
    return out | {name: t[index[FIELD_SPECS[name]["rows"]]] for name, t in cache.items()
                  if FIELD_SPECS[name]["rows"] != "B+1"}


def split_by_tokens(cache, budget, seq_idx=None):
    """Groups of sequence indices (seq_idx, default all), longest first, greedy, each padding to len(group) * longest
    <= `budget` prompt+response tokens; a longer sequence runs alone, over budget. budget 0: one group, as given."""
    seq_idx = list(range(cache["cu_seqlens"].numel() - 1)) if seq_idx is None else [int(i) for i in seq_idx]
    if budget <= 0 or not seq_idx:
        return [seq_idx] if seq_idx else []
    lens = (cache["prompt_cu_seqlens"].diff() + cache["cu_seqlens"].diff()).tolist()
    groups = []
    for i in sorted(seq_idx, key=lambda i: (-lens[i], i)):  # a group's first sequence is its longest
        if groups and (len(groups[-1]) + 1) * lens[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def concat(caches):
    """One cache from several with the same fields and widths (sequences in the given order)."""
    if not caches:
        raise ValueError("concat: no caches given")
    first = caches[0]
    for i, c in enumerate(caches):
        if set(c) != set(first):
            raise ValueError(f"concat: cache {i} has fields {sorted(c)}, cache 0 has {sorted(first)}")
        for n in first:
            if (c[n].dtype, c[n].shape[1:]) != (first[n].dtype, first[n].shape[1:]):
                raise ValueError(f"concat: field '{n}' of cache {i} is {c[n].dtype}{tuple(c[n].shape)}, "
                                 f"cache 0 has {first[n].dtype}{tuple(first[n].shape)}")
    out = {n: torch.cat([c[n] for c in caches]) for n in first if FIELD_SPECS[n]["rows"] != "B+1"}
    for n in [n for n in first if FIELD_SPECS[n]["rows"] == "B+1"]:  # offsets: shift by the rows before
        before = itertools.accumulate((int(c[n][-1]) for c in caches[:-1]), initial=0)
        out[n] = torch.cat([first[n][:1]] + [c[n][1:] + o for c, o in zip(caches, before, strict=True)])
    return out


@torch.no_grad()
def score(teacher_model, traj, fields, teacher_topk=0, teacher_mc=0, generator=None, chunk_size=1024, pad_token_id=0,
          batch_tokens=0):
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
    for f, ids_field in GATHERED.items():
        if f in fields and ids_field not in traj:
            raise ValueError(f"score: '{f}' needs '{ids_field}' in the trajectory; ask the rollout for it")
    if fields & {"teacher_topk_ids", "teacher_topk_logp"} and not 1 <= teacher_topk <= V:
        raise ValueError(f"score: teacher top-K fields need teacher_topk in [1, {V}], got {teacher_topk}")
    if fields & {"teacher_mc_ids", "teacher_mc_logp"} and teacher_mc < 1:  # with replacement: may exceed V
        raise ValueError(f"score: teacher MC fields need teacher_mc >= 1, got {teacher_mc}")
    validate(traj, vocab_size=V, where="score input")
    device, cu = teacher_model.lm_head.weight.device, traj["cu_seqlens"]
    groups = split_by_tokens(traj, batch_tokens) or [[]]  # B = 0: pad_batch refuses it below
    hidden = None
    for group in groups:
        sub = select_sequences(traj, group) if len(groups) > 1 else traj
        input_ids, attention_mask, rows = pad_batch(sub, pad_token_id)
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
        for f, ids_field in GATHERED.items():
            if f in fields:
                got[f] = t.gather(1, traj[ids_field][sl].to(device))
        if fields & {"teacher_mc_ids", "teacher_mc_logp"}:
            got["teacher_mc_ids"] = torch.multinomial(t.exp(), teacher_mc, replacement=True, generator=generator)
            got["teacher_mc_logp"] = t.gather(1, got["teacher_mc_ids"])
        for f in fields:
            parts[f].append(got[f])
    out = dict(traj, **{f: torch.cat(p).to(traj["token_ids"].device) for f, p in parts.items()})
    validate(out, vocab_size=V, where="score output")
    return out


def tokenizer_fingerprint(tokenizer_or_dir):
    """sha256 (16 hex) of the sorted vocabulary with added tokens: a dir and its loaded tokenizer agree."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        import tokenizers
        path = os.path.join(tokenizer_or_dir, "tokenizer.json") if os.path.isdir(tokenizer_or_dir) else tokenizer_or_dir
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer_fingerprint: no tokenizer.json at {path}; "
                             "pass the tokenizer object instead")
        vocab = tokenizers.Tokenizer.from_file(os.fspath(path)).get_vocab(with_added_tokens=True)
    else:  # an HF / tokenizers tokenizer
        vocab = tokenizer_or_dir.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
