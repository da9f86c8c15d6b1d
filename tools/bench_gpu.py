"""Benchmarks that size the GPU path (commands, not timed tests); the runs on this machine are in tools/bench.py.

    .venv/bin/python -m tools.bench_gpu loss [--tokens 1024,2048,4096] [--vocab 151936] [--hidden 896] [--device cpu]
    .venv/bin/python -m tools.bench_gpu memory [CONFIG.yaml ...] [--tokens 256]
    .venv/bin/python -m tools.bench_gpu mc-draw [--rows 1,8,32,128] [--vocab 151936] [--samples 64] [--device cpu]

loss: peak extra memory and time of the learner's loss path (gather + estimator + backward) at a Qwen-size
vocabulary, chunked gather (estimators.gather_logprobs) vs naive (full float32 log_softmax, then gather), each point
in a fresh subprocess; see loss_point(). On CPU, scale tokens down and read the linear fit's extrapolation to
EXTRAPOLATE.
memory: modelled peak GPU memory of every role of each shipped GPU config against an 80 GB GPU (fits: <= 68 GB), from
one real-size decoder layer per model measured on CPU in seconds (no downloads); see cmd_memory() and the *_terms()
functions, one line per term. Exit status 1 if a config does not fit.
mc-draw: time per decode step of vllm_engine.MCDrawProcessor.apply (M-1 draws per row inside vLLM); needs vllm
importable (the test .venv has it: bash run.sh test once).
"""
import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config, Qwen3MoeConfig
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3

import config
import estimators as E
from batch_format import FIELD_SPECS
from tools.bench import ROOT, build_parser

# loss: ids per token (M), student_logp chunk; naive is skipped above NAIVE_MAX_TOKENS (~2.3 MB/token)
SAMPLES, CHUNK_SIZE, NAIVE_MAX_TOKENS, EXTRAPOLATE = 64, 1024, 2048, 16384


# ----------------------------------------------------------------------------- loss path
def _memory_bytes(device, start):
    """start: reset the peak and return the bytes held now; else the peak since. CPU: RSS from /proc (Linux)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        if start:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() if start else torch.cuda.max_memory_allocated()
    if start:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith("VmRSS:" if start else "VmHWM:")))


def loss_point(variant, tokens, vocab, hidden_size, device, samples=SAMPLES, chunk_size=CHUNK_SIZE, threads=1, seed=0):
    """One loss path run in this process: {"peak_extra_bytes", "seconds", ...}. Extra memory = peak minus the memory
    held before the path (inputs, lm_head weight, cache): on CPU the peak RSS (VmHWM, reset through
    /proc/self/clear_refs after setup), on CUDA max_memory_allocated. The lm_head weight gradient ([V, H] float32) is
    allocated inside the path and counted."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    N, V, H, M = tokens, vocab, hidden_size, samples
    # in-place init: no temporaries that would raise the peak before the measurement starts
    hidden = torch.empty(N, H, device=device).normal_().requires_grad_()
    weight = torch.empty(V, H, device=device).normal_(0, 3 / H ** 0.5).requires_grad_()  # logits std ~3
    ids = torch.randint(0, V, (N, M), device=device)
    cache = {"mc_ids": ids, "mc_behavior_logp": torch.empty(N, M, device=device).uniform_(-12, -1),
             "mc_teacher_logp": torch.empty(N, M, device=device).uniform_(-12, -1),
             "loss_mask": torch.ones(N, dtype=torch.bool, device=device),
             "cu_seqlens": torch.tensor([0, N], device=device)}
    opts = E.LossOptions(name="reverse_kl_mc", samples=M, chunk_size=chunk_size)
    before, start = _memory_bytes(device, start=True), time.perf_counter()
    if variant == "chunked":
        s = E.gather_logprobs(hidden, weight, {"mc_ids": ids}, chunk_size=chunk_size)
    else:  # naive: the whole float32 [N, V] log-softmax, then gather
        s = {"mc_ids": torch.log_softmax(hidden.float() @ weight.float().T, dim=-1).gather(1, ids)}
    loss, _ = E.compute_loss(s, cache, opts)
    loss.backward()
    peak, seconds = _memory_bytes(device, start=False), time.perf_counter() - start
    return {"variant": variant, "tokens": N, "peak_extra_bytes": peak - before, "seconds": seconds,
            "loss": float(loss), "grad_finite": bool(torch.isfinite(weight.grad).all())}


