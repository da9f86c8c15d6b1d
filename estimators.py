"""On-policy distillation estimators: every per-token KL loss of asyncopd in one file.

Notation (per response position): s = log-probs of the current student (with grad), b = behaviour log-probs of the
rollout-time, possibly stale, student, t = teacher log-probs (frozen). p_theta = e^s, p_b = e^b, q = e^t. Rows follow
THE shift convention of batch_format.py: row r of every per-token field is response token y_r and the distribution
that generated it (first response token and EOS included).

Every estimator has one signature, fn(s, cache, opts) -> (per_token_loss [N], metrics), where s maps an id field of
the cache to the current student's log-probs at those ids (see gather_logprobs); aggregate() turns per_token_loss into
the scalar that is back-propagated. Each is declared once, by @estimator(Fields(...), flags) right above its function:
the cache fields it reads and the role that writes each; needs(opts) derives from that what the rollout, the teacher
and the learner compute.

estimator           cache fields (+ token_ids, loss_mask, cu_seqlens)
  bias (vs its KL at the current student)                    variance         staleness (b != s)
forward_kl_topk     teacher_topk_ids, teacher_topk_logp
  drops teacher mass outside top-K (tail_bucket: exact KL    none             none: teacher weights, b unused
  of the coarsened distributions; renormalize: KL on top-K)
forward_kl_dense    teacher_dense_logp
  exact                                                      none             none
forward_kl_mc       teacher_mc_ids, teacher_mc_logp
  unbiased (value and gradient)                              ~1/M             none: teacher samples
reverse_kl_dense    teacher_dense_logp
  exact                                                      none             none
reverse_kl_support  student_topk_ids, student_topk_teacher_logp (or teacher_topk_*)
  ignores student mass outside the fixed support S           none             biased: S was chosen by the stale student;
                                                                              missing t cannot be recovered
reverse_kl_pg       teacher_logp, behavior_logp (+ proximal_logp if decoupled)
  A_theta + ratio: unbiased gradient; A_old: O(s - b) bias;  high (1 sample)  corrected per token by exp(s - b) if p_b
  clip / TIS / decoupled / M2PO: biased where they act                        covers p_theta; prefix distribution not
                                                                              corrected
reverse_kl_mc       mc_ids, mc_teacher_logp, mc_behavior_logp (+ mc_proximal_logp)
  as reverse_kl_pg                                           ~1/M of pg       as reverse_kl_pg
jsd                 teacher_dense_logp, or a finite support as reverse_kl_support
  exact on dense; on a finite support, as the support        none             dense: none; finite: as reverse_kl_support

The paper's recommended surrogate is reverse_kl_mc with advantage="theta", ratio=True, no clip, M = 64.
"""
import difflib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

MAX_DENSE_VOCAB = 65536  # a dense [N, V] student log-softmax is for tests and small vocabularies only
Tensors = dict[str, torch.Tensor]  # a cache (batch_format.py), or s: {id field: the student's log-probs there}


@dataclass(frozen=True)
class LossOptions:
    name: str = "reverse_kl_mc"  # estimator, a key of ESTIMATORS
    advantage: str = "theta"  # "theta": A = t - s recomputed at learner time, detached | "old": t - b frozen at rollout
    ratio: bool = True  # importance ratio exp(s - b) on the sampled ids (off: plain score function)
    clip_eps: float = 0.0  # PPO clip epsilon on the ratio (0 = off)
    tis_cap: float = 0.0  # truncated-IS cap on the ratio, detached weight min(r, cap) (0 = off)
    decoupled: bool = False  # AReaL decoupled PPO: clip p_theta/p_prox, times behaviour weight p_prox/p_b
    behave_cap: float = 5.0  # decoupled: behaviour weights above this are zeroed
    m2po_budget: float = 0.0  # M2PO second-moment budget on (b - s)^2 (0 = off)
    m2po_floor_low: float = 0.3  # M2PO: eps_low is at least this
    m2po_floor_high: float = 0.5  # M2PO: eps_high is at least this
    teacher_topk: int = 16  # K: teacher top-K ids per position
    student_topk: int = 16  # K_s: rollout student's top-K_s support per position
    samples: int = 16  # M: Monte Carlo samples per position (column 0 = the generated token)
    support: str = "student_topk"  # reverse_kl_support / jsd support: "student_topk" | "teacher_topk" | "dense" (jsd)
    renormalize: bool = False  # finite support: renormalise student and teacher on the support
    tail_bucket: bool = False  # finite support: add the mass outside the support as one extra category
    beta: float = 0.5  # jsd: 0 = forward KL(q || p_theta), 1 = reverse KL(p_theta || q)
    aggregation: str = "token_mean"  # "token_mean" over response tokens | "seq_mean" of per-sequence means
    chunk_size: int = 1024  # positions per chunk in the student gather


