"""Tests for estimators.py: every estimator against float64 references written from its definition,
limits, unbiasedness and variance of the MC estimators, alignment on a tiny Qwen2, masking, the
stabilisers on hand-worked numbers, and the chunked student gather. CPU only, no downloads."""
import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

import batch_format
import config
import estimators as E
import learner
import rollout
import schedule
import task
import teacher_cache
from asyncopd import opd_reference
from runtime import preflight

LENGTHS = (3, 1, 5, 2, 4)  # ragged sequences; the 1-token one has first == last token
MASKED = (2, 7)  # rows with loss_mask False in the reference tests


def opts(name, **kw):
    o = E.LossOptions(name=name, **kw)
    E.validate_options(o)
    return o


# one entry per estimator/option combination that the reference, masking and zero tests run over
CONFIGS = {
    "fwd_topk": opts("forward_kl_topk"),
    "fwd_topk_tail": opts("forward_kl_topk", tail_bucket=True),
    "fwd_topk_renorm": opts("forward_kl_topk", renormalize=True),
    "fwd_dense": opts("forward_kl_dense"),
    "fwd_mc": opts("forward_kl_mc"),
    "rev_dense": opts("reverse_kl_dense"),
    "rev_support_student": opts("reverse_kl_support"),
    "rev_support_teacher": opts("reverse_kl_support", support="teacher_topk"),
    "rev_support_renorm": opts("reverse_kl_support", renormalize=True),
    "rev_support_tail": opts("reverse_kl_support", tail_bucket=True),
    "jsd_dense": opts("jsd", support="dense", beta=0.3),
    "jsd_dense_0": opts("jsd", support="dense", beta=0.0),
    "jsd_dense_1": opts("jsd", support="dense", beta=1.0),
    "jsd_student": opts("jsd", beta=0.7),
    "jsd_teacher_renorm": opts("jsd", support="teacher_topk", renormalize=True),
    "jsd_teacher_tail": opts("jsd", support="teacher_topk", tail_bucket=True, beta=0.2),
}
for _name, _tag in (("reverse_kl_pg", "pg"), ("reverse_kl_mc", "mc")):
    CONFIGS |= {
        f"{_tag}_theta": opts(_name),
        f"{_tag}_old": opts(_name, advantage="old"),
        f"{_tag}_noratio": opts(_name, ratio=False),
        f"{_tag}_clip": opts(_name, clip_eps=0.2),
        f"{_tag}_tis": opts(_name, tis_cap=1.5),
        f"{_tag}_decoupled": opts(_name, decoupled=True, clip_eps=0.2, behave_cap=1.5),
        f"{_tag}_m2po": opts(_name, m2po_budget=0.05),
    }
# estimators that are a divergence of two complete distributions, or whose gradient -r A grad s has A = 0:
# they have zero gradient at teacher == student; bare truncations and single MC draws do not
ZERO_GRAD_AT_EQUALITY = {k for k in CONFIGS
                         if k not in ("fwd_topk", "fwd_mc", "rev_support_student", "rev_support_teacher")}


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def make_case(seed, lengths=LENGTHS, V=60, K=8, Ks=6, M=5, Mt=7, stale=0.7, masked=MASKED, same=False):
    """(z, cache): current-student logits z [N, V] (float64 leaf) and a full float64 cache. The behaviour
    (and proximal) logits are z plus noise (stale); same=True makes teacher == behaviour == student."""
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    z = 2 * torch.randn(N, V, generator=g, dtype=torch.float64)
    zb = z + stale * torch.randn(N, V, generator=g, dtype=torch.float64)
    zp = (z + zb) / 2 + 0.2 * stale * torch.randn(N, V, generator=g, dtype=torch.float64)
    zt = 2 * torch.randn(N, V, generator=g, dtype=torch.float64)
    if same:
        zb = zp = zt = z
    t, b, prox = (torch.log_softmax(x, -1) for x in (zt, zb, zp))
    mc_ids = torch.multinomial(b.exp(), M, replacement=True, generator=g)
    t_mc_ids = torch.multinomial(t.exp(), Mt, replacement=True, generator=g)
    top_t, s_top = t.topk(K, dim=-1), b.topk(Ks, dim=-1).indices
    mask = torch.ones(N, dtype=torch.bool)
    mask[list(masked)] = False
    y = mc_ids[:, :1]
    cache = {
        "cu_seqlens": cu_seqlens(lengths), "loss_mask": mask, "token_ids": y[:, 0],
        "behavior_logp": b.gather(1, y)[:, 0], "teacher_logp": t.gather(1, y)[:, 0],
        "proximal_logp": prox.gather(1, y)[:, 0],
        "teacher_topk_ids": top_t.indices, "teacher_topk_logp": top_t.values,
        "student_topk_ids": s_top, "student_topk_behavior_logp": b.gather(1, s_top),
        "student_topk_teacher_logp": t.gather(1, s_top),
        "mc_ids": mc_ids, "mc_behavior_logp": b.gather(1, mc_ids), "mc_teacher_logp": t.gather(1, mc_ids),
        "mc_proximal_logp": prox.gather(1, mc_ids),
        "teacher_mc_ids": t_mc_ids, "teacher_mc_logp": t.gather(1, t_mc_ids),
        "teacher_dense_logp": t,
    }
    return z.requires_grad_(), cache


def student_inputs(z, cache, o):
    """The s dict an estimator gets: current-student log-probs at its id fields (naive full log-softmax)."""
    s = torch.log_softmax(z, -1)
    return {f: s if ids is None else s.gather(1, ids.view(len(s), -1)).view(ids.shape)
            for f, ids in E.student_ids(cache, o).items()}


def estimator_loss(z, cache, o):
    per_token, metrics = E.ESTIMATORS[o.name].fn(student_inputs(z, cache, o), cache, o)
    return E.aggregate(per_token, cache["loss_mask"], cache["cu_seqlens"], o.aggregation), metrics


