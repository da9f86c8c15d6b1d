"""The rollout: the student samples responses and records what the estimators need.

make_engine() builds one of two engines ("hf" here; "vllm" in optional/vllm_engine.py) with one interface:

    traj = engine.generate(prompts, prompt_index, policy_version, student_topk=Ks, mc_samples=M, generator=g)
    engine.load_weights(state_dict, version)     # between generate() calls; sets engine.policy_version

The behaviour distribution over the student's logits z is pi_b(v) = softmax(z / T)(v) / mass(nucleus)
for v in the nucleus, else 0: a token is in the nucleus iff the mass of the tokens ranked above it
is < top_p (top_p = 1 keeps all; no top-k truncation). b = log pi_b(y) is the log-prob of exactly
the distribution y was drawn from, so importance ratios pi_theta / pi_b are exact.

The trajectory (batch_format.py: CPU tensors, rows by its shift convention) holds the behaviour-side fields;
student_topk_* if student_topk > 0, mc_* if mc_samples > 0 (column 0 = the generated token, columns 1..M-1 i.i.d.
draws from pi_b, duplicates kept). rollout_unit() is the rollout role's work for one unit; check_engine() checks an
engine's settings before any process starts.
"""
import os
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

import estimators
from batch_format import Batch, check_generate_request, pack_trajectory
from config import Config, training_dtype
from optional import vllm_support
from schedule import ROLLOUT_STREAM, unit_generator

ENGINES = ("hf", "vllm")


class Engine(Protocol):
    """What every rollout engine offers (HFEngine below; VLLMEngine in optional/vllm_engine.py)."""
    device: torch.device  # where it samples (its generator's device)
    policy_version: int  # the learner version of the weights it holds

    def generate(self, prompts: list[list[int]], prompt_index: list[int], policy_version: int, *, student_topk: int = 0,
                 mc_samples: int = 0, generator: torch.Generator | None = None, greedy: bool = False) -> Batch: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...


def check_engine(kind: str, fields: set | frozenset = frozenset(), *, mc_samples: int | None = None,
                 temperature: float | None = None, top_p: float = 1.0, devices: list[str] | tuple = ()) -> None:
    """Raise ValueError (naming the fix) if engine `kind` cannot produce the cache `fields` the estimator needs with
    these settings. Called at config validation, before any process starts; does not import vllm."""
    if kind not in ENGINES:
        raise ValueError(f"unknown rollout engine {kind!r}: use one of {', '.join(ENGINES)}")
    if kind == "vllm":
        vllm_support.check(fields, mc_samples, temperature, top_p, devices)


def make_engine(model: str | PreTrainedModel, *, kind: str = "hf", device: str | torch.device = "cpu",
                temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64, eos_token_id: int | None = None,
                pad_token_id: int | None = None, dtype: torch.dtype | str | None = None, mc_samples: int = 0,
                **vllm_kwargs) -> Engine:
    """Build a rollout engine from a model directory or (hf only) a built transformers model, moved to `device` in
    place. dtype: torch dtype for hf (None = the built model's, float32 from a directory), vLLM dtype string for vllm
    (None = "auto"). mc_samples: the most MC samples generate() will ask for (vllm sets its draws up at start; hf
    draws any number). vllm_kwargs go to vllm.LLM (e.g. max_logprobs)."""
    check_engine(kind)  # unknown kind
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (greedy decoding has no behaviour distribution)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if eos_token_id is None:
        raise ValueError("eos_token_id is required: pass tokenizer.eos_token_id")
    pad_token_id = eos_token_id if pad_token_id is None else pad_token_id  # pads are masked; any id works
    if kind == "vllm":
        mc_draws = mc_samples > 1
        check_engine(kind, {"mc_ids"} if mc_draws else set(), mc_samples=mc_samples, temperature=temperature,
                     top_p=top_p, devices=(device,))
        # before vllm is imported: the engine core in this process (weights and MC draws pass as objects); Model
        # Runner V2 only for MC draws (the logits-processor interface of vllm_engine.MCDrawProcessor), else vLLM's
        # default runner
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if mc_draws:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        from optional.vllm_engine import VLLMEngine  # imports vllm
        return VLLMEngine(model, device, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          eos_token_id=eos_token_id, dtype=dtype, mc_draws=mc_draws, **vllm_kwargs)
    if vllm_kwargs:
        raise ValueError(f"engine 'hf' takes no extra options, got {sorted(vllm_kwargs)}: drop them or use engine=vllm")
    return HFEngine(model, device, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, dtype=dtype)


def engine_from_config(cfg: Config, model: str, device: str, tokenizer: PreTrainedTokenizerBase) -> Engine:
    """The engine a config asks for (rollout role, precompute, reference loop): one dtype, one sampler."""
    on_gpu = torch.device(device).type == "cuda"  # vLLM reads gpu_memory_utilization as a share of host RAM on cpu
    vllm_options = {"gpu_memory_utilization": cfg.gpu_memory_utilization} if cfg.engine == "vllm" and on_gpu else {}
    return make_engine(model, kind=cfg.engine, device=device, temperature=cfg.temperature, top_p=cfg.top_p,
                       max_new_tokens=cfg.max_new_tokens, dtype=training_dtype(cfg),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       mc_samples=estimators.needs(cfg.loss).mc_samples, **vllm_options)