# ----------------------------------------------------------------------------- declaring an estimator
@dataclass(frozen=True)
class Fields:
    """The cache fields one estimator reads, by the role that writes them (names as in batch_format.FIELD_SPECS)."""
    ids: tuple  # where the learner gathers the current student's log-probs ("dense": the whole vocabulary)
    rollout: tuple = ()  # written by the rollout engine's generate (besides CORE)
    teacher: tuple = ()  # written by teacher_cache.score
    behavior: tuple = ()  # written by the rollout engine's generate; read only if _reads_behavior(opts)
    proximal: tuple = ()  # written by the learner (student before the step), one per ids field; read only if decoupled


@dataclass(frozen=True)
class Estimator:
    """One estimator as @estimator declared it."""
    fn: Callable  # fn(s, cache, opts) -> (per_token_loss [N], metrics)
    fields: Fields | dict  # its Fields, or {opts.support: Fields} where the support option picks them
    policy_gradient: bool  # takes the policy-gradient options (advantage, ratio, and the stabilisers)
    finite_support: bool  # takes renormalize / tail_bucket


ESTIMATORS: dict[str, Estimator] = {}  # name -> declaration, filled by @estimator in the order of this file


def estimator(fields: Fields | dict, policy_gradient: bool = False, finite_support: bool = False) -> Callable:
    """Declare the function below as an estimator, under its own name, with the fields it reads and its flags."""
    def declare(fn: Callable) -> Callable:
        ESTIMATORS[fn.__name__] = Estimator(fn, fields, policy_gradient, finite_support)
        return fn
    return declare


CORE = ("token_ids", "loss_mask", "cu_seqlens")  # in every cache, written by the rollout
_TEACHER_TOPK = Fields(ids=("teacher_topk_ids",), teacher=("teacher_topk_ids", "teacher_topk_logp"))
_STUDENT_TOPK = Fields(ids=("student_topk_ids",), rollout=("student_topk_ids",), teacher=("student_topk_teacher_logp",))
_DENSE = Fields(ids=("dense",), teacher=("teacher_dense_logp",))


# ----------------------------------------------------------------------------- options
def _fail(msg):
    raise ValueError(msg)


