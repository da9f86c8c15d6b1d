"""vLLM adapter pieces against the real classes of the pinned vllm 0.32.0 (the CUDA package of requirements-gpu.txt;
bash run.sh test installs it into .venv with --no-deps). Its engine needs a GPU, so the pieces are driven directly
here (the real engine runs on CPU in tests/test_vllm_cpu.py): SamplingParams building, the
logits processor (real base class, real LogitsContext / LogitsProcRequestState), output assembly from
real RequestOutput / CompletionOutput / Logprob objects, and the weights call through the real
msgpack serialisation and InprocClient. A rename of anything used here fails these tests."""
import math
import types

import numpy as np
import pytest
import torch
from vllm import SamplingParams, TokensPrompt
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

import rollout
from optional import vllm_engine
from optional.vllm_engine import MC_KEY, MCDrawProcessor

EOS = 1


def processor(max_num_reqs=4, vocab=50, prefill_len=None):
    """The processor over a real LogitsProcRequestState; its buffers (UVA, pinned: GPU only) are plain
    holders with the `.np` host view the processor reads."""
    prefill = types.SimpleNamespace(np=np.zeros(max_num_reqs, dtype=np.int32) if prefill_len is None else prefill_len)
    state = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=max_num_reqs, vocab_size=vocab,
                                   all_token_ids=None, prompt_len=None, prefill_len=prefill, total_len=None)
    return MCDrawProcessor(types.SimpleNamespace(speculative_config=None, watermark_config=None), state)


def context(slots, pos):
    slots = np.asarray(slots)
    idx = torch.as_tensor(slots)
    return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=slots,
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
                         input_ids=torch.zeros(len(slots), dtype=torch.int64), pos=torch.as_tensor(pos),
                         seq_lens_upper_bound_np=np.asarray(pos) + 1)


def mc_params(request, draws, seed, temperature=1.0, **kw):
    return SamplingParams(temperature=temperature,
                          extra_args={MC_KEY: {"request": request, "draws": draws, "seed": seed}}, **kw)


def test_processor_draws_follow_softmax_z_over_t():
    """Many rows share one logits vector: the draws' frequencies match softmax(z/T) (Pearson chi-square
    under df + 6 sqrt(2 df) + 10, far beyond 5 sigma), the same test rejects T=1 (power), recorded b equals
    the float64 log_softmax(z/T) at the drawn ids, and the logits come back unchanged."""
    assert issubclass(MCDrawProcessor, LogitsProcessor)
    V, T, rows, M1 = 50, 0.7, 64, 63
    z = torch.randn(V, generator=torch.Generator().manual_seed(0))
    proc = processor(max_num_reqs=rows, vocab=V)
    for s in range(rows):
        assert proc.add_request(s, mc_params(request=s, draws=M1, seed=1000 + s, temperature=T))
    logits = z.expand(rows, V).clone()
    vllm_engine.DRAWS.clear()
    out = proc.apply(logits, context(range(rows), [5] * rows))
    assert torch.equal(out, z.expand(rows, V))
    (req, first, pos, ids, b), = vllm_engine.DRAWS
    vllm_engine.DRAWS.clear()
    ref = torch.log_softmax(z.double() / T, -1)
    torch.testing.assert_close(b.double(), ref[ids], atol=1e-6, rtol=0)
    counts = torch.bincount(ids.flatten(), minlength=V).double()
    probs = ref.exp()
    exp = counts.sum() * probs
    big = exp >= 5
    obs_b = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp_b = torch.cat([exp[big], exp[~big].sum(0, keepdim=True)])
    stat, df = ((obs_b - exp_b) ** 2 / exp_b).sum().item(), len(obs_b) - 1
    bound = df + 6 * math.sqrt(2 * df) + 10
    assert df > 10 and stat < bound, (stat, df)
    other = torch.softmax(z.double(), -1) * counts.sum()
    assert ((counts - other) ** 2 / other).sum().item() > 5 * bound
    # reproducible from (seed, position) alone: same draws in another batch order and slot
    proc2 = processor(max_num_reqs=rows, vocab=V)
    proc2.add_request(rows - 1, mc_params(request=0, draws=M1, seed=1000, temperature=T))
    proc2.apply(z[None].clone(), context([rows - 1], [5]))
    assert torch.equal(vllm_engine.DRAWS[0][3][0], ids[0]) and not torch.equal(ids[0], ids[1])
    vllm_engine.DRAWS.clear()


