"""Rollout engines: the student samples responses and records what the estimators need.

make_engine() builds one of two engines ("hf", "vllm") sharing one duck-typed interface:

    traj = engine.generate(prompts, prompt_index, policy_version, student_topk, mc_samples, generator)
    engine.load_weights(state_dict, version)     # between generate() calls; sets engine.policy_version

The behaviour distribution over the student's logits z is pi_b(v) = softmax(z / T)(v) / mass(nucleus)
for v in the nucleus, else 0: a token is in the nucleus iff the mass of the tokens ranked above it
is < top_p (top_p = 1 keeps all; no top-k truncation). b = log pi_b(y) is the log-prob of exactly
the distribution y was drawn from, so importance ratios pi_theta / pi_b are exact.

Row r of every per-token field describes response token y_r, the model output at absolute position
P + r - 1 (teacher_cache.py's shift convention). The trajectory (CPU tensors) holds the behaviour-side
fields of teacher_cache.py's contract; student_topk_* if student_topk > 0, mc_* if mc_samples > 0
(column 0 = the generated token, columns 1..M-1 i.i.d. draws from pi_b, duplicates kept).
"""
import torch

ENGINES = ("hf", "vllm")


def engine_supports(kind, fields, mc_samples=None):
    """Raise ValueError (naming the fix) if engine `kind` cannot produce the cache `fields` the
    estimator needs. Called at config validation; mc_samples <= 1 (the generated token) is fine."""
    if kind not in ENGINES:
        raise ValueError(f"unknown rollout engine {kind!r}: use one of {', '.join(ENGINES)}")
    wants_mc = "mc_ids" in fields or "mc_behavior_logp" in fields
    if kind == "vllm" and wants_mc and (mc_samples is None or mc_samples > 1):
        raise ValueError("engine 'vllm' cannot draw extra Monte Carlo samples from the behaviour distribution "
                         "through its public API: use engine=hf or a non-MC estimator")


def make_engine(model, kind="hf", device="cpu", temperature=1.0, top_p=1.0, max_new_tokens=64,
                eos_token_id=None, pad_token_id=None, dtype=None, **vllm_kwargs):
    """Build a rollout engine from a model directory or (hf only) a built transformers model, moved
    to `device` in place. dtype: torch dtype for hf (None = the built model's, float32 from a directory),
    vLLM dtype string for vllm (None = "auto"). vllm_kwargs go to vllm.LLM (e.g. max_logprobs)."""
    engine_supports(kind, ())  # unknown kind
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0 (greedy decoding has no behaviour distribution)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if eos_token_id is None:
        raise ValueError("eos_token_id is required: pass tokenizer.eos_token_id")
    pad_token_id = eos_token_id if pad_token_id is None else pad_token_id  # pads are masked; any id works
    if kind == "hf":
        if vllm_kwargs:
            raise ValueError(f"engine 'hf' takes no extra options, got {sorted(vllm_kwargs)}: drop them or use engine=vllm")
        return HFEngine(model, device, temperature, top_p, max_new_tokens, eos_token_id, pad_token_id, dtype)
    return VLLMEngine(model, device, temperature, top_p, max_new_tokens, eos_token_id, dtype, **vllm_kwargs)