# ----------------------------------------------------------------------------- float64 references
def _m2po_bounds_bisection(log_ratio, adv, valid, o):
    """M2PO bounds by bisection on tau^2 (independent of the sorted walk in estimators.py)."""
    harmful = valid & (((adv > 0) & (log_ratio > 0)) | ((adv < 0) & (log_ratio < 0)))
    d2 = log_ratio.detach()[harmful] ** 2
    if d2.numel() == 0 or d2.mean() <= o.m2po_budget:
        return None
    lo, hi = 0.0, float(d2.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        within = float(torch.minimum(d2, torch.tensor(mid)).sum()) < o.m2po_budget * d2.numel()
        lo, hi = (mid, hi) if within else (lo, mid)
    tau = math.sqrt(lo)
    return max(1 - math.exp(-tau), o.m2po_floor_low), max(math.exp(tau) - 1, o.m2po_floor_high)


def reference(o, z, cache):
    """(value, surrogate): the token-mean loss from the definitions in float64, and a scalar whose
    gradient w.r.t. z is the reference gradient (the same scalar except for truncated IS)."""
    q = torch.softmax(z, -1)  # student probabilities
    P = cache["teacher_dense_logp"].exp()  # teacher probabilities
    mask = cache["loss_mask"]
    surrogate = None
    if o.name == "forward_kl_dense":
        value = (P * torch.log(P / q)).sum(-1)
    elif o.name == "reverse_kl_dense":
        value = (q * torch.log(q / P)).sum(-1)
    elif o.name == "forward_kl_mc":
        ids = cache["teacher_mc_ids"]
        value = (torch.log(P.gather(1, ids)) - torch.log(q.gather(1, ids))).mean(-1)
    elif o.name in ("forward_kl_topk", "reverse_kl_support", "jsd"):
        on_student = o.name != "forward_kl_topk" and o.support == "student_topk"
        ids = cache["student_topk_ids"] if on_student else cache["teacher_topk_ids"]
        Pk, Qk = (P, q) if o.support == "dense" and o.name == "jsd" else (P.gather(1, ids), q.gather(1, ids))
        if o.renormalize:
            Pk, Qk = Pk / Pk.sum(-1, keepdim=True), Qk / Qk.sum(-1, keepdim=True)
        if o.tail_bucket:  # the mass outside the support, summed over the complement (not 1 - sum)
            outside = torch.ones_like(P).scatter(1, ids, 0.0)
            Pk = torch.cat([Pk, (P * outside).sum(-1, keepdim=True)], -1)
            Qk = torch.cat([Qk, (q * outside).sum(-1, keepdim=True)], -1)
        if o.name == "forward_kl_topk":
            value = (Pk * torch.log(Pk / Qk)).sum(-1)
        elif o.name == "reverse_kl_support":
            value = (Qk * torch.log(Qk / Pk)).sum(-1)
        elif o.beta == 0:
            value = (Pk * torch.log(Pk / Qk) - Pk + Qk).sum(-1)
        elif o.beta == 1:
            value = (Qk * torch.log(Qk / Pk) - Qk + Pk).sum(-1)
        else:
            Mx = o.beta * Pk + (1 - o.beta) * Qk
            value = (o.beta * (Pk * torch.log(Pk / Mx)).sum(-1)
                     + (1 - o.beta) * (Qk * torch.log(Qk / Mx)).sum(-1)) / (o.beta * (1 - o.beta))
    elif o.name in ("reverse_kl_pg", "reverse_kl_mc"):  # per sample, then the mean over samples
        mc = o.name == "reverse_kl_mc"
        ids = cache["mc_ids"] if mc else cache["token_ids"][:, None]
        b = cache["mc_behavior_logp" if mc else "behavior_logp"].view(ids.shape)
        prox = cache["mc_proximal_logp" if mc else "proximal_logp"].view(ids.shape)
        s_y, t_y = torch.log(q.gather(1, ids)), torch.log(P.gather(1, ids))
        A = (t_y - s_y).detach() if o.advantage == "theta" else t_y - b
        r = torch.exp(s_y - (prox if o.decoupled else b)) if o.ratio else torch.exp(s_y - s_y.detach())
        if o.tis_cap > 0:
            value = -torch.clamp(r, max=o.tis_cap) * A
            surrogate = -torch.clamp(r, max=o.tis_cap).detach() * A * s_y  # d/dz = -min(r, cap) A grad s
        else:
            bounds = (o.clip_eps, o.clip_eps) if o.clip_eps > 0 else None
            if o.m2po_budget > 0:
                bounds = _m2po_bounds_bisection(s_y - b, A, mask[:, None].expand_as(s_y), o)
            objective = r * A
            if bounds is not None:  # PPO: the pessimistic (min) of the unclipped and clipped objectives
                objective = torch.minimum(objective, torch.clamp(r, 1 - bounds[0], 1 + bounds[1]) * A)
            value = -objective
            if o.decoupled:
                w = torch.exp(prox - b)
                value = torch.where(w > o.behave_cap, 0.0, w) * value
        value, surrogate = value.mean(-1), surrogate.mean(-1) if surrogate is not None else None
    else:
        raise ValueError(f"no float64 reference for estimator {o.name}: write one here (README: Adding an estimator)")
    masked_mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    return masked_mean(value), masked_mean(surrogate if surrogate is not None else value)


def grad_of(scalar, z):
    (g,) = torch.autograd.grad(scalar, z, retain_graph=True)
    return g


# ----------------------------------------------------------------------------- estimators vs references
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_estimator_matches_float64_reference(key, seed):
    o = CONFIGS[key]
    z, cache = make_case(seed, V=[60, 300, 1000][seed])
    loss, _ = estimator_loss(z, cache, o)
    ref_value, ref_surrogate = reference(o, z, cache)
    assert abs(loss.item() - ref_value.item()) <= 1e-9 * (1 + abs(ref_value.item()))
    g, g_ref = grad_of(loss, z), grad_of(ref_surrogate, z)
    assert g.abs().max() > 0
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-11)


def test_stabilisers_are_active_in_the_reference_cases():
    """The reference cases above really exercise clipping, zeroed behaviour weights and M2PO clipping."""
    z, cache = make_case(0)
    for key, metric in (("mc_clip", "clip_frac"), ("mc_tis", "tis_capped_frac"), ("mc_decoupled", "behave_zeroed_frac"),
                        ("mc_m2po", "clip_frac"), ("pg_m2po", "m2po_eps_high")):
        assert estimator_loss(z, cache, CONFIGS[key])[1][metric] > 0, key