def cmd_loss(args):
    tokens, V, H = [int(x) for x in args.tokens.split(",")], args.vocab, args.hidden
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu, 1 thread(s)"
    print(f"loss path: reverse_kl_mc (A_theta, ratio), M={SAMPLES} ids/token, V={V}, H={H}, "
          f"chunk_size={CHUNK_SIZE}, float32, {device_name}")
    print(f"{'variant':8s} {'tokens':>7s} {'peak extra MB':>14s} {'MB/token':>9s} {'time s':>8s} {'ms/token':>9s}")
    results = {}
    for variant, n in [(v, n) for v in ("chunked", "naive") for n in tokens if v == "chunked" or n <= NAIVE_MAX_TOKENS]:
        spec = dict(variant=variant, tokens=n, vocab=V, hidden_size=H, device=args.device)
        out = subprocess.run([sys.executable, "-m", "tools.bench_gpu", "_loss_point", json.dumps(spec)],  # a fresh
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))  # process: its peak
        if out.returncode != 0:
            raise RuntimeError(f"{variant} at {n} tokens failed (rc {out.returncode}): {out.stderr.strip()[-500:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if not r["grad_finite"]:
            raise RuntimeError(f"{variant} at {n} tokens gave a non-finite gradient")
        results.setdefault(variant, []).append(r)
        mb, s = r["peak_extra_bytes"] / 2**20, r["seconds"]
        print(f"{variant:8s} {n:7d} {mb:14.1f} {mb / n:9.3f} {s:8.2f} {1e3 * s / n:9.2f}", flush=True)
    print(f"linear fit peak_extra = a + b * tokens, extrapolated to {EXTRAPOLATE} tokens:")
    for variant, rs in results.items():
        if len(rs) >= 2:
            b, a = np.polyfit([r["tokens"] for r in rs], [r["peak_extra_bytes"] / 2**20 for r in rs], 1)
            t = sum(r["seconds"] for r in rs) / sum(r["tokens"] for r in rs)
            print(f"  {variant:8s} a = {a:8.1f} MB  b = {b:.4f} MB/token  ->  {(a + b * EXTRAPOLATE) / 1024:6.2f} GB, "
                  f"~{t * EXTRAPOLATE:.0f} s at this speed")
    print(f"reference sizes: float32 [{EXTRAPOLATE}, {V}] = {EXTRAPOLATE * V * 4 / 2**30:.2f} GB; float32 "
          f"[chunk={CHUNK_SIZE}, V] = {CHUNK_SIZE * V * 4 / 2**20:.0f} MB; "
          f"lm_head grad [V, H] = {V * H * 4 / 2**20:.0f} MB")


# ----------------------------------------------------------------------------- memory (shipped GPU configs)
GPU_BYTES, FIT = 80e9, 0.85  # an 80 GB GPU; a config fits if every device's modelled peak is <= 85% of it (68 GB)
GPU_CONFIGS = ["configs/gpu1_smoke.yaml", "configs/qwen2.5_gsm8k_4gpu.yaml", "configs/qwen3_deepmath_8gpu.yaml",
               "configs/qwen3_deepmath_8gpu_fkl.yaml", "configs/qwen3_30b_teacher_8gpu.yaml"]
# Real model dims, from each model's config.json on the Hugging Face Hub (Qwen/<name>; nothing is downloaded here).
MODELS = {
    "Qwen2.5-0.5B-Instruct": dict(hidden=896, inter=4864, layers=24, heads=14, kv=2, head_dim=64, tied=True),
    "Qwen2.5-1.5B-Instruct": dict(hidden=1536, inter=8960, layers=28, heads=12, kv=2, head_dim=128, tied=True),
    "Qwen3-1.7B-Base": dict(hidden=2048, inter=6144, layers=28, heads=16, kv=8, head_dim=128, tied=True),
    "Qwen3-8B": dict(hidden=4096, inter=12288, layers=36, heads=32, kv=8, head_dim=128, tied=False),
}
# Teachers only vLLM serves here (teacher_engine=vllm): their parameter count, from a meta-device build.
VLLM_TEACHERS = {"Qwen3-30B-A3B-Instruct-2507": Qwen3MoeConfig(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    tie_word_embeddings=False)}
VOCAB = 151936  # every model above (config.json vocab_size)
OVERHEAD, SLACK = 2.5e9, 0.05  # per process: CUDA context + NCCL/cuBLAS workspaces; allocator fragmentation on tensors
VLLM_BUDGET = "vLLM gpu_memory_utilization x GPU (weights, KV cache, activations, its CUDA context: all inside)"


def measure_model(name, tokens=256):
    """MODELS[name] plus parameter counts of the real model (built on the meta device) and, from one real-size decoder
    layer in bf16 on CPU, batch 1 x `tokens`, no padding mask, the bytes per token saved for backward
    (saved_tensors_hooks, unique storages, parameters excluded), without and with activation checkpointing (the
    learner's non-reentrant checkpoint_wrapper: the hooks see what the checkpoint keeps, its input; what the layer
    saves inside goes to the checkpoint's own hooks and is recomputed)."""
    d, is_qwen3 = MODELS[name], name.startswith("Qwen3")
    conf = (Qwen3Config if is_qwen3 else Qwen2Config)(
        vocab_size=VOCAB, hidden_size=d["hidden"], intermediate_size=d["inter"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], num_key_value_heads=d["kv"], tie_word_embeddings=d["tied"],
        **({"head_dim": d["head_dim"]} if is_qwen3 else {}))
    conf._attn_implementation = "sdpa"
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())
    torch.manual_seed(0)
    layer = (qwen3.Qwen3DecoderLayer if is_qwen3 else qwen2.Qwen2DecoderLayer)(conf, layer_idx=0).to(torch.bfloat16)
    rope = (qwen3.Qwen3RotaryEmbedding if is_qwen3 else qwen2.Qwen2RotaryEmbedding)(conf)
    param_storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    pos, act = torch.arange(tokens)[None], {}
    for ckpt in (False, True):
        x = torch.randn(1, tokens, conf.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        cos_sin = rope(x, pos)
        run = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT) if ckpt else layer
        seen = {}

        def pack(t, seen=seen):
            s = t.untyped_storage()
            if s.data_ptr() not in param_storages:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(x, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
        act["ckpt" if ckpt else "plain"] = sum(seen.values()) / tokens
    # saved: one layer's bytes per token, + k and v repeated to all heads (SDPA with a mask)
    return dict(d, name=name, params=params, layer_params=sum(p.numel() for p in layer.parameters()), act=act,
                saved=act["plain"] + 2 * (d["heads"] - d["kv"]) * d["head_dim"] * 2)


def vllm_teacher_terms(cfg, conf):
    """vLLM teacher, per GPU of its tensor-parallel group: its gpu_memory_utilization budget (bf16 weights / TP, KV
    cache, activations, inside) + the prompt log-prob workspace outside vLLM's memory profile, two fp32 [1024, V]
    chunks (v1/worker/gpu/sample/prompt_logprob.py), + a unit's scores [N, M + 1] fp32 until the request ends."""
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())
    N = cfg.rollout_batch_size * cfg.max_new_tokens
    return params, {VLLM_BUDGET: cfg.gpu_memory_utilization * GPU_BYTES,
                    "prompt log-prob chunks: 2 x [1024, V] fp32": 2 * 4 * 1024 * VOCAB,
                    f"a unit's id scores [{N}, {cfg.loss.samples + cfg.loss.student_topk}] fp32":
                        4 * N * (cfg.loss.samples + cfg.loss.student_topk)}