def test_hash_uniforms_are_uniform():
    u = vllm_engine.hash_uniforms(torch.arange(200), torch.arange(200) * 7, 500).flatten()
    assert u.min() >= 0 and u.max() < 1
    counts = torch.histc(u.float(), bins=100, min=0, max=1).double()
    stat = ((counts - len(u) / 100) ** 2 / (len(u) / 100)).sum().item()
    assert stat < 99 + 6 * math.sqrt(2 * 99) + 10, stat
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / len(u))


def test_processor_row_filter_recycled_slots_and_assembly():
    """Chunked-prefill rows (pos < prefill_len - 1) are dropped; a recycled slot carries nothing of its
    previous request; a recomputed position overwrites; collect_draws aligns row r with pos P + r - 1."""
    V = 20
    prefill = np.array([6, 3, 0, 0], dtype=np.int32)
    proc = processor(vocab=V, prefill_len=prefill)
    proc.add_request(0, mc_params(request=7, draws=3, seed=1))  # prompt of 6 tokens
    proc.add_request(1, mc_params(request=8, draws=3, seed=2))  # prompt of 3 tokens
    proc.add_request(2, SamplingParams(temperature=1.0))  # no MC: never recorded
    vllm_engine.DRAWS.clear()
    z = torch.randn(3, V)
    proc.apply(z, context([0, 1, 2], [3, 2, 9]))  # slot 0: chunk ending at pos 3 < 5 -> dropped
    proc.apply(z, context([0, 1, 2], [5, 3, 10]))
    z[2] = -3 * z[0]  # a row at pos 6 whose token is then dropped (drop-mode stale output) and resampled
    proc.apply(z[[2, 1]].clone(), context([0, 1], [6, 4]))  # request 8's pos 4 lies past its 2 tokens
    stale = vllm_engine.DRAWS[-1][3][0]
    # slot 1 recycled for a request without MC, slot 0 resumed at pos 6 after a preemption with prefill_len 7
    assert not proc.add_request(1, SamplingParams(temperature=1.0))
    prefill[0] = 7
    proc.add_request(0, mc_params(request=7, draws=3, seed=1))
    proc.apply(z[:2].clone(), context([0, 1], [6, 4]))
    assert [list(r[0]) for r in vllm_engine.DRAWS] == [[7, 8], [7, 8], [7, 8], [7]]
    ids, b = vllm_engine.collect_draws([7, 8], prompt_lens=[6, 3], lengths=[2, 2], num_draws=3)
    assert not vllm_engine.DRAWS
    rec = {}
    proc2 = processor(vocab=V)
    for request, seed, slot, pos, row in ((7, 1, 0, 5, 0), (7, 1, 0, 6, 0), (8, 2, 1, 2, 1), (8, 2, 1, 3, 1)):
        proc2.add_request(slot, mc_params(request=request, draws=3, seed=seed))
        proc2.apply(z[row:row + 1].clone(), context([slot], [pos]))
        rec[(request, pos)] = vllm_engine.DRAWS.pop()[3][0]
    assert torch.equal(ids, torch.stack([rec[(7, 5)], rec[(7, 6)], rec[(8, 2)], rec[(8, 3)]]))
    assert not torch.equal(stale, ids[1])  # the resampled row won
    logp = torch.log_softmax(z.double(), -1)
    torch.testing.assert_close(b.double(),
                               torch.stack([logp[0][ids[0]], logp[0][ids[1]], logp[1][ids[2]], logp[1][ids[3]]]),
                               atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="missing"):
        vllm_engine.collect_draws([7], prompt_lens=[6], lengths=[1], num_draws=3)


@pytest.mark.parametrize("bad", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1), dict(temperature=0.0)])
def test_inexact_settings_refused(bad):
    with pytest.raises(ValueError, match="MC draws"):
        MCDrawProcessor.validate_params(mc_params(request=0, draws=3, seed=0, **{"temperature": 1.0, **bad}))
    MCDrawProcessor.validate_params(SamplingParams(**{"temperature": 1.0, **bad}))  # without MC: fine
    with pytest.raises(ValueError, match="speculative"):
        MCDrawProcessor(types.SimpleNamespace(speculative_config=object(), watermark_config=None), None)