def validate_options(opts: LossOptions) -> None:
    """Raise ValueError (one line: the problem and the fix) if opts cannot work."""
    o = opts
    if o.name not in ESTIMATORS:
        close = difflib.get_close_matches(o.name, list(ESTIMATORS), n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose one of {sorted(ESTIMATORS)}"
        _fail(f"unknown estimator name={o.name!r}: {hint}")
    choices = {"advantage": ("theta", "old"), "aggregation": ("token_mean", "seq_mean"),
               "support": ("student_topk", "teacher_topk", "dense")}
    for key, allowed in choices.items():
        if getattr(o, key) not in allowed:
            _fail(f"unknown {key}={getattr(o, key)!r}: choose one of {list(allowed)}")
    for key in ("teacher_topk", "student_topk", "samples", "chunk_size"):
        if int(getattr(o, key)) < 1:
            _fail(f"{key}={getattr(o, key)} must be >= 1")
    for key in ("clip_eps", "tis_cap", "m2po_budget", "m2po_floor_low", "m2po_floor_high"):
        if getattr(o, key) < 0:
            _fail(f"{key}={getattr(o, key)} must be >= 0 (0 switches it off)")
    if not 0 <= o.beta <= 1:
        _fail(f"beta={o.beta} must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if o.behave_cap <= 0 or o.m2po_floor_low >= 1:
        _fail(f"behave_cap={o.behave_cap} must be > 0 and m2po_floor_low={o.m2po_floor_low} < 1")
    declared = ESTIMATORS[o.name]
    stabilisers = [k for k, on in (("clip_eps", o.clip_eps > 0), ("tis_cap", o.tis_cap > 0),
                                   ("decoupled", o.decoupled), ("m2po_budget", o.m2po_budget > 0)) if on]
    pg_only = stabilisers + [k for k, on in (("advantage", o.advantage != "theta"), ("ratio", not o.ratio)) if on]
    if pg_only and not declared.policy_gradient:
        _fail(f"{pg_only[0]} only applies to {[n for n, e in ESTIMATORS.items() if e.policy_gradient]}, not {o.name}: "
              "reset it to its default")
    if stabilisers and not o.ratio:
        _fail(f"{stabilisers[0]} acts on the importance ratio but ratio=False: set ratio=True")
    if len(stabilisers) > 1 and stabilisers != ["clip_eps", "decoupled"]:
        _fail(f"stabilisers {stabilisers} cannot be combined: keep one (decoupled uses clip_eps as its clip)")
    if (o.renormalize or o.tail_bucket) and not declared.finite_support:
        _fail(f"renormalize/tail_bucket only apply to {[n for n, e in ESTIMATORS.items() if e.finite_support]}, "
              f"not {o.name}: set them False")
    if o.renormalize and o.tail_bucket:
        _fail("renormalize and tail_bucket both make the support a distribution: choose one")
    if isinstance(declared.fields, dict) and o.support not in declared.fields:
        dense = " (use reverse_kl_dense for dense)" if o.name == "reverse_kl_support" else ""
        _fail(f"{o.name} needs support in {list(declared.fields)}, got support={o.support!r}{dense}")
    if o.name == "jsd" and o.support == "dense" and (o.renormalize or o.tail_bucket):
        _fail("jsd with support='dense' is already normalised: set renormalize/tail_bucket False")


# ----------------------------------------------------------------------------- what each role computes
def fields_of(opts: LossOptions) -> Fields:
    """The declared Fields of opts' estimator (picked by opts.support where it has several)."""
    f = ESTIMATORS[opts.name].fields
    return f[opts.support] if isinstance(f, dict) else f


def _reads_behavior(opts):
    return opts.ratio or opts.advantage == "old"  # b is the ratio's denominator and A_old's baseline


@dataclass(frozen=True)
class Needs:
    """What each role computes for one LossOptions (built by needs)."""
    rollout: frozenset  # the rollout fields read
    student_topk: int  # the engine's generate(student_topk=): K_s if a student_topk_* field is read, else 0
    mc_samples: int  # the engine's generate(mc_samples=): M if an mc_* field of the rollout is read, else 0
    teacher: frozenset  # teacher_cache.score's fields
    student_ids: tuple  # the learner's id fields for gather_logprobs
    proximal: dict  # decoupled: {id field: the field where the learner puts the student's log-probs at those ids}

    @property
    def fields(self) -> frozenset:
        return frozenset(CORE) | self.rollout | self.teacher | set(self.proximal.values())


@functools.cache  # options are frozen: each role asks, the answer is derived once
def needs(opts: LossOptions) -> Needs:
    """Per role, what to compute for opts: its declaration with the options applied."""
    f = fields_of(opts)
    rollout = frozenset(f.rollout + (f.behavior if _reads_behavior(opts) else ()))
    # the engines write student_topk_* only if student_topk > 0, mc_* only if mc_samples > 0
    return Needs(rollout=rollout, teacher=frozenset(f.teacher), student_ids=f.ids,
                 student_topk=opts.student_topk if rollout & {"student_topk_ids", "student_topk_behavior_logp"} else 0,
                 mc_samples=opts.samples if rollout & {"mc_ids", "mc_behavior_logp"} else 0,
                 proximal=dict(zip(f.ids, f.proximal, strict=True)) if opts.decoupled else {})


def required_fields(opts: LossOptions) -> frozenset:
    """Every cache field the estimator reads (rollout, teacher and learner-added ones)."""
    return needs(opts).fields


def student_ids(cache: Tensors, opts: LossOptions) -> dict:
    """{id field: its ids in cache} for gather_logprobs ("dense": None); a missing field is a one-line error."""
    return {f: None if f == "dense" else _need(cache, f, opts) for f in needs(opts).student_ids}


# ----------------------------------------------------------------------------- student log-probs
class _ChunkedGatherLogProb(torch.autograd.Function):
    """log_softmax(hidden @ weight.T / temperature) gathered at ids, chunk by chunk over positions.

    Forward keeps only the [N, K] gathered values and the [N] logsumexp; backward recomputes each chunk's logits z
    and uses dL/dz = scatter_add(g at ids) - softmax(z) * sum_k g_k (/ temperature for dL/dlogits). Peak extra memory:
    one float32 [chunk, V] buffer plus, in backward, the weight's gradient (and a float32 copy of a bf16/fp16 weight).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, temperature: float,
                chunk_size: int) -> torch.Tensor:
        w32 = weight.to(_compute_dtype(weight))  # no copy when the weight already is float32
        out = torch.empty(ids.shape, dtype=w32.dtype, device=hidden.device)
        lse = torch.empty(ids.shape[0], dtype=w32.dtype, device=hidden.device)
        for a in range(0, ids.shape[0], chunk_size):
            z = _chunk_logits(hidden[a:a + chunk_size], w32, temperature)
            out[a:a + chunk_size] = z.gather(1, ids[a:a + chunk_size])
            m = z.amax(dim=1, keepdim=True)
            lse[a:a + chunk_size] = m.squeeze(1) + z.sub_(m).exp_().sum(1).log()  # in place: one [C, V] buffer
            del z  # free it before the next chunk allocates its own (else two are alive at the peak)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out - lse[:, None]

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple:
        hidden, weight, ids, lse = ctx.saved_tensors
        temperature, C = ctx.temperature, ctx.chunk_size
        w32 = weight.to(_compute_dtype(weight))
        grad_h = torch.empty(hidden.shape, dtype=w32.dtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w32) if ctx.needs_input_grad[1] else None
        g = g.to(w32.dtype)
        for a in range(0, ids.shape[0], C):
            h, gc = hidden[a:a + C].to(w32.dtype), g[a:a + C]
            dz = _chunk_logits(h, w32, temperature).sub_(lse[a:a + C, None]).exp_()  # softmax(z), in place
            dz.mul_(-gc.sum(1, keepdim=True)).scatter_add_(1, ids[a:a + C], gc)  # scatter_add: duplicate ids add up
            if temperature != 1.0:
                dz.div_(temperature)  # z = logits / temperature
            if grad_h is not None:
                grad_h[a:a + C] = dz @ w32
            if grad_w is not None:
                grad_w.addmm_(dz.T, h)
            del dz
        grad_h = grad_h.to(hidden.dtype) if grad_h is not None else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None


def _compute_dtype(weight):
    """float32 for bf16/fp16/fp32 weights (logits in fp32 even when hidden is bf16); float64 stays float64."""
    return torch.promote_types(weight.dtype, torch.float32)


def _chunk_logits(h, w32, temperature):
    z = h.to(w32.dtype) @ w32.T
    return z.div_(temperature) if temperature != 1.0 else z


def gather_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: dict, temperature: float = 1.0,
                    chunk_size: int = 1024) -> Tensors:
    """Current-student log-probs log_softmax(hidden @ W.T / temperature) at the ids of each field.

    hidden [N, H] (rows as in the shift convention), lm_head_weight [V, H], ids {field: LongTensor [N] or [N, k]};
    the key "dense" (value ignored) asks for the full [N, V] log-softmax (V <= MAX_DENSE_VOCAB). All id fields are
    gathered in one chunked pass (concatenated, split after): exact gradients, no float32 [N, V] tensor for the batch.
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        _fail(f"gather_logprobs needs hidden [N, H] and lm_head_weight [V, H], got {tuple(hidden.shape)} and "
              f"{tuple(lm_head_weight.shape)}: select the response rows first")
    N, V = hidden.shape[0], lm_head_weight.shape[0]
    sparse = {k: v for k, v in ids.items() if k != "dense"}
    for k, v in sparse.items():
        if not torch.is_tensor(v):
            _fail(f"ids[{k!r}] is {type(v).__name__}, not a tensor: the cache lacks {k!r} (see required_fields)")
        if v.dtype != torch.int64 or v.shape[0] != N or v.dim() > 2:
            _fail(f"ids[{k!r}] must be int64 [N={N}] or [N, k], got {v.dtype} {tuple(v.shape)}: pass cache fields")
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= V):
            _fail(f"ids[{k!r}] has values outside [0, {V}): the cache and the student disagree on the vocabulary")
    if "dense" in ids:
        if V > MAX_DENSE_VOCAB:
            _fail(f"dense student log-probs need float32 [N, V] with V={V} > {MAX_DENSE_VOCAB}: "
                  "use a finite-support estimator")
        full = _chunk_logits(hidden, lm_head_weight.to(_compute_dtype(lm_head_weight)), temperature).log_softmax(-1)
        return {"dense": full} | {k: full.gather(1, v.view(N, -1)).view(v.shape) for k, v in sparse.items()}
    if not sparse:
        return {}
    flat = torch.cat([v.view(N, -1) for v in sparse.values()], dim=1)
    gathered = _ChunkedGatherLogProb.apply(hidden, lm_head_weight, flat, float(temperature), int(chunk_size))
    parts = gathered.split([v.view(N, -1).shape[1] for v in sparse.values()], dim=1)
    return {k: part.reshape(v.shape) for (k, v), part in zip(sparse.items(), parts, strict=True)}


# ----------------------------------------------------------------------------- helpers
def _masked_mean(x, valid):
    """Mean of x over valid entries (valid broadcasts to x), as a float; 0.0 when none is valid."""
    x, valid = x.detach(), valid.expand_as(x)
    return float(x[valid].double().mean()) if bool(valid.any()) else 0.0


def _need(cache, name, opts):
    if name not in cache:
        _fail(f"cache has no {name!r}, needed by {opts.name}: compute what estimators.needs(opts) lists for each role")
    return cache[name]


def _field(cache, name, like, opts):
    """cache[name] in like's dtype, 0 on masked rows; a missing field is an error that names the estimator needing it.

    Masked rows may hold -inf (a teacher or behaviour policy giving a padding row no mass): aggregate() drops their
    values, but a -inf inside the formula would still make the backward 0 * inf = NaN, so they never enter it."""
    x, keep = _need(cache, name, opts).to(like.dtype), cache["loss_mask"].bool()
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, torch.zeros_like(x))