def cache_bytes_per_token(cfg):
    """Bytes per response token of the batch's cache fields (batch_format.py's table) for this estimator."""
    fields = E.required_fields(cfg.loss) | {"behavior_logp", "teacher_logp", "policy_version"}
    width = {"K": cfg.loss.teacher_topk, "Ks": cfg.loss.student_topk, "M": cfg.loss.samples, "Mt": cfg.loss.samples}
    specs = [FIELD_SPECS[f] for f in fields]
    per_token = sum(s["dtype"].itemsize * (width[s["width"]] if s["width"] else 1) for s in specs if s["rows"] == "N")
    return per_token + 8  # + the prompt ids, ~1 prompt token per response token at most


def learner_terms(cfg, m):
    """Peak bytes on one learner rank (FSDP2, bf16 compute, fp32 master weights), term by term."""
    W, P, PL, H, L, V = len(cfg.learner_devices), m["params"], m["layer_params"], m["hidden"], m["layers"], VOCAB
    root = P - L * PL  # embeddings (+ untied lm_head) + final norm: FSDP2's root group, unsharded for fwd+bwd
    S = cfg.max_prompt_len + cfg.max_new_tokens  # longest padded sequence
    shard = cfg.batch_size // (cfg.mini_batches * W) * S  # a rank's mini-batch, padded, in one pass
    T = max(min(cfg.micro_batch_tokens or shard, shard), S)  # padded tokens per pass; a longer sequence runs alone
    K = {"reverse_kl_mc": cfg.loss.samples, "forward_kl_topk": cfg.loss.teacher_topk}.get(cfg.loss.name, 16) + 1
    C = cfg.loss.chunk_size
    if cfg.activation_checkpointing:  # layer inputs kept; one layer recomputed, plus as much again for its gradients
        acts, mask = T * (L * m["act"]["ckpt"] + 2 * m["saved"]), T * S * (1 + 2)
    else:  # every layer's saved set, plus one layer's gradients
        acts, mask = T * (L + 1) * m["saved"], T * S * (1 + 2 * L)
    dtype = 2 if cfg.mixed_precision else 4  # the training dtype: compute, published weights
    return {
        "fp32 master params / W": 4 * P / W,
        "fp32 grads / W": 4 * P / W,
        "AdamW exp_avg + exp_avg_sq / W": 8 * P / W,
        "unsharded params: root + 2 layers": dtype * (root + 2 * PL),
        "unsharded grads: root + 1 layer (+fp32 reduce copy)": (dtype + 4) * (root + PL),
        f"activations ({T} tokens/pass, ckpt={cfg.activation_checkpointing})": acts,
        "4D padding mask + SDPA bias copies": mask,
        "hidden/norm/rows/grad_h of the head": 20 * T * H,
        f"lm_head path: fp32 W copy + fp32 grad + [{C}, V] fp32": 8 * V * H + 4 * C * V,
        f"estimator: [N, {K}] fp32 tensors x12": 48 * T * K,
        "micro-batch cache tensors": T * cache_bytes_per_token(cfg),
        "publish: one full fp32 parameter (the embedding) gathered": 4 * V * H,
        "rank 0, weight_transport=handoff: the rollout's weight buffer":
            dtype * P * (config.resolve_transport(cfg) == "handoff"),
    }