def behaviour_logp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log pi_b over the vocabulary, float32 [B, V] (see the module docstring)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        p = sorted_logp.exp()
        mass_above = p.cumsum(-1) - p  # mass of strictly higher-ranked tokens; 0 for the top token
        drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample_ids(logp: torch.Tensor, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """num i.i.d. draws per row from exp(logp) [B, V] -> ids [B, num], by inverse CDF: u ~ U[0, total),
    id = first index whose cumulative mass exceeds u, so a zero-probability token is never hit. The
    uniforms come from `generator` on its own device, so a CPU generator drives GPU sampling too."""
    cdf = logp.double().exp().cumsum(-1)
    gen_device = generator.device if generator is not None else logp.device
    u = torch.rand(logp.shape[0], num, generator=generator, device=gen_device, dtype=torch.float64)
    u = u.to(logp.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(logp.shape[-1] - 1)


class HFEngine:
    """Own batched sampling loop over a transformers causal LM with its KV cache (CPU or GPU). Prompts are left-padded
    and position ids count real tokens only, so every logit equals that of a plain right-padded forward over prompt +
    response. Sequences past EOS run on (fed pad); packing drops their rows."""

    def __init__(self, model: str | PreTrainedModel, device: str | torch.device, *, temperature: float, top_p: float,
                 max_new_tokens: int, eos_token_id: int, pad_token_id: int, dtype: torch.dtype | None):
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype or torch.float32)
        elif dtype is not None:
            model = model.to(dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.eos_token_id, self.pad_token_id, self.policy_version = eos_token_id, pad_token_id, 0

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], prompt_index: list[int], policy_version: int, *, student_topk: int = 0,
                 mc_samples: int = 0, generator: torch.Generator | None = None, greedy: bool = False) -> Batch:
        """greedy=True (evaluation) takes the argmax; b is then still log pi_b of that token."""
        check_generate_request(self, prompts, prompt_index, policy_version, student_topk, mc_samples)
        B, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        if student_topk > self.model.config.vocab_size:
            raise ValueError(f"student_topk={student_topk} exceeds the vocabulary ({self.model.config.vocab_size}): "
                             "lower it")
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        steps = []  # one {field: [B, ...]} per decoding step
        for t in range(self.max_new_tokens):
            logp = behaviour_logp(self.logits(out.last_hidden_state[:, -1]), self.temperature, self.top_p)
            draws = logp.argmax(-1, keepdim=True) if greedy else sample_ids(logp, max(mc_samples, 1), generator)
            tok = draws[:, 0].masked_fill(done, self.pad_token_id)
            step = {"alive": ~done, "token_ids": tok, "behavior_logp": logp.gather(1, tok[:, None])[:, 0]}
            if student_topk:
                top = logp.topk(student_topk, dim=-1)
                step.update(student_topk_ids=top.indices, student_topk_behavior_logp=top.values)
            if mc_samples:
                step.update(mc_ids=draws, mc_behavior_logp=logp.gather(1, draws))
            steps.append(step)
            done = done | (tok == self.eos_token_id)
            if bool(done.all()) or t == self.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=self.device)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model.base_model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                                        past_key_values=out.past_key_values, use_cache=True)
        alive = torch.stack([s.pop("alive") for s in steps], dim=1)  # [B, T]; row-major = token-major packing
        per_token = {k: torch.stack([s[k] for s in steps], dim=1)[alive] for k in steps[0]}
        return pack_trajectory(prompts, prompt_index, alive.sum(1).tolist(), done.cpu(), policy_version, per_token)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, V] from the backbone's last hidden state, as the learner computes them
        (estimators.gather_logprobs): a bf16 LM head would round a logit of size 16-32 by up to 0.06."""
        weight = self.model.get_output_embeddings().weight
        if hidden.is_cuda and weight.dtype != torch.float32:  # accumulates in fp32 without an fp32 copy of W
            return torch.mm(hidden, weight.T, out_dtype=torch.float32)
        return hidden.float() @ weight.float().T

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Copy a full state dict (same architecture, HF names) into the model; set the version."""
        expected = set(self.model.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"load_weights: state_dict does not match the rollout model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}): send the full state_dict of the same architecture")
        self.model.load_state_dict(state_dict, strict=True)
        self.policy_version = int(version)


def rollout_unit(cfg: Config, engine: Engine, rows: list[dict], idx: list[int], unit: int) -> Batch:
    """Rollout unit `unit` from the prompts rows[i], i in idx, with the behaviour-side fields the estimator needs,
    sampled from the unit's own random stream."""
    need, stream = estimators.needs(cfg.loss), unit_generator(cfg, unit, ROLLOUT_STREAM, engine.device)
    return engine.generate([rows[i]["ids"] for i in idx], idx, engine.policy_version, student_topk=need.student_topk,
                           mc_samples=need.mc_samples, generator=stream)