def test_sampling_params_are_real_and_stop_only_on_eos():
    params = vllm_engine.sampling_params(SamplingParams, 3, 0.7, 1.0, 16, EOS, 4, 8, [(1, 2), (3, 4), (5, 6)])
    assert all(type(p) is SamplingParams for p in params)
    # the input processor's EOS merge (v1/engine/input_processor.py): generation_config EOS ids stay out
    for p in params:
        p.update_from_generation_config({"eos_token_id": [151645, 151643]}, eos_token_id=151645)
        assert p.stop_token_ids == [EOS] and p.eos_token_id is None and p.ignore_eos
        assert p.logprobs == 4 and p.top_k == 0 and p.seed in (1, 3, 5) and p.extra_args[MC_KEY]["draws"] == 7
    assert len({p.extra_args[MC_KEY]["request"] for p in params}) == 3
    assert TokensPrompt(prompt_token_ids=[3, 4])["prompt_token_ids"] == [3, 4]
    with pytest.raises(VLLMValidationError, match="temperature"):
        vllm_engine.sampling_params(SamplingParams, 1, 2.5, 1.0, 16, EOS, 0, 0, None)
    with pytest.raises(ValueError, match="top_p=0.9"):
        vllm_engine.sampling_params(SamplingParams, 1, 1.0, 0.9, 16, EOS, 0, 8, None)
    no_mc = vllm_engine.sampling_params(SamplingParams, 1, 1.0, 0.9, 16, EOS, 0, 1, None)[0]
    assert no_mc.extra_args is None


def test_assemble_from_real_request_outputs():
    """RequestOutput -> trajectory: lengths, finished, b from the processed logprobs, top-K_s, and MC column
    0 = the generated token with the draws of the same logits row after it."""
    dist = torch.log_softmax(torch.linspace(3, -3, 30), 0)  # token j has the j-th largest logprob
    prompts, K = [[3], [4, 5]], 3
    params = vllm_engine.sampling_params(SamplingParams, 2, 1.0, 1.0, 4, EOS, K, 4, [(1, 2), (3, 4)])
    tokens = [[10, 2, EOS], [10, 11, 12, 13]]
    outputs = []
    for i, ys in enumerate(tokens):
        lps = [{j: Logprob(logprob=float(dist[j]), rank=j + 1) for j in [y, *range(K)]} for y in ys]
        c = CompletionOutput(index=0, text="", token_ids=ys, cumulative_logprob=None, logprobs=lps,
                             finish_reason="stop" if ys[-1] == EOS else "length")
        outputs.append(RequestOutput(request_id=str(i), prompt=None, prompt_token_ids=prompts[i], prompt_logprobs=None,
                                     outputs=[c], finished=True))
    vllm_engine.DRAWS.clear()
    proc = processor(vocab=30, prefill_len=np.array([1, 2, 0, 0], dtype=np.int32))
    for slot, p in enumerate(params):
        proc.add_request(slot, p)
    z = dist.float().expand(2, 30).clone()
    for step in range(4):  # request 0 stops after 3 tokens; its 4th row (async overrun) is never read
        proc.apply(z, context([0, 1], [step, step + 1]))
    traj = vllm_engine.assemble(outputs, params, prompts, [7, 8], 0, EOS, K, 4)
    assert traj["cu_seqlens"].tolist() == [0, 3, 7] and traj["finished"].tolist() == [True, False]
    assert traj["token_ids"].tolist() == [10, 2, EOS, 10, 11, 12, 13]
    torch.testing.assert_close(traj["behavior_logp"], dist[traj["token_ids"]])
    assert traj["student_topk_ids"].tolist() == [[0, 1, 2]] * 7
    assert traj["mc_ids"].shape == (7, 4) and torch.equal(traj["mc_ids"][:, 0], traj["token_ids"])
    torch.testing.assert_close(traj["mc_behavior_logp"].double(), dist.double()[traj["mc_ids"]], atol=1e-5, rtol=0)
    bad = CompletionOutput(index=0, text="", token_ids=[10, 151643], cumulative_logprob=None,
                           logprobs=[{10: Logprob(0.0)}, {151643: Logprob(0.0)}], finish_reason="stop")
    with pytest.raises(ValueError, match="eos_token_id"):
        vllm_engine.assemble([RequestOutput("0", None, [3], None, [bad], True)], params[:1], prompts[:1], [0], 0, EOS,
                             0, 0)