def teacher_terms(cfg, m):
    """Peak bytes of the teacher process while scoring: bf16 weights + one token-budget sub-batch forward without
    grad (at most one layer's intermediates alive: bounded by that layer's saved-for-backward set) + the unit's
    gathered rows + the chunked log_softmax. Its greedy evaluation: generation_terms."""
    S, H, C = cfg.max_prompt_len + cfg.max_new_tokens, m["hidden"], 1024  # score_unit: teacher_cache.score's chunk
    unit, N = cfg.rollout_batch_size * S, cfg.rollout_batch_size * cfg.max_new_tokens
    T = max(min(cfg.teacher_batch_tokens or unit, unit), S)
    return {"bf16 weights": 2 * m["params"],
            f"sub-batch forward ({T} tokens), one layer live": T * (m["saved"] + 3 * 2 * H),
            "4D padding mask + SDPA bias copy": T * S * 3,
            "unit's gathered rows [N, H] bf16": N * 2 * H,
            f"chunked log_softmax [{C}, V] bf16 + 2 fp32 (+exp)": C * VOCAB * 14,
            "unit's cache fields in and out (x2 for validate)": 2 * N * cache_bytes_per_token(cfg)}


def generation_terms(cfg, m, B, w, weights_term, buffers_term):
    """HF engine generating B sequences with w bytes per value (the teacher's evaluation: bf16; a rollout worker: the
    training dtype): weights + KV cache + prefill of one layer + fp32 [B, V] buffers."""
    S, prompt = cfg.max_prompt_len + cfg.max_new_tokens, cfg.max_prompt_len
    return {weights_term: w * m["params"],
            f"KV cache {B} x {S} tokens": B * S * 2 * m["kv"] * m["head_dim"] * w * m["layers"],
            f"prefill {B} x {prompt} tokens, one layer": B * prompt * (m["saved"] * w / 2 + 2 * w * m["hidden"]),
            buffers_term: B * VOCAB * 32}