def _xlogratio(logp, logq):
    """e^logp * (logp - logq), with 0 where e^logp == 0 (so t = -inf rows cannot give nan)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def _log_tail(logp):
    """log(1 - sum_k e^logp_k): the log mass outside a finite support, stable and clamped at tiny."""
    mass = -torch.expm1(torch.logsumexp(logp, dim=-1, keepdim=True))
    return mass.clamp(min=torch.finfo(logp.dtype).tiny).log()


def _support_logps(s, cache, opts):
    """Student and teacher log-probs on the finite support opts reads (forward_kl_topk, reverse_kl_support, jsd), and
    metrics: their mass there as read (before renormalisation), mean over response tokens.

    The support is the declaration's one id field, t the teacher field beside it. Bare: as read, the mass outside the
    support dropped. renormalize: e^{s_k} / sum e^s and e^{t_k} / sum e^t. tail_bucket: one extra category for the
    mass outside the support on both sides (student tail = 1 - sum_k e^{s_k}), so the KL is the exact KL of the
    coarsened distributions.
    """
    f = fields_of(opts)
    (ids,), (t_name,) = f.ids, [name for name in f.teacher if name not in f.ids]
    s_k, t_k, valid = s[ids], _field(cache, t_name, s[ids], opts), cache["loss_mask"].bool()
    metrics = {"student_mass": _masked_mean(s_k.exp().sum(-1), valid),
               "teacher_mass": _masked_mean(t_k.exp().sum(-1), valid)}
    if opts.renormalize:
        return s_k - torch.logsumexp(s_k, -1, keepdim=True), t_k - torch.logsumexp(t_k, -1, keepdim=True), metrics
    if opts.tail_bucket:
        return torch.cat([s_k, _log_tail(s_k)], -1), torch.cat([t_k, _log_tail(t_k)], -1), metrics
    return s_k, t_k, metrics


# ----------------------------------------------------------------------------- forward KL (teacher-weighted)
@estimator(_TEACHER_TOPK, finite_support=True)
def forward_kl_topk(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Forward KL on the teacher's top-K: sum_{k in topK(q)} e^{t_k} (t_k - s_k).

    Needs teacher_topk_ids, teacher_topk_logp. Bare: K = V is exactly KL(q || p_theta), K < V a truncation that still
    pulls student mass onto the top-K (gradient not 0 at p_theta = q); tail_bucket (see _support_logps): the exact KL
    of the coarsened distributions. Bias: truncation only. Variance: none. Staleness: none (teacher weights).
    """
    s_k, t_k, metrics = _support_logps(s, cache, opts)
    return _xlogratio(t_k, s_k).sum(-1), metrics