def test_weights_need_the_in_process_engine_core():
    """Across vLLM's process boundary (v1/serial_utils.py msgpack) a tensor arrives as a list; the
    in-process client (v1/engine/core_client.py InprocClient) hands the very tensor objects through."""
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder
    state = {"model.embed_tokens.weight": torch.randn(64, 32, dtype=torch.bfloat16).share_memory_(),
             "lm_head.weight": torch.randn(64, 32)}
    decoded = MsgpackDecoder().decode(MsgpackEncoder().encode({"weights_iterator": list(state.items())}))
    assert not isinstance(decoded["weights_iterator"][1][1], torch.Tensor)  # ['float32', [64, 32], ...]

    calls = []

    class EngineCore:  # what InprocClient forwards to; the real one builds a GPU worker
        def collective_rpc(self, method, timeout, args, kwargs):
            calls.append((method, kwargs))
            return [None]

    client = InprocClient.__new__(InprocClient)
    client.engine_core = EngineCore()
    reset_result = [True]
    llm = types.SimpleNamespace(collective_rpc=lambda method, kwargs: client.collective_rpc(method, kwargs=kwargs),
                                reset_prefix_cache=lambda: calls.append(("reset_prefix_cache",)) or reset_result[0])
    vllm_engine.load_weights(llm, state)
    (method, kwargs), reset = calls
    assert method == "reload_weights" and reset == ("reset_prefix_cache",)
    assert [(n, t is state[n]) for n, t in kwargs["weights_iterator"]] == [(n, True) for n in state]
    reset_result[0] = False  # blocks still held (v1/core/block_pool.py): the old weights' KV would be reused
    with pytest.raises(RuntimeError, match="prefix cache"):
        vllm_engine.load_weights(llm, state)


def test_make_engine_pins_in_process_engine_and_v2_only_for_mc(monkeypatch):
    import os
    for mc_samples, v2 in ((0, None), (1, None), (8, "1")):
        for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_V2_MODEL_RUNNER"):
            monkeypatch.delenv(k, raising=False)
        with pytest.raises(ValueError, match="model directory"):  # reached after the environment is set
            rollout.make_engine(torch.nn.Linear(2, 2), kind="vllm", device="cuda", eos_token_id=EOS,
                                mc_samples=mc_samples)
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        assert os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == v2
    with pytest.raises(ValueError, match="temperature"):
        rollout.make_engine("/x", kind="vllm", device="cuda", temperature=0.005, eos_token_id=EOS)
    with pytest.raises(ValueError, match="runs on cuda"):  # the CUDA build (this package) on a CPU device
        rollout.make_engine("/x", kind="vllm", device="cpu", eos_token_id=EOS)


def test_vllm_api_names_the_adapter_uses():
    """What the GPU-only path calls, by name and keyword, in the installed vllm (a rename fails here)."""
    import dataclasses
    import inspect

    import vllm.envs
    from vllm import LLM
    from vllm.config.model import PROCESSED_LOGPROBS_MODES
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert {"VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_USE_V2_MODEL_RUNNER"} <= set(vllm.envs.environment_variables)
    assert {"model", "dtype", "tensor_parallel_size", "logits_processors", "seed"} \
        <= set(inspect.signature(LLM.__init__).parameters)
    assert {"logprobs_mode", "max_logprobs"} <= {f.name for f in dataclasses.fields(EngineArgs)}
    assert "processed_logprobs" in PROCESSED_LOGPROBS_MODES
    assert {"prompts", "sampling_params", "use_tqdm"} <= set(inspect.signature(LLM.generate).parameters)
    assert {"method", "kwargs"} <= set(inspect.signature(LLM.collective_rpc).parameters)
    assert callable(LLM.reset_prefix_cache) and callable(EngineCore.collective_rpc) and callable(Worker.reload_weights)
    assert "weights_iterator" in inspect.signature(GPUModelRunner.reload_weights).parameters
    assert {"hf_overrides", "kv_cache_memory_bytes", "enforce_eager"} <= {f.name for f in
                                                                          dataclasses.fields(EngineArgs)}
    from vllm.config.model import _get_head_dtype
    assert _get_head_dtype(types.SimpleNamespace(head_dtype="float32"), torch.bfloat16, "generate") == torch.float32
    assert _get_head_dtype(types.SimpleNamespace(), torch.bfloat16, "generate") == torch.bfloat16  # why we set it