def rollout_terms(cfg, m):
    """vLLM: its gpu_memory_utilization share of the GPU (weights, KV cache, activations, all inside it) + the MC
    draws outside it (vllm_engine.draw: fp32 z/T [rows, V], then float64 log-softmax, exp and CDF per chunk of
    ROW_CHUNK_ELEMENTS; one row per request of the unit) + the recorded draws of a unit until generate() returns.
    HF engine: generation_terms of a unit or worker 0's evaluation batch, in the training dtype."""
    R, S, mc = cfg.rollout_batch_size, cfg.max_prompt_len + cfg.max_new_tokens, E.needs(cfg.loss).mc_samples
    if cfg.engine != "vllm":
        w = 2 if cfg.mixed_precision else 4  # bf16 with mixed_precision
        return generation_terms(cfg, m, max(R, min(cfg.eval_size, 250)), w, f"weights ({w} bytes)",
                                "[B, V] sampling buffers (logits, log-softmax, float64 CDF)")
    return {VLLM_BUDGET: cfg.gpu_memory_utilization * GPU_BYTES,
            f"MC draws (M={mc}): workspace [{R}, V]": (4 * R * VOCAB + 24 * min(R * VOCAB, 2**24)) if mc else 0,
            f"MC draws (M={mc}): a unit's recorded ids + b": R * S * (mc - 1) * 12 if mc else 0}


def cmd_memory(args):
    torch.set_num_threads(args.threads)
    print(f"saved activations per token, one real-size decoder layer, bf16, CPU, {args.tokens} tokens "
          "(saved_tensors_hooks; ckpt: what the checkpoint keeps)")
    measured = {}
    for name in MODELS:
        m = measured[name] = measure_model(name, args.tokens)
        print(f"  {name:<22} plain {m['act']['plain'] / 1024:7.1f} KiB/token/layer   "
              f"ckpt {m['act']['ckpt'] / 1024:5.1f} KiB   x {m['layers']} layers; "
              f"params {m['params'] / 1e9:.3f} B ({m['layer_params'] / 1e6:.1f} M per layer)")
    ok = True
    for path in args.configs:
        cfg = config.load_config(path)
        cfg.rollout_batch_size = cfg.rollout_batch_size or cfg.batch_size
        s, teacher = measured[os.path.basename(cfg.student)], os.path.basename(cfg.teacher)
        rollout = f"rollout worker ({'vLLM' if cfg.engine == 'vllm' else 'HF'})"
        roles = [("learner rank", cfg.learner_devices, learner_terms(cfg, s)),
                 (rollout, cfg.rollout_devices, rollout_terms(cfg, s))]
        if cfg.teacher_engine == "vllm":  # its weights must leave a quarter of its budget to the KV cache
            params, terms = vllm_teacher_terms(cfg, VLLM_TEACHERS[teacher])
            weights, budget = 2 * params / cfg.teacher_tensor_parallel, cfg.gpu_memory_utilization * GPU_BYTES
            fits = weights <= 0.75 * budget
            ok &= fits
            roles.append((f"teacher (vLLM, TP {cfg.teacher_tensor_parallel})", config.teacher_devices(cfg), terms))
            print(f"\n{path}: vLLM teacher {teacher}, {params / 1e9:.2f} B parameters: bf16 weights "
                  f"{weights / 1e9:.1f} GB per GPU of its {budget / 1e9:.1f} GB budget: "
                  f"{'fits' if fits else 'DOES NOT FIT'} (at most 75%, the rest for the KV cache)")
            t = {"name": teacher}
        else:
            t = measured[teacher]
            roles.insert(1, ("teacher scoring", [cfg.teacher_device], teacher_terms(cfg, t)))
        if cfg.eval_teacher and cfg.eval_size:  # task.evaluate's batch, at most 250
            roles.append(("teacher evaluation", [cfg.teacher_device], generation_terms(
                cfg, t, min(cfg.eval_size, 250), 2, "bf16 weights", "[B, V] sampling buffers")))
        print(f"\n{path}: student {s['name']}, teacher {t['name']}, {cfg.loss.name}; peak GB per process (sum of "
              f"the terms + {SLACK:.0%} fragmentation + {OVERHEAD / 1e9:.1f} GB CUDA context; vLLM: its budget)")
        ok &= _devices_fit(roles)
    print("\nall configs fit" if ok else "\nsome config does not fit: lower micro_batch_tokens / "
          "teacher_batch_tokens / gpu_memory_utilization or turn on activation_checkpointing")
    return ok