@estimator(_DENSE)
def forward_kl_dense(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Exact forward KL(q || p_theta) = sum_v e^{t_v} (t_v - s_v) over the whole vocabulary.

    Needs teacher_dense_logp [N, V] and s["dense"]; for small vocabularies and tests. Exact, no variance or staleness.
    """
    return _xlogratio(_field(cache, "teacher_dense_logp", s["dense"], opts), s["dense"]).sum(-1), {}


@estimator(Fields(ids=("teacher_mc_ids",), teacher=("teacher_mc_ids", "teacher_mc_logp")))
def forward_kl_mc(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Monte Carlo forward KL with M teacher samples y_i ~ q: mean_i (t(y_i) - s(y_i)).

    Needs teacher_mc_ids, teacher_mc_logp. Value and gradient -mean_i grad s(y_i) are unbiased for KL(q || p_theta)
    and its gradient (E_q[grad s] is the cross-entropy's gradient). Variance ~1/M. Staleness: none, the samples come
    from the frozen teacher (b unused). Zero only in expectation at p_theta = q: one draw has a non-zero gradient.
    """
    s_y = s["teacher_mc_ids"]
    t_y = _field(cache, "teacher_mc_logp", s_y, opts)
    return (t_y - s_y).mean(-1), {}


# ----------------------------------------------------------------------------- reverse KL (student-weighted)
@estimator(_DENSE)
def reverse_kl_dense(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Exact reverse KL(p_theta || q) = sum_v e^{s_v} (s_v - t_v) over the whole vocabulary.

    Needs teacher_dense_logp [N, V] and s["dense"]. Exact, no variance, no staleness (current student).
    """
    return _xlogratio(s["dense"], _field(cache, "teacher_dense_logp", s["dense"], opts)).sum(-1), {}


@estimator({"student_topk": _STUDENT_TOPK, "teacher_topk": _TEACHER_TOPK}, finite_support=True)
def reverse_kl_support(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Reverse KL on a finite support S: sum_{k in S} e^{s_k} (s_k - t_k).

    S = the rollout student's top-K_s (support="student_topk": student_topk_ids, student_topk_teacher_logp) or the
    teacher's top-K (support="teacher_topk": teacher_topk_ids, teacher_topk_logp). Bias: ignores student mass outside
    S, so it can be negative when bare (see _support_logps). Variance: none. Staleness: S was fixed by the rollout
    student; where the current student moves mass off S, no reweighting recovers the missing teacher scores.
    """
    s_k, t_k, metrics = _support_logps(s, cache, opts)
    return _xlogratio(s_k, t_k).sum(-1), metrics


def _m2po_bounds(log_ratio, adv, valid, opts):
    """M2PO clip bounds (eps_low, eps_high) from the valid entries, or None when within budget.

    delta = b - s (= -log r); harmful entries push r further out: (A > 0 and r > 1) or (A < 0 and r < 1). No clip if
    mean delta^2 over the n harmful entries <= budget; else solve sum_i min(delta_i^2, tau^2) = budget * n for tau
    (piecewise linear in tau^2: walk the sorted delta^2); eps_low = 1 - e^{-tau}, eps_high = e^{tau} - 1, floored.
    """
    delta2 = log_ratio.detach().square()
    harmful = valid.expand_as(delta2) & (((adv > 0) & (log_ratio > 0)) | ((adv < 0) & (log_ratio < 0)))
    x = delta2[harmful].double().sort().values
    n = x.numel()
    m2 = float(x.mean()) if n else 0.0
    metrics = {"m2po_m2": m2, "m2po_harmful_frac": _masked_mean(harmful.float(), valid)}
    if m2 <= opts.m2po_budget:
        return None, metrics
    prefix = torch.cat([x.new_zeros(1), x.cumsum(0)[:-1]])  # prefix[j] = sum of the j smallest
    below = torch.arange(n, dtype=x.dtype, device=x.device)
    f_at_x = prefix + x * (n - below)  # sum_i min(delta_i^2, x_j) at tau^2 = x_j: increasing in j
    j = int(torch.searchsorted(f_at_x, torch.tensor([opts.m2po_budget * n], dtype=x.dtype, device=x.device)))
    tau = math.sqrt((opts.m2po_budget * n - float(prefix[j])) / (n - j))  # tau^2 lies in [x_{j-1}, x_j]
    lo = max(1 - math.exp(-tau), opts.m2po_floor_low)
    hi = max(math.exp(tau) - 1, opts.m2po_floor_high)
    return (lo, hi), metrics | {"m2po_tau": tau, "m2po_eps_low": lo, "m2po_eps_high": hi}


def _policy_gradient(s, cache, opts):
    """reverse_kl_pg's per-sample loss -r * A at the declared ids: [N] (token_ids) or [N, M] (mc_ids)."""
    f = fields_of(opts)
    (ids,), (t_name,), (b_name,), (prox_name,) = f.ids, f.teacher, f.behavior, f.proximal
    s_y, valid = s[ids], cache["loss_mask"].bool()
    valid = valid[:, None] if s_y.dim() == 2 else valid  # broadcasts against [N] or [N, M]
    t_y = _field(cache, t_name, s_y, opts)
    b_y = _field(cache, b_name, s_y, opts) if _reads_behavior(opts) else None
    prox_y = _field(cache, prox_name, s_y, opts) if opts.decoupled else None
    adv = (t_y - s_y).detach() if opts.advantage == "theta" else t_y - b_y
    base = prox_y if opts.decoupled else (b_y if opts.ratio else s_y.detach())
    log_ratio = (s_y - base).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()  # value 1 with ratio=False, but its gradient is ratio * grad s
    metrics = {"ratio_mean": _masked_mean(ratio, valid), "advantage_mean": _masked_mean(adv, valid)}
    if opts.tis_cap > 0:
        weight = ratio.detach().clamp(max=opts.tis_cap)
        metrics["tis_capped_frac"] = _masked_mean((ratio.detach() > opts.tis_cap).float(), valid)
        return -weight * adv * torch.exp(s_y - s_y.detach()), metrics  # value -min(r,cap)A, grad -min(r,cap)A grad s
    bounds = (opts.clip_eps, opts.clip_eps) if opts.clip_eps > 0 else None
    if opts.m2po_budget > 0:
        bounds, m2po_metrics = _m2po_bounds(log_ratio, adv, valid, opts)
        metrics |= m2po_metrics
    loss = -ratio * adv
    if bounds is not None:
        clipped = -ratio.clamp(1 - bounds[0], 1 + bounds[1]) * adv
        metrics["clip_frac"] = _masked_mean((clipped > loss).float(), valid)
        loss = torch.maximum(loss, clipped)
    if opts.decoupled:
        behave = (prox_y - b_y).exp()
        metrics["behave_zeroed_frac"] = _masked_mean((behave > opts.behave_cap).float(), valid)
        loss = torch.where(behave > opts.behave_cap, torch.zeros_like(behave), behave) * loss
    return loss, metrics


@estimator(Fields(ids=("token_ids",), rollout=("token_ids",), teacher=("teacher_logp",), behavior=("behavior_logp",),
                  proximal=("proximal_logp",)), policy_gradient=True)
def reverse_kl_pg(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Sampled reverse KL as a policy gradient on the generated token y ~ p_b: loss = -r * A.

    r = exp(clamp(s(y) - b(y), +-20)) (ratio=False: r = exp(s - sg(s)), value 1, plain score function);
    A = sg(t(y) - s(y)) (advantage="theta") or t(y) - b(y) (advantage="old"). Needs token_ids, teacher_logp,
    behavior_logp (+ proximal_logp when decoupled). With A_theta and the ratio, E_{y~p_b}[grad] =
    -E_{p_theta}[(t - s) grad s] = grad KL(p_theta || q) at that position (E_{p_theta}[grad s] = 0) and E[value] =
    KL(p_theta || q): unbiased, whatever the staleness, if p_b covers p_theta. A_old leaves an O(s - b) bias.
    Variance: high (one sample). Stabilisers (each biased where it acts):
      clip_eps    PPO: max(-r A, -clip(r, 1 - eps, 1 + eps) A).
      tis_cap     truncated IS: -sg(min(r, cap)) A exp(s - sg(s)); value -min(r, cap) A, grad -min(r, cap) A grad s.
      decoupled   AReaL: r = p_theta / p_prox (prox = student before the batch's first optimizer step), PPO clip on
                  that r (if clip_eps > 0), times w = p_prox / p_b, with w := 0 where w > behave_cap.
      m2po_budget M2PO: PPO clip, bounds from the 2nd moment of b - s over the call's unmasked entries (_m2po_bounds).
    """
    return _policy_gradient(s, cache, opts)


@estimator(Fields(ids=("mc_ids",), rollout=("mc_ids",), teacher=("mc_teacher_logp",), behavior=("mc_behavior_logp",),
                  proximal=("mc_proximal_logp",)), policy_gradient=True)
def reverse_kl_mc(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Multi-sample MC reverse KL: mean over M behaviour samples of reverse_kl_pg's per-sample loss.

    mc_ids [N, M]: column 0 = the generated token, columns 1..M-1 i.i.d. draws from p_b (duplicates kept). Needs
    mc_ids, mc_teacher_logp, mc_behavior_logp (+ mc_proximal_logp). Options as in reverse_kl_pg (M2PO over all
    unmasked [N, M] entries). With A_theta and the ratio: unbiased for grad KL(p_theta || q), variance ~1/M of pg's.
    """
    per_sample, metrics = _policy_gradient(s, cache, opts)
    return per_sample.mean(-1), metrics


# ----------------------------------------------------------------------------- generalised JSD
@estimator({"student_topk": _STUDENT_TOPK, "teacher_topk": _TEACHER_TOPK, "dense": _DENSE}, finite_support=True)
def jsd(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """Generalised JSD(beta) between teacher P = e^t and student Q = e^s, scaled to be continuous at 0 and 1.

    With M = beta P + (1 - beta) Q:  D = [beta KL(P || M) + (1 - beta) KL(Q || M)] / (beta (1 - beta))
                                       = KL(P || M) / (1 - beta) + KL(Q || M) / beta.
    beta -> 0 gives forward KL(P || Q), beta -> 1 reverse KL(Q || P), computed at the endpoints as these limits:
    elementwise P log(P/Q) - P + Q (resp. Q log(Q/P) - Q + P). The extra -P + Q sums to 0 on a dense, renormalised or
    tail-bucket support, where the endpoints are exactly forward_kl_* / reverse_kl_*; on a bare finite support each
    term stays >= 0. Needs the fields of opts.support. Bias/variance/staleness: as the support it runs on. In float32,
    prefer the exact endpoints to beta within ~1e-3 of them (the division by beta cancels digits).
    """
    logq, logp, _ = _support_logps(s, cache, opts)
    beta = float(opts.beta)
    if beta == 0.0:
        return (_xlogratio(logp, logq) - logp.exp() + logq.exp()).sum(-1), {}
    if beta == 1.0:
        return (_xlogratio(logq, logp) - logq.exp() + logp.exp()).sum(-1), {}
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return (_xlogratio(logp, logm) / (1 - beta) + _xlogratio(logq, logm) / beta).sum(-1), {}


# ----------------------------------------------------------------------------- aggregation
def aggregate(per_token: torch.Tensor, loss_mask: torch.Tensor, cu_seqlens: torch.Tensor,
              mode: str = "token_mean") -> torch.Tensor:
    """Scalar loss from per-token losses [N]; masked rows contribute nothing (values and gradients).

    token_mean: sum over unmasked rows / their count (every response token weighs the same).
    seq_mean:   mean over sequences (with >= 1 unmasked row) of each sequence's unmasked-token mean.
    An all-masked batch gives 0 that still has a gradient (zeros), so backward() works everywhere.
    """
    mask = loss_mask.bool()
    kept = torch.where(mask, per_token, torch.zeros_like(per_token))  # where, not *: garbage rows stay out
    if mode == "token_mean":
        return kept.sum() / mask.sum().clamp(min=1)
    if mode != "seq_mean":
        _fail(f"unknown aggregation mode={mode!r}: choose token_mean or seq_mean")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if (covered := int(lengths.sum())) != per_token.shape[0]:
        _fail(f"cu_seqlens covers {covered} rows but per_token has {per_token.shape[0]}: pass the batch's cu_seqlens")
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=per_token.device), lengths)
    sums = kept.new_zeros(len(lengths)).index_add(0, seq, kept)
    counts = kept.new_zeros(len(lengths)).index_add(0, seq, mask.to(kept.dtype))
    has = counts > 0
    return torch.where(has, sums / counts.clamp(min=1), torch.zeros_like(sums)).sum() / has.sum().clamp(min=1)


def compute_loss(s: Tensors, cache: Tensors, opts: LossOptions) -> tuple[torch.Tensor, dict]:
    """The estimator named in opts, aggregated: (scalar loss, metrics)."""
    per_token, metrics = ESTIMATORS[opts.name].fn(s, cache, opts)
    return aggregate(per_token, cache["loss_mask"], cache["cu_seqlens"], opts.aggregation), metrics