def test_truncated_forward_kl_gradient_formula():
    """Bare top-K forward KL: d loss / d z_j = p_theta(j) sum_k q_k - q_j [j in topK] (per row)."""
    z, cache = make_case(3, masked=())
    o = CONFIGS["fwd_topk"]
    per_token, _ = E.forward_kl_topk(student_inputs(z, cache, o), cache, o)
    g = grad_of(per_token.sum(), z)
    p, q = torch.softmax(z, -1).detach(), cache["teacher_dense_logp"].exp()
    q_top = torch.zeros_like(q).scatter(1, cache["teacher_topk_ids"], q.gather(1, cache["teacher_topk_ids"]))
    torch.testing.assert_close(g, p * q_top.sum(-1, keepdim=True) - q_top, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_seq_mean_aggregation(seed):
    z, cache = make_case(seed)
    o = replace(CONFIGS["mc_theta"], aggregation="seq_mean")
    per_token, _ = E.reverse_kl_mc(student_inputs(z, cache, o), cache, o)
    got = E.aggregate(per_token, cache["loss_mask"], cache["cu_seqlens"], "seq_mean")
    means, cu = [], cache["cu_seqlens"].tolist()
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        keep = cache["loss_mask"][a:b]
        if keep.any():
            means.append(per_token[a:b][keep].mean())
    torch.testing.assert_close(got, torch.stack(means).mean())
    torch.testing.assert_close(grad_of(got, z), grad_of(torch.stack(means).mean(), z))


# ----------------------------------------------------------------------------- limits and equality
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_equals_dense_when_k_is_v(seed):
    V = 40
    z, cache = make_case(seed, V=V, K=V, Ks=V)
    dense_f = estimator_loss(z, cache, CONFIGS["fwd_dense"])[0]
    dense_r = estimator_loss(z, cache, CONFIGS["rev_dense"])[0]
    for key, dense in (("fwd_topk", dense_f), ("fwd_topk_tail", dense_f), ("fwd_topk_renorm", dense_f),
                       ("rev_support_teacher", dense_r), ("rev_support_student", dense_r),
                       ("rev_support_tail", dense_r)):
        loss = estimator_loss(z, cache, CONFIGS[key])[0]
        torch.testing.assert_close(loss, dense, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_of(loss, z), grad_of(dense, z), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_teacher_equals_student_gives_zero(key):
    o = CONFIGS[key]
    z, cache = make_case(4, same=True)
    loss, _ = estimator_loss(z, cache, o)
    assert abs(loss.item()) < 1e-12
    g = grad_of(loss, z)
    if key in ZERO_GRAD_AT_EQUALITY:
        assert float(g.abs().max()) < 1e-12
    else:  # bare truncations pull mass onto the support; one MC draw is only zero in expectation
        assert float(g.abs().max()) > 1e-3


@pytest.mark.parametrize("key", [k for k in CONFIGS
                                 if k.startswith(("pg_", "mc_")) and not k.endswith(("old", "noratio"))])
def test_a_theta_is_zero_at_teacher_equals_student_even_when_stale(key):
    """A_theta = t - s vanishes when the teacher equals the current student, however stale b is."""
    z, cache = make_case(5, stale=1.5)
    for f in ("teacher_logp", "mc_teacher_logp"):  # teacher := current student, behaviour stays stale
        ids = cache["token_ids"][:, None] if f == "teacher_logp" else cache["mc_ids"]
        cache[f] = torch.log_softmax(z.detach(), -1).gather(1, ids).view(cache[f].shape)
    loss, _ = estimator_loss(z, cache, CONFIGS[key])
    assert abs(loss.item()) < 1e-12 and float(grad_of(loss, z).abs().max()) < 1e-12


@pytest.mark.parametrize("support,renorm", [("dense", False), ("teacher_topk", False), ("teacher_topk", True)])
def test_jsd_is_continuous_at_the_endpoints(support, renorm):
    z, cache = make_case(6)
    o = opts("jsd", support=support, renormalize=renorm)
    for end in (0.0, 1.0):  # loss and gradient converge to the endpoint's, linearly in the distance
        at_end = estimator_loss(z, cache, replace(o, beta=end))[0]
        g_end = grad_of(at_end, z)
        gaps = []
        for d in (1e-6, 1e-7, 1e-8):
            near = estimator_loss(z, cache, replace(o, beta=abs(end - d)))[0]
            gaps.append((abs((near - at_end).item()), float((grad_of(near, z) - g_end).abs().max())))
        assert gaps[-1][0] < 1e-4 * abs(at_end.item()) and gaps[-1][1] < 1e-4 * float(g_end.abs().max())
        assert gaps[-1][0] < 0.03 * gaps[0][0] and gaps[-1][1] < 0.03 * gaps[0][1]
    if support == "dense":  # the endpoints are exactly the forward and reverse KLs
        torch.testing.assert_close(estimator_loss(z, cache, replace(o, beta=0.0))[0],
                                   estimator_loss(z, cache, CONFIGS["fwd_dense"])[0])
        torch.testing.assert_close(estimator_loss(z, cache, replace(o, beta=1.0))[0],
                                   estimator_loss(z, cache, CONFIGS["rev_dense"])[0])
    if renorm:
        torch.testing.assert_close(estimator_loss(z, cache, replace(o, beta=0.0))[0],
                                   estimator_loss(z, cache, CONFIGS["fwd_topk_renorm"])[0])
        rev_renorm = opts("reverse_kl_support", support="teacher_topk", renormalize=True)
        torch.testing.assert_close(estimator_loss(z, cache, replace(o, beta=1.0))[0],
                                   estimator_loss(z, cache, rev_renorm)[0])


# ----------------------------------------------------------------------------- unbiasedness and variance
def draws_case(seed, R, M, stale, V=12, teacher_draws=False):
    """One position repeated R times, each row with its own M i.i.d. draws (from b, or from the teacher)."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(V, generator=g, dtype=torch.float64)
    b = torch.log_softmax(z + stale * torch.randn(V, generator=g, dtype=torch.float64), -1)
    t = torch.log_softmax(1.5 * torch.randn(V, generator=g, dtype=torch.float64), -1)
    ids = torch.multinomial((t if teacher_draws else b).exp().expand(R, V), M, replacement=True, generator=g)
    cache = {"loss_mask": torch.ones(R, dtype=torch.bool), "cu_seqlens": torch.tensor([0, R]), "token_ids": ids[:, 0],
             "mc_ids": ids, "mc_behavior_logp": b[ids], "mc_teacher_logp": t[ids], "behavior_logp": b[ids[:, 0]],
             "teacher_logp": t[ids[:, 0]], "teacher_mc_ids": ids, "teacher_mc_logp": t[ids]}
    return z, t, cache


def per_draw_gradients(z, cache, o):
    """[R, V] gradients of the per-token loss w.r.t. the logits, one independent row per draw."""
    zr = z.expand(len(cache["loss_mask"]), -1).clone().requires_grad_()
    per_token, _ = E.ESTIMATORS[o.name].fn(student_inputs(zr, cache, o), cache, o)
    return grad_of(per_token.sum(), zr), per_token.detach()


def exact_gradient(z, t, name):
    zz = z.clone().requires_grad_()
    cache = {"teacher_dense_logp": t[None], "loss_mask": torch.ones(1, dtype=torch.bool)}
    per_token, _ = E.ESTIMATORS[name].fn({"dense": torch.log_softmax(zz, -1)[None]}, cache, opts(name))
    return grad_of(per_token.sum(), zz), per_token.detach()[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("M", [1, 16])
def test_mc_reverse_kl_is_unbiased_under_staleness_and_a_old_is_not(M, seed):
    z, t, cache = draws_case(seed, R=20000, M=M, stale=1.0)
    exact, kl = exact_gradient(z, t, "reverse_kl_dense")
    name = "reverse_kl_pg" if M == 1 else "reverse_kl_mc"
    g, values = per_draw_gradients(z, cache, opts(name))
    se = g.std(0) / math.sqrt(len(g))
    assert float(((g.mean(0) - exact).abs() / se).max()) < 5  # every coordinate within 5 standard errors
    assert abs(float(values.mean() - kl)) < 5 * float(values.std()) / math.sqrt(len(values))  # the value too
    g_old, _ = per_draw_gradients(z, cache, opts(name, advantage="old"))
    se_old = g_old.std(0) / math.sqrt(len(g_old))
    assert float(((g_old.mean(0) - exact).abs() / se_old).max()) > 10  # A_old is biased under staleness


@pytest.mark.parametrize("M", [1, 16])
def test_mc_forward_kl_is_unbiased(M):
    z, t, cache = draws_case(3, R=20000, M=M, stale=0.0, teacher_draws=True)
    exact, kl = exact_gradient(z, t, "forward_kl_dense")
    g, values = per_draw_gradients(z, cache, opts("forward_kl_mc"))
    se = g.std(0) / math.sqrt(len(g))
    assert float(((g.mean(0) - exact).abs() / se).max()) < 5
    assert abs(float(values.mean() - kl)) < 5 * float(values.std()) / math.sqrt(len(values))


def test_mc_variance_shrinks_as_one_over_m():
    """Total gradient variance of the M-sample estimator / the 1-sample one is in [0.5/M, 2/M]."""
    z, _, cache1 = draws_case(7, R=20000, M=1, stale=0.7)
    var1 = per_draw_gradients(z, cache1, opts("reverse_kl_pg"))[0].var(0).sum()
    for M in (4, 16, 64):
        z, _, cache = draws_case(7, R=20000 if M < 64 else 8000, M=M, stale=0.7)
        ratio = float(per_draw_gradients(z, cache, opts("reverse_kl_mc"))[0].var(0).sum() / var1)
        assert 0.5 / M <= ratio <= 2 / M, (M, ratio)


# ----------------------------------------------------------------------------- alignment on a real model
V_ALIGN, EOS = 48, 2
PROMPTS, RESPONSES = [[5, 9, 11], [7, 3, 20, 21, 8], [30, 4]], [4, 1, 3]  # response lengths; each ends with EOS


def tiny_qwen(seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V_ALIGN, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked distributions: neighbouring positions differ clearly
    return model


@pytest.fixture(scope="module")
def aligned_batch():
    return build_aligned_batch()


def build_aligned_batch():
    """Student, teacher (a different model) and a trajectory whose per-row distributions come from an
    explicit autoregressive loop: row r of a sequence = the model on prompt + y_<r (no shift helper)."""
    student, teacher = tiny_qwen(0), tiny_qwen(1)
    g = torch.Generator().manual_seed(0)
    rows = {"s": [], "t": [], "s_next": [], "t_next": [], "y": []}
    with torch.no_grad():
        for prompt, L in zip(PROMPTS, RESPONSES, strict=True):
            seq = list(prompt)
            for r in range(L):
                s = torch.log_softmax(student(torch.tensor([seq])).logits[0, -1].double(), -1)
                y = EOS if r == L - 1 else int(torch.multinomial(s.exp(), 1, generator=g))
                rows["s"].append(s), rows["y"].append(y)
                rows["t"].append(torch.log_softmax(teacher(torch.tensor([seq])).logits[0, -1].double(), -1))
                seq.append(y)
                # the distributions one position later (what a shifted cache would hold)
                rows["s_next"].append(torch.log_softmax(student(torch.tensor([seq])).logits[0, -1].double(), -1))
                rows["t_next"].append(torch.log_softmax(teacher(torch.tensor([seq])).logits[0, -1].double(), -1))
    traj = {"prompt_ids": torch.tensor(sum(PROMPTS, [])), "prompt_cu_seqlens": cu_seqlens([len(p) for p in PROMPTS]),
            "cu_seqlens": cu_seqlens(RESPONSES), "token_ids": torch.tensor(rows.pop("y")),
            "loss_mask": torch.ones(sum(RESPONSES), dtype=torch.bool)}
    return student, teacher, traj, {k: torch.stack(v) for k, v in rows.items()}


def cache_from(traj, s_true, t_true, seed=0, K=6, M=8):
    """Every cache field from given per-row student/teacher log-prob tables [N, V]."""
    g = torch.Generator().manual_seed(seed)
    y = traj["token_ids"][:, None]
    mc = torch.cat([y, torch.multinomial(s_true.exp(), M - 1, replacement=True, generator=g)], 1)
    tmc = torch.multinomial(t_true.exp(), M, replacement=True, generator=g)
    top, stop = t_true.topk(K, -1), s_true.topk(K, -1).indices
    return dict(traj, behavior_logp=s_true.gather(1, y)[:, 0], teacher_logp=t_true.gather(1, y)[:, 0],
                proximal_logp=s_true.gather(1, y)[:, 0], teacher_topk_ids=top.indices, teacher_topk_logp=top.values,
                student_topk_ids=stop, student_topk_behavior_logp=s_true.gather(1, stop),
                student_topk_teacher_logp=t_true.gather(1, stop),
                mc_ids=mc, mc_behavior_logp=s_true.gather(1, mc), mc_teacher_logp=t_true.gather(1, mc),
                mc_proximal_logp=s_true.gather(1, mc), teacher_mc_ids=tmc, teacher_mc_logp=t_true.gather(1, tmc),
                teacher_dense_logp=t_true)


def learner_loss(student, cache, o):
    """The learner path: pad_batch -> hidden at the rows -> chunked gather_logprobs -> estimator -> aggregate."""
    input_ids, attention_mask, rows = batch_format.pad_batch(cache)
    hidden = student.model(input_ids=input_ids, attention_mask=attention_mask)[0]
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    s = E.gather_logprobs(h, student.lm_head.weight, E.student_ids(cache, o), chunk_size=4)
    per_token, metrics = E.ESTIMATORS[o.name].fn(s, cache, o)
    return E.aggregate(per_token, cache["loss_mask"], cache["cu_seqlens"], o.aggregation).item(), metrics


@pytest.mark.parametrize("key", list(CONFIGS))
def test_alignment_teacher_equal_to_student_scores_zero_and_a_shift_does_not(key, aligned_batch):
    """Teacher := the student itself (and behaviour = student). Scored at the right positions every
    estimator gives 0 (and ratio 1); a teacher cache one position off, or a learner reading the hidden
    state one position late, gives a clearly non-zero loss (A_old: t = b makes it 0, but the ratio moves)."""
    student, _, traj, true = aligned_batch
    o = CONFIGS[key]
    pad_batch = batch_format.pad_batch
    with torch.no_grad():
        aligned, aligned_metrics = learner_loss(student, cache_from(traj, true["s"], true["s"]), o)
        shifted_teacher = learner_loss(student, cache_from(traj, true["s"], true["s_next"]), o)[0]
        try:  # a learner that reads the hidden state one position late
            batch_format.pad_batch = lambda cache: (lambda ids, am, rows: (ids, am, rows + 1))(*pad_batch(cache))
            shifted_learner, shifted_metrics = learner_loss(student, cache_from(traj, true["s"], true["s"]), o)
        finally:
            batch_format.pad_batch = pad_batch
    assert abs(aligned) < 1e-5 and abs(aligned_metrics.get("ratio_mean", 1.0) - 1) < 1e-5
    assert abs(shifted_teacher) > 1e-2
    assert abs(shifted_learner) > 1e-2 or abs(shifted_metrics["ratio_mean"] - 1) > 1e-2


def test_learner_student_logp_equals_the_generating_distribution(aligned_batch):
    """s at token_ids from pad_batch + gather_logprobs equals the autoregressive b, row by row (first and EOS too)."""
    student, _, traj, true = aligned_batch
    input_ids, attention_mask, rows = batch_format.pad_batch(traj)
    with torch.no_grad():
        h = student.model(input_ids=input_ids, attention_mask=attention_mask)[0].reshape(-1, 32)[rows]
        s = E.gather_logprobs(h, student.lm_head.weight, {"token_ids": traj["token_ids"], "dense": None})
    torch.testing.assert_close(s["dense"].double(), true["s"], rtol=0, atol=2e-4)
    assert float((s["dense"].double() - true["s_next"]).abs().max()) > 0.5  # one position off is far


@pytest.mark.parametrize("key", list(CONFIGS))
def test_first_and_last_response_tokens_are_trained(key, aligned_batch):
    """The gradient reaches exactly the positions P-1 .. P+L-2 of every sequence (first response token's
    position and EOS's position included) and nothing else."""
    student, teacher, traj, true = aligned_batch
    cache = cache_from(traj, true["s"], true["t"])
    input_ids, attention_mask, rows = batch_format.pad_batch(cache)
    with torch.no_grad():
        hidden = student.model(input_ids=input_ids, attention_mask=attention_mask)[0]
    hidden = hidden.clone().requires_grad_()  # [B, S, H]: the gradient says which positions are trained
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    o = CONFIGS[key]
    s = E.gather_logprobs(h, student.lm_head.weight, E.student_ids(cache, o), chunk_size=4)
    loss = E.compute_loss(s, cache, o)[0]
    trained = grad_of(loss, hidden).norm(dim=-1) > 0  # [B, S]
    expected = torch.zeros_like(trained)
    for i, (prompt, L) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        expected[i, len(prompt) - 1:len(prompt) + L - 1] = True
    assert torch.equal(trained, expected)


# ----------------------------------------------------------------------------- masking
def drop_rows(cache, keep):
    """The cache without the rows where keep is False (cu_seqlens recomputed)."""
    lengths = cache["cu_seqlens"].diff()
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    out = {k: (v[keep] if k not in ("cu_seqlens",) else v) for k, v in cache.items()}
    out["cu_seqlens"] = cu_seqlens(torch.bincount(seq[keep], minlength=len(lengths)).tolist())
    return out


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("key", list(CONFIGS))
def test_masked_rows_change_nothing(key, aggregation):
    """Masked rows full of garbage (huge stale ratios, teacher log-probs of -inf) give the same loss, the same
    gradient on the kept rows, zero (not NaN) gradient on themselves, and the same metrics as removing them."""
    o = replace(CONFIGS[key], aggregation=aggregation)
    masked = (1, 3, 4, 5, 6, 7)  # part of sequence 0, all of sequence 1 (row 3), most of sequence 2 (rows 4..8)
    z, cache = make_case(8, masked=masked)
    with torch.no_grad():
        for f in ("behavior_logp", "mc_behavior_logp", "proximal_logp", "mc_proximal_logp"):
            cache[f][list(masked)] = -30.0  # ratios e^{20}: would dominate clip and M2PO statistics
        for f in [f for f in cache if "teacher" in f and f.endswith("_logp")]:
            cache[f][list(masked)] = float("-inf")  # e.g. a padding row scored where the teacher gives 0 mass
    keep = cache["loss_mask"].clone()
    loss, metrics = estimator_loss(z, cache, o)
    z_kept = z.detach()[keep].clone().requires_grad_()
    loss_kept, metrics_kept = estimator_loss(z_kept, drop_rows(cache, keep), o)
    torch.testing.assert_close(loss, loss_kept, rtol=1e-12, atol=1e-14)
    g = grad_of(loss, z)
    torch.testing.assert_close(g[keep], grad_of(loss_kept, z_kept), rtol=1e-10, atol=1e-14)
    assert float(g[~keep].abs().max()) == 0.0
    assert metrics.keys() == metrics_kept.keys()
    for k in metrics:
        assert math.isclose(metrics[k], metrics_kept[k], rel_tol=1e-9, abs_tol=1e-12), k


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_all_masked_gives_zero_with_grad(aggregation):
    o = replace(CONFIGS["mc_m2po"], aggregation=aggregation)
    z, cache = make_case(9, masked=range(sum(LENGTHS)))
    loss, metrics = estimator_loss(z, cache, o)
    assert loss.item() == 0.0 and loss.requires_grad
    assert float(grad_of(loss, z).abs().max()) == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- stabilisers, by hand
def pg_case(log_s, log_b, adv, log_prox=None, mask=None):
    """Rows given directly as s (leaf), b, A_theta (t = s + A) and proximal log-probs, for reverse_kl_pg."""
    s = torch.tensor(log_s, dtype=torch.float64, requires_grad=True)
    n = len(log_s)
    cache = {"behavior_logp": torch.tensor(log_b, dtype=torch.float64),
             "teacher_logp": s.detach() + torch.tensor(adv, dtype=torch.float64),
             "loss_mask": torch.ones(n, dtype=torch.bool) if mask is None else torch.tensor(mask),
             "cu_seqlens": torch.tensor([0, n])}
    if log_prox is not None:
        cache["proximal_logp"] = torch.tensor(log_prox, dtype=torch.float64)
    return s, cache


def run_pg(s, cache, o, name="reverse_kl_pg", key="token_ids"):
    per_token, metrics = E.ESTIMATORS[name].fn({key: s}, cache, o)
    loss = E.aggregate(per_token, cache["loss_mask"], cache["cu_seqlens"])
    return per_token.detach(), grad_of(loss, s), metrics


def test_ppo_clip_by_hand():
    # eps = 0.2, A_theta, rows (r = e^{s-b}, A):  loss_i = max(-r A, -clip(r, 0.8, 1.2) A)
    #   (2, +1):   max(-2, -1.2) = -1.2     clipped, d/ds = 0
    #   (2, -1):   max(2, 1.2) = 2          d/ds = -A r = 2
    #   (0.5, +1): max(-0.5, -0.8) = -0.5   d/ds = -0.5
    #   (0.5, -1): max(0.5, 0.8) = 0.8      clipped, d/ds = 0
    #   (1.1, .5): -0.55                    d/ds = -0.55
    # token mean = 0.55 / 5 = 0.11, gradient = per-row d/ds / 5, clip_frac = 2/5
    L = math.log
    s, cache = pg_case([L(.5), L(.5), L(.25), L(.25), L(.55)], [L(.25), L(.25), L(.5), L(.5), L(.5)],
                       [1, -1, 1, -1, .5])
    per_token, g, metrics = run_pg(s, cache, opts("reverse_kl_pg", clip_eps=0.2))
    torch.testing.assert_close(per_token, torch.tensor([-1.2, 2, -.5, .8, -.55], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([0, 2, -.5, 0, -.55], dtype=torch.float64) / 5)
    assert math.isclose(float(per_token.mean()), 0.11) and math.isclose(metrics["clip_frac"], 0.4)


def test_truncated_is_by_hand():
    # cap 1.5: value -min(r, 1.5) A, gradient -min(r, 1.5) A (the weight is detached)
    #   (r=2, A=+1) -> -1.5 ; (r=0.5, A=-2) -> 1.0 ; (r=3, A=-1) -> 1.5 ; mean 1/3; capped 2 of 3
    L = math.log
    s, cache = pg_case([L(.4), L(.1), L(.6)], [L(.2), L(.2), L(.2)], [1, -2, -1])
    per_token, g, metrics = run_pg(s, cache, opts("reverse_kl_pg", tis_cap=1.5))
    torch.testing.assert_close(per_token, torch.tensor([-1.5, 1.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([-1.5, 1.0, 1.5], dtype=torch.float64) / 3)
    assert math.isclose(metrics["tis_capped_frac"], 2 / 3)


def test_decoupled_ppo_by_hand():
    # eps 0.2, behave_cap 5, A_theta; r = p/p_prox, w = p_prox/p_b, loss = w * max(-r A, -clip(r) A)
    #   s=.6 prox=.4  b=.2 : r=1.5, w=2,  A=+1: max(-1.5, -1.2) = -1.2 -> -2.4, clipped: d/ds = 0
    #   s=.5 prox=.5  b=.05: w = 10 > 5 -> 0, d/ds = 0
    #   s=.3 prox=.3  b=.6 : r=1,   w=.5, A=-2: 2 -> 1.0, d/ds = w * (-A r) = 1.0
    #   s=.45 prox=.5 b=.4 : r=.9,  w=1.25, A=.5: -0.45 -> -0.5625, d/ds = -0.5625
    # token mean = -1.9625 / 4 = -0.490625; zeroed fraction 1/4
    L = math.log
    s, cache = pg_case([L(.6), L(.5), L(.3), L(.45)], [L(.2), L(.05), L(.6), L(.4)], [1, 1, -2, .5],
                       [L(.4), L(.5), L(.3), L(.5)])
    per_token, g, metrics = run_pg(s, cache, opts("reverse_kl_pg", decoupled=True, clip_eps=0.2, behave_cap=5.0))
    torch.testing.assert_close(per_token, torch.tensor([-2.4, 0, 1.0, -.5625], dtype=torch.float64))
    torch.testing.assert_close(g, torch.tensor([0, 0, 1.0, -.5625], dtype=torch.float64) / 4)
    assert math.isclose(float(per_token.mean()), -0.490625) and math.isclose(metrics["behave_zeroed_frac"], 0.25)


# M2PO, budget 0.1. Entries (log r = s - b, A); delta = b - s = -log r:
#   (0.1, +1) harmful d2 .01 | (-0.2, -1) harmful .04 | (0.5, +1) harmful .25 | (-1, -1) harmful 1.0
#   (0.8, -1) not harmful (A < 0, r > 1) | (3.0, +1) harmful d2 9 but MASKED: must not count.
# M2 = 1.3/4 = .325 > .1. sum min(d2, tau^2) = .4: at tau^2 = .25 the sum is .01+.04+.25+.25 = .55 > .4,
# at .04 it is .01+.04*3 = .13 < .4, so tau^2 = (.4 - .05)/2 = .175, tau = .418330;
# eps_low = 1 - e^-tau = .341855 (> floor .3), eps_high = e^tau - 1 = .519422 (> floor .5): r in [.658145, 1.519422].
# losses: -e^.1 = -1.105171 | e^-.2 = .818731 | max(-1.648721, -1.519422) = -1.519422 (clipped)
#         | max(.367879, .658145) = .658145 (clipped) | e^.8 = 2.225541 (not clipped: it lowers the loss)
M2PO_LOG_R, M2PO_ADV = [0.1, -0.2, 0.5, -1.0, 0.8, 3.0], [1, -1, 1, -1, -1, 1]
M2PO_LOSS = [-1.105171, 0.818731, -1.519422, 0.658145, 2.225541]
M2PO_GRAD = [-1.105171, 0.818731, 0.0, 0.0, 2.225541]  # d/ds (-r A) = -r A where not clipped


def test_m2po_by_hand_on_tokens():
    s, cache = pg_case([-1.0] * 6, [-1.0 - x for x in M2PO_LOG_R], M2PO_ADV, mask=[True] * 5 + [False])
    per_token, g, m = run_pg(s, cache, opts("reverse_kl_pg", m2po_budget=0.1))
    torch.testing.assert_close(per_token[:5], torch.tensor(M2PO_LOSS, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(g, torch.tensor(M2PO_GRAD + [0.0], dtype=torch.float64) / 5, rtol=0, atol=1e-6)
    assert math.isclose(m["m2po_m2"], 0.325) and math.isclose(m["m2po_tau"], math.sqrt(0.175))
    assert math.isclose(m["m2po_eps_low"], 0.341855, abs_tol=1e-6)
    assert math.isclose(m["m2po_eps_high"], 0.519422, abs_tol=1e-6)
    # within budget: no clipping at all
    per_token, _, m = run_pg(s, cache, opts("reverse_kl_pg", m2po_budget=0.5))
    unclipped = torch.tensor([-1.105171, 0.818731, -1.648721, 0.367879, 2.225541], dtype=torch.float64)
    torch.testing.assert_close(per_token[:5], unclipped, rtol=0, atol=1e-6)
    assert "m2po_eps_low" not in m


def test_m2po_by_hand_on_samples():
    """The same entries in the [N, M] layout: rows (e1, e2), (e3, e4), (e5, e5), and a masked row (e6, e6)."""
    pick = [[0, 1], [2, 3], [4, 4], [5, 5]]
    s = torch.full((4, 2), -1.0, dtype=torch.float64, requires_grad=True)
    log_r = torch.tensor(M2PO_LOG_R, dtype=torch.float64)[torch.tensor(pick)]
    adv = torch.tensor(M2PO_ADV, dtype=torch.float64)[torch.tensor(pick)]
    cache = {"mc_behavior_logp": -1.0 - log_r, "mc_teacher_logp": -1.0 + adv,
             "loss_mask": torch.tensor([True, True, True, False]), "cu_seqlens": torch.tensor([0, 4])}
    per_token, _, m = run_pg(s, cache, opts("reverse_kl_mc", m2po_budget=0.1), name="reverse_kl_mc", key="mc_ids")
    loss = torch.tensor(M2PO_LOSS, dtype=torch.float64)
    torch.testing.assert_close(per_token[:3], torch.stack([loss[:2].mean(), loss[2:4].mean(), loss[4]]),
                               rtol=0, atol=1e-6)
    assert math.isclose(m["m2po_eps_low"], 0.341855, abs_tol=1e-6)
    assert math.isclose(m["m2po_eps_high"], 0.519422, abs_tol=1e-6)


# ----------------------------------------------------------------------------- chunked student gather
def naive_logp(hidden, weight, ids, temperature=1.0):
    full = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, -1)
    return {k: full.gather(1, v.view(len(full), -1)).view(v.shape) for k, v in ids.items()}


@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (4, 0.7), (1024, 1.3)])
def test_chunked_gather_equals_naive(chunk, temperature):
    g = torch.Generator().manual_seed(chunk)
    N, H, V = 11, 16, 300
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = {"token_ids": torch.randint(0, V, (N,), generator=g),
           "mc_ids": torch.randint(0, 5, (N, 9), generator=g),  # duplicates
           "teacher_topk_ids": torch.randint(0, V, (N, 4), generator=g)}
    coef = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in ids.items()}
    got = E.gather_logprobs(hidden, weight, ids, temperature=temperature, chunk_size=chunk)
    ref = naive_logp(hidden, weight, ids, temperature)
    for k in ids:
        assert got[k].shape == ids[k].shape
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)
    total = lambda d: sum((d[k] * coef[k]).sum() for k in ids)  # noqa: E731
    g_got, g_ref = torch.autograd.grad(total(got), (hidden, weight)), torch.autograd.grad(total(ref), (hidden, weight))
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_gather_through_an_estimator_equals_naive():
    """Loss and gradients of reverse_kl_mc (duplicate ids) and forward_kl_topk via the chunked gather."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 9, 8, 200
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (3 * torch.randn(V, H, generator=g, dtype=torch.float64)).requires_grad_()
    _, cache = make_case(0, lengths=(4, 5), V=V, masked=(3,))
    for o in (CONFIGS["mc_clip"], CONFIGS["fwd_topk_tail"]):
        fields = E.student_ids(cache, o)
        losses = [E.compute_loss(s, cache, o)[0] for s in (E.gather_logprobs(hidden, weight, fields, chunk_size=2),
                                                           naive_logp(hidden, weight, fields))]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
        grads = [torch.autograd.grad(loss, (hidden, weight)) for loss in losses]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_chunked_gather_at_qwen_vocabulary():
    """V = 151,936 on a few tokens, float32 chunked vs float64 naive: values and gradients."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 5, 8, 151936
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (2 * torch.randn(V, H, generator=g)).requires_grad_()
    ids = {"teacher_topk_ids": torch.randint(0, V, (N, 64), generator=g),
           "mc_ids": torch.randint(0, 50, (N, 64), generator=g)}
    coef = {k: torch.randn(v.shape, generator=g) for k, v in ids.items()}
    got = E.gather_logprobs(hidden, weight, ids, chunk_size=2)
    ref = naive_logp(hidden, weight, ids)
    for k in ids:
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=2e-5)
    full32 = torch.log_softmax(hidden @ weight.T, -1)  # the naive float32 path, for its rounding error
    naive32 = {k: full32.gather(1, v) for k, v in ids.items()}
    grads = [torch.autograd.grad(sum((d[k] * coef[k].to(d[k].dtype)).sum() for k in ids), (hidden, weight))
             for d in (got, naive32, ref)]
    for a, b, exact in zip(*grads, strict=True):  # float32 sums over 151,936 terms: no worse than naive float32
        err, err_naive = [float((x.double() - exact).norm() / exact.norm()) for x in (a, b)]
        assert err < max(2 * err_naive, 1e-6), (err, err_naive)


def test_chunked_gather_bf16_computes_in_float32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(500, 16, generator=g).bfloat16().requires_grad_()
    ids = {"token_ids": torch.randint(0, 500, (6,), generator=g)}
    got = E.gather_logprobs(hidden, weight, ids, chunk_size=4)["token_ids"]
    assert got.dtype == torch.float32
    ref = naive_logp(hidden.detach(), weight.detach(), ids)["token_ids"]  # float64 on the same bf16 values
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    gh, gw = torch.autograd.grad(got.sum(), (hidden, weight))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16


def test_student_logp_refuses_bad_input():
    hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="outside"):
        E.gather_logprobs(hidden, weight, {"token_ids": torch.tensor([0, 1, 10])})
    with pytest.raises(ValueError, match="int64"):
        E.gather_logprobs(hidden, weight, {"token_ids": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="dense"):
        E.gather_logprobs(torch.randn(1, 4), torch.randn(E.MAX_DENSE_VOCAB + 1, 4), {"dense": None})


# ----------------------------------------------------------------------------- options and fields
@pytest.mark.parametrize("bad,match", [
    (dict(name="reverse_kl_mcc"), "did you mean reverse_kl_mc"),
    (dict(name="forward_kl_topk", clip_eps=0.2), "clip_eps only applies"),
    (dict(name="reverse_kl_mc", clip_eps=0.2, tis_cap=2.0), "cannot be combined"),
    (dict(name="reverse_kl_mc", m2po_budget=0.01, decoupled=True), "cannot be combined"),
    (dict(name="reverse_kl_pg", ratio=False, tis_cap=2.0), "ratio=False"),
    (dict(name="reverse_kl_dense", renormalize=True), "renormalize/tail_bucket"),
    (dict(name="forward_kl_topk", renormalize=True, tail_bucket=True), "choose one"),
    (dict(name="reverse_kl_support", support="dense"), "reverse_kl_dense"),
    (dict(name="jsd", beta=1.5), "beta"),
    (dict(name="reverse_kl_mc", advantage="online"), "advantage"),
    (dict(name="reverse_kl_mc", aggregation="sum"), "aggregation"),
])
def test_validate_options_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        E.validate_options(E.LossOptions(**bad))


def declared(o):
    """{field: the role that writes it} for the fields o's declaration says the estimator reads (besides CORE)."""
    need = E.needs(o)
    return {f: "rollout" for f in need.rollout} | {f: "teacher" for f in need.teacher} | \
        {f: "learner" for f in need.proximal.values()}


@pytest.mark.parametrize("key", list(CONFIGS))
def test_declared_fields_are_exactly_what_the_estimator_reads(key):
    """On a cache of only required_fields(o) the estimator gives the full cache's loss; without any one declared field
    it raises the one-line 'cache has no' error naming it. So a declaration cannot drift from its estimator's code."""
    o = CONFIGS[key]
    z, cache = make_case(10)
    small = {k: v for k, v in cache.items() if k in E.required_fields(o)}
    assert E.required_fields(o) == set(small) == set(E.CORE) | set(declared(o))
    torch.testing.assert_close(estimator_loss(z, small, o)[0], estimator_loss(z, cache, o)[0])
    for name in declared(o):
        with pytest.raises(ValueError, match=f"^cache has no '{name}', needed by {o.name}: [^\n]*$"):
            estimator_loss(z, {k: v for k, v in small.items() if k != name}, o)


def test_declarations_follow_the_cache_contract():
    """Every declared name is a batch_format field; the teacher role declares only fields score() can add
    (TEACHER_FIELDS), the rollout and learner roles none of them; a teacher field scored at rollout ids
    (TEACHER_AT_ROLLOUT_IDS) comes with those ids; every id field is written by a role of the same declaration; the
    learner's proximal log-probs sit at id fields."""
    assert all(e.fn.__name__ == name for name, e in E.ESTIMATORS.items())
    assert set(E.CORE) <= set(batch_format.FIELD_SPECS)
    records = [f for e in E.ESTIMATORS.values()
               for f in (e.fields.values() if isinstance(e.fields, dict) else [e.fields])]
    for f in records:
        for role, names in (("rollout", f.rollout + f.behavior), ("teacher", f.teacher), ("learner", f.proximal)):
            assert set(names) <= set(batch_format.FIELD_SPECS), (f, role)
            assert all((name in teacher_cache.TEACHER_FIELDS) == (role == "teacher") for name in names), (f, role)
        gathered = set(f.teacher) & set(batch_format.TEACHER_AT_ROLLOUT_IDS)
        assert all(batch_format.TEACHER_AT_ROLLOUT_IDS[name] in f.rollout for name in gathered), f
        assert set(f.ids) - {"dense"} <= set(f.rollout + f.teacher), f
        assert len(f.proximal) in (0, len(f.ids)), f


@pytest.fixture(scope="module")
def roles():
    engine = rollout.make_engine(tiny_qwen(0), kind="hf", eos_token_id=EOS, pad_token_id=0, max_new_tokens=4)
    return engine, tiny_qwen(1)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_each_role_computes_what_needs_says(key, roles):
    """rollout.generate given needs' student_topk / mc_samples writes the declared rollout fields, score() exactly the
    declared teacher fields, the learner adds the proximal ones: the estimator runs on what the roles produced."""
    o, (engine, teacher) = CONFIGS[key], roles
    need = E.needs(o)
    traj = engine.generate(PROMPTS, list(range(len(PROMPTS))), 0, student_topk=need.student_topk,
                           mc_samples=need.mc_samples, generator=torch.Generator().manual_seed(0))
    assert set(E.CORE) | need.rollout <= set(traj)
    batch = teacher_cache.score(teacher, traj, need.teacher, o.teacher_topk, o.samples,
                                generator=torch.Generator().manual_seed(1))
    assert set(batch) - set(traj) == need.teacher
    input_ids, attention_mask, rows = batch_format.pad_batch(batch)
    with torch.no_grad():
        h = engine.model.model(input_ids=input_ids, attention_mask=attention_mask)[0].reshape(-1, 32)[rows]
        s = E.gather_logprobs(h, engine.model.lm_head.weight, E.student_ids(batch, o))
    batch |= {field: s[ids] for ids, field in need.proximal.items()}  # as train_on_batch: the student before the step
    assert E.required_fields(o) <= set(batch)
    assert torch.isfinite(E.compute_loss(s, batch, o)[0])


def test_default_options_are_the_recommended_surrogate():
    o = E.LossOptions()
    E.validate_options(o)
    assert (o.name, o.advantage, o.ratio, o.clip_eps, o.aggregation) \
        == ("reverse_kl_mc", "theta", True, 0.0, "token_mean")
    assert E.required_fields(o) \
        == {"token_ids", "loss_mask", "cu_seqlens", "mc_ids", "mc_teacher_logp", "mc_behavior_logp"}


def test_every_estimator_has_a_test_config_and_a_reference():
    """An estimator declared without an entry in CONFIGS (and so without its float64 reference) fails here."""
    assert {o.name for o in CONFIGS.values()} == set(E.ESTIMATORS)
    z, cache = make_case(0)
    with pytest.raises(ValueError, match="no float64 reference for estimator made_up"):
        reference(E.LossOptions(name="made_up"), z, cache)


@pytest.fixture()
def toy_estimator():
    """An estimator added the documented way (README, Adding an estimator): one declaration in estimators.py."""
    @E.estimator(E.Fields(ids=("token_ids",), rollout=("token_ids",), teacher=("teacher_logp",)))
    def toy_log_ratio(s, cache, opts):
        """The sampled log-ratio s(y) - t(y) at the generated token (its gradient is grad s(y): a toy)."""
        return s["token_ids"] - E._field(cache, "teacher_logp", s["token_ids"], opts), {}

    yield E.LossOptions(name="toy_log_ratio")
    del E.ESTIMATORS["toy_log_ratio"]
    E.needs.cache_clear()


def test_a_new_estimator_runs_through_every_role_from_its_declaration(toy_estimator, tiny_models):
    """Its options validate, needs() derives each role's work from the declaration alone, and one step of
    opd_reference (rollout, teacher, learner, the estimator, AdamW) trains with it, its loss the float64 value
    recomputed from the definition."""
    o = toy_estimator
    E.validate_options(o)
    with pytest.raises(ValueError, match="clip_eps only applies"):
        E.validate_options(replace(o, clip_eps=0.2))  # not declared policy_gradient
    need = E.needs(o)
    assert (need.rollout, need.teacher, need.student_ids, need.student_topk, need.mc_samples) \
        == ({"token_ids"}, {"teacher_logp"}, ("token_ids",), 0, 0)
    student_dir, teacher_dir = tiny_models
    cfg = config.load_config(None, [f"student={student_dir}", f"teacher={teacher_dir}", "batch_size=4",
                                    "max_new_tokens=8", "loss.name=toy_log_ratio"])
    preflight.check_values(cfg)
    ln, tok = learner.build(cfg, student_dir, sharded=False), AutoTokenizer.from_pretrained(student_dir)
    prompts = [{"ids": task.encode_prompt(tok, task.addition_prompt(k, 23))} for k in range(4)]
    engine = rollout.engine_from_config(cfg, student_dir, "cpu", tok)
    before = learner.copy_weights(ln)
    [(loss, norm)] = opd_reference(ln, engine, teacher_cache.load_teacher(cfg), prompts, steps=1)
    idx = schedule.unit_prompt_indices(cfg, len(prompts), 0)
    traj = rollout.rollout_unit(cfg, engine, prompts, idx, 0)  # the step's batch again: its unit's own random stream
    batch = teacher_cache.score_unit(cfg, teacher_cache.load_teacher(cfg), traj, 0)
    s_y = (batch["behavior_logp"].double() - batch["teacher_logp"].double()).mean()  # b = s before the step
    assert loss == pytest.approx(float(s_y), abs=1e-5) and norm > 0
    assert any(not torch.equal(v, before[k]) for k, v in learner.copy_weights(ln).items())