def _devices_fit(roles):
    """Prints each role's modelled peak and terms, then each device's total; True if every device fits."""
    per_process, per_device = {}, {}
    for role, devices, terms in roles:
        budget = terms.get(VLLM_BUDGET, 0.0)  # vLLM keeps itself within its budget; only what is outside gets slack
        peak = budget + sum(v for k, v in terms.items() if k != VLLM_BUDGET) * (1 + SLACK) + (0 if budget else OVERHEAD)
        print(f"  {role:<26} {peak / 1e9:6.1f} GB on {', '.join(devices)}")
        for k, v in terms.items():
            print(f"      {v / 1e9:7.2f}  {k}")
        for key in {(dev, role.split()[0]) for dev in devices}:  # evaluation and scoring are phases of one process:
            per_process[key] = max(per_process.get(key, 0.0), peak)  # its larger one counts
    for (dev, _), peak in per_process.items():
        per_device[dev] = per_device.get(dev, 0.0) + peak  # roles sharing a GPU add up
    for dev, peak in sorted(per_device.items()):
        print(f"  {dev:<8} {peak / 1e9:6.1f} GB of {GPU_BYTES / 1e9:.0f} GB ({100 * peak / GPU_BYTES:.0f}%)  "
              f"{'fits' if peak <= FIT * GPU_BYTES else 'DOES NOT FIT'} (limit {FIT * GPU_BYTES / 1e9:.0f} GB)")
    return all(peak <= FIT * GPU_BYTES for peak in per_device.values())


# ----------------------------------------------------------------------------- MC draws inside vLLM
def cmd_mc_draw(args):
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

    from optional import vllm_engine
    torch.set_num_threads(args.threads)
    rows_list, dev = [int(r) for r in args.rows.split(",")], args.device
    n = max(rows_list)
    state = LogitsProcRequestState(device=torch.device(dev), max_num_reqs=n, vocab_size=args.vocab,
                                   all_token_ids=None, prompt_len=None, total_len=None,
                                   prefill_len=types.SimpleNamespace(np=np.zeros(n, dtype=np.int32)))
    proc = vllm_engine.MCDrawProcessor(types.SimpleNamespace(speculative_config=None, watermark_config=None), state)
    for s in range(n):
        extra = {vllm_engine.MC_KEY: {"request": s, "draws": args.samples - 1, "seed": s}}
        proc.add_request(s, SamplingParams(temperature=0.8, extra_args=extra))
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    print(f"MCDrawProcessor.apply per decode step, V={args.vocab}, M={args.samples}, {dev}, "
          f"{torch.get_num_threads()} threads")
    for rows in rows_list:
        idx = torch.arange(rows, device=dev)
        ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.arange(rows),
                            expanded_local_pos=torch.zeros_like(idx), input_ids=torch.zeros_like(idx),
                            pos=torch.full((rows,), 100, device=dev), seq_lens_upper_bound_np=np.full(rows, 101))
        logits = torch.randn(rows, args.vocab, device=dev) * 3
        times = []
        for _ in range(args.repeats + 1):  # the first call warms up
            sync()
            t0 = time.perf_counter()
            proc.apply(logits, ctx)
            sync()
            times.append(time.perf_counter() - t0)
            vllm_engine.DRAWS.clear()
        ms = 1e3 * min(times[1:])
        print(f"  rows {rows:4d}: {ms:9.2f} ms/step  {ms / rows:7.3f} ms/row")


def parser():
    threads = ("--threads", 1)
    return build_parser(__doc__, {  # name: (function, help, arguments as (name, default[, help])), as in bench.py
        "loss": (cmd_loss, "memory and time of the loss path: chunked vs naive student gather", [
            ("--tokens", "1024,2048,4096", "comma-separated response-token counts"), ("--vocab", 151936),
            ("--hidden", 896), ("--device", "cpu")]),
        "memory": (lambda a: sys.exit(0 if cmd_memory(a) else 1),
                   "modelled peak GPU memory per role of each shipped GPU config, from measured layers", [
            ("configs", GPU_CONFIGS), ("--tokens", 256, "sequence length of the measured layer forward"), threads]),
        "mc-draw": (cmd_mc_draw, "cost of the vLLM MC-draw logits processor per decode step", [
            ("--rows", "1,8,32,128", "logits rows (requests) per step"), ("--vocab", 151936),
            ("--samples", 64, "M (M-1 draws per row)"), ("--device", "cpu"), ("--threads", 2), ("--repeats", 3)]),
        "_loss_point": (lambda a: print(json.dumps(loss_point(**json.loads(a.spec)))), None,
                        [("spec", None)]),  # internal: one measurement in a fresh process
    })


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