# ----------------------------------------------------------------------------- sampling math
def behaviour_logp(logits, temperature, top_p):
    """log pi_b over the vocabulary, float32 [B, V] (see the module docstring)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        p = sorted_logp.exp()
        mass_above = p.cumsum(-1) - p  # mass of strictly higher-ranked tokens; 0 for the top token
        drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def sample_ids(logp, num, generator=None):
    """num i.i.d. draws per row from exp(logp) [B, V] -> ids [B, num], by inverse CDF: u ~ U[0, total),
    id = first index whose cumulative mass exceeds u, so a zero-probability token is never hit. The
    uniforms come from `generator` on its own device, so a CPU generator drives GPU sampling too."""
    cdf = logp.double().exp().cumsum(-1)
    gen_device = generator.device if generator is not None else logp.device
    u = torch.rand(logp.shape[0], num, generator=generator, device=gen_device, dtype=torch.float64)
    u = u.to(logp.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(logp.shape[-1] - 1)


def _check_request(engine, prompts, prompt_index, policy_version, student_topk, mc_samples):
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


def _pack(prompts, prompt_index, lengths, finished, policy_version, per_token):
    """Sequence fields + per-token fields (already packed, token-major) -> trajectory dict."""
    n = int(sum(lengths))
    return {"prompt_ids": torch.tensor([t for p in prompts for t in p], dtype=torch.int64),
            "prompt_cu_seqlens": torch.tensor([0] + [len(p) for p in prompts]).cumsum(0),
            "cu_seqlens": torch.tensor([0] + list(lengths)).cumsum(0),
            "finished": torch.as_tensor(finished, dtype=torch.bool),
            "prompt_index": torch.as_tensor(prompt_index, dtype=torch.int64),
            "policy_version": torch.full((n,), policy_version, dtype=torch.int64),
            "loss_mask": torch.ones(n, dtype=torch.bool),
            **{k: v.cpu().to(torch.int64 if k.endswith("ids") else torch.float32) for k, v in per_token.items()}}


# ----------------------------------------------------------------------------- transformers engine
class HFEngine:
    """Own batched sampling loop over a transformers causal LM with its KV cache (CPU or GPU).

    Prompts are left-padded and position ids count real tokens only, so every logit equals that of a
    plain right-padded forward over prompt + response. Sequences past EOS run on (fed pad); packing
    drops their rows."""

    def __init__(self, model, device, temperature, top_p, max_new_tokens, eos_token_id, pad_token_id, dtype):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype or torch.float32)
        elif dtype is not None:
            model = model.to(dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.policy_version = 0

    @torch.no_grad()
    def generate(self, prompts, prompt_index, policy_version, student_topk=0, mc_samples=0, generator=None, greedy=False):
        """greedy=True (evaluation) takes the argmax; b is then still log pi_b of that token."""
        _check_request(self, prompts, prompt_index, policy_version, student_topk, mc_samples)
        B, width = len(prompts), max(len(p) for p in prompts)
        # left padding: real tokens flush right
        ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        if student_topk > out.logits.shape[-1]:
            raise ValueError(f"student_topk={student_topk} exceeds the vocabulary ({out.logits.shape[-1]}): lower it")

        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        steps = []  # one {field: [B, ...]} per decoding step
        for t in range(self.max_new_tokens):
            logp = behaviour_logp(out.logits[:, -1], self.temperature, self.top_p)
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
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=out.past_key_values, use_cache=True)

        alive = torch.stack([s.pop("alive") for s in steps], dim=1)  # [B, T]; row-major = token-major packing
        per_token = {k: torch.stack([s[k] for s in steps], dim=1)[alive] for k in steps[0]}
        return _pack(prompts, prompt_index, alive.sum(1).tolist(), done.cpu(), policy_version, per_token)

    @torch.no_grad()
    def load_weights(self, state_dict, version):
        """Copy a full state dict (same architecture, HF names) into the model; set the version."""
        expected = set(self.model.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"load_weights: state_dict does not match the rollout model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}): send the full state_dict of the same architecture")
        self.model.load_state_dict(state_dict, strict=True)
        self.policy_version = int(version)


# ----------------------------------------------------------------------------- vLLM engine
class VLLMEngine:
    """vLLM 0.33.0 adapter (GPU only, public API only). NOT exercised by the tests, which run on CPU
    without vLLM (a stub checks the plumbing). Facts used (../shared/reference/vllm-api.md):

    - LLM(logprobs_mode="processed_logprobs"): log-probs after temperature and top-p, i.e. under exactly
      the sampled distribution; SamplingParams(top_k=0, logprobs=K_s, stop_token_ids, seed); the sampled
      token is always in the per-position logprob dict; generate() keeps the input order (section 1).
    - collective_rpc("reload_weights", kwargs={"weights_iterator": ...}), then reset_prefix_cache(),
      else prefix caching serves stale KV (sections 2.3, 3).
    - no public way to draw extra samples from the processed distribution: mc_samples > 1 is refused
      (section 4). vLLM takes the first visible GPU and spawns its own engine-core process: the rollout
      child sets CUDA_VISIBLE_DEVICES first and is non-daemonic (section 3)."""

    def __init__(self, model, device, temperature, top_p, max_new_tokens, eos_token_id, dtype, **llm_kwargs):
        if not isinstance(model, str):
            raise ValueError("engine 'vllm' needs a model directory, not a built model: save it with save_pretrained")
        if temperature < 0.01:  # vLLM silently raises such temperatures to 0.01; b would not match the learner's
            raise ValueError(f"engine 'vllm' needs temperature >= 0.01, got {temperature}: raise it or use engine=hf")
        if not str(device).startswith("cuda"):
            raise ValueError(f"engine 'vllm' runs on a GPU, got device={device!r}: use engine=hf on cpu")
        try:
            import vllm
        except ImportError as e:
            raise ValueError("engine 'vllm' needs vllm==0.33.0, which is not installed: "
                             "pip install -r requirements-gpu.txt, or use engine=hf") from e
        if vllm.__version__ != "0.33.0":
            raise ValueError(f"engine 'vllm' is written for vllm 0.33.0, found {vllm.__version__}: "
                             "pip install -r requirements-gpu.txt")
        self.max_logprobs = llm_kwargs.pop("max_logprobs", 64)
        self.llm = vllm.LLM(model=model, dtype=dtype or "auto", logprobs_mode="processed_logprobs",
                            max_logprobs=self.max_logprobs, **llm_kwargs)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.eos_token_id = eos_token_id
        self.policy_version = 0

    def generate(self, prompts, prompt_index, policy_version, student_topk=0, mc_samples=0, generator=None, greedy=False):
        from vllm import SamplingParams, TokensPrompt

        _check_request(self, prompts, prompt_index, policy_version, student_topk, mc_samples)
        engine_supports("vllm", {"mc_ids"}, mc_samples)  # mc_samples <= 1 passes
        if student_topk > self.max_logprobs:
            raise ValueError(f"student_topk={student_topk} > max_logprobs={self.max_logprobs}: "
                             f"pass max_logprobs={student_topk} to make_engine")
        # one seed per request: a shared seed would give identical samples for repeated prompts
        seeds = ([None] * len(prompts) if generator is None else
                 torch.randint(2**31 - 1, (len(prompts),), generator=generator, device=generator.device).tolist())
        params = [SamplingParams(n=1, temperature=0.0 if greedy else self.temperature, top_p=self.top_p, top_k=0, min_p=0.0,
                                 max_tokens=self.max_new_tokens, logprobs=student_topk,
                                 stop_token_ids=[self.eos_token_id], detokenize=False, seed=s) for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        completions = [out.outputs[0] for out in outputs]
        finished = [c.finish_reason == "stop" for c in completions]
        for c, stopped in zip(completions, finished):
            if stopped and c.token_ids[-1] != self.eos_token_id:
                raise ValueError(f"vllm stopped on token {c.token_ids[-1]}, not eos_token_id={self.eos_token_id} "
                                 "(the model's generation_config adds EOS ids): pass the id it uses as eos_token_id")
        rows = [(y, lp) for c in completions for y, lp in zip(c.token_ids, c.logprobs)]  # lp: {id: Logprob}
        per_token = {"token_ids": torch.tensor([y for y, _ in rows]),
                     "behavior_logp": torch.tensor([lp[y].logprob for y, lp in rows])}
        if student_topk:  # the K_s most probable per position, sorted; y only if it is among them
            best = [sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:student_topk] for _, lp in rows]
            per_token.update(student_topk_ids=torch.tensor([[i for i, _ in top] for top in best]),
                             student_topk_behavior_logp=torch.tensor([[v.logprob for _, v in top] for top in best]))
        if mc_samples:  # M == 1: the generated token is the only draw
            per_token.update(mc_ids=per_token["token_ids"][:, None].clone(),
                             mc_behavior_logp=per_token["behavior_logp"][:, None].clone())
        lengths = [len(c.token_ids) for c in completions]
        return _pack(prompts, prompt_index, lengths, finished, policy_version, per_token)

    def load_weights(self, state_dict, version):
        """Reload in place (HF names; vLLM fuses qkv/gate_up itself), then drop the prefix cache."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        self.llm.reset_prefix_cache()
        self.policy_version = int(version)
