"""Benchmarks (commands, not timed tests).

    python bench.py loss [--tokens 1024,2048,4096] [--vocab 151936] [--hidden 896] [--device cpu|cuda]
    python bench.py pipeline [--config configs/default.yaml] [--steps 24] [--max-staleness 2] [key=value ...]
    python bench.py offline [--steps 60] [--prompts 3840] [--teacher-b DIR] [key=value ...]
    python bench.py memory [CONFIG.yaml ...] [--tokens 256]
    python bench.py peer [--systems asyncopd,...,trl-distill] [--seeds 0,1,2] [--steps 2000] [key=value ...]
    python bench.py mc-draw [--rows 1,8,32,128] [--vocab 151936] [--samples 64] [--device cpu|cuda]

loss: peak extra memory and time of the learner's loss path (student_logp + estimator + backward) at a
Qwen-size vocabulary, chunked gather (estimators.student_logp) vs naive (full float32 log_softmax, then
gather), each point in a fresh subprocess; see loss_point(). On CPU, scale tokens down and read the
linear fit's extrapolation to EXTRAPOLATE tokens.
pipeline: the real pipeline (asyncopd.run) once per schedule on one config; see throughput().
offline: online async OPD vs offline Lightning OPD (precompute included) and teacher A vs B; see cmd_offline().
memory: modelled peak GPU memory of every role of each shipped GPU config against an 80 GB GPU (fits: <= 68 GB),
from one real-size decoder layer per model measured on CPU in seconds (no downloads); see cmd_memory() and the
*_terms() functions, one line per term. Exit status 1 if a config does not fit.
peer: seconds from launch to 80/90/95% held-out accuracy, asyncopd configs vs TRL's GKDTrainer and
DistillationTrainer (optional: `pip install trl==1.16.0`), evaluation off the clock; see cmd_peer().
mc-draw: time per decode step of vllm_engine.MCDrawProcessor.apply (M-1 draws per row inside vLLM); needs
vllm importable (the test .venv has it: bash run.sh test once).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

import estimators as E

# loss: ids per token (M), student_logp chunk; naive is skipped above NAIVE_MAX_TOKENS (~2.3 MB/token)
SAMPLES, CHUNK_SIZE, NAIVE_MAX_TOKENS, EXTRAPOLATE = 64, 1024, 2048, 16384


# ----------------------------------------------------------------------------- loss path
def _rss_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status: the CPU memory measurement needs Linux")


def loss_point(variant, tokens, vocab, hidden_size, device, samples=SAMPLES, chunk_size=CHUNK_SIZE, threads=1, seed=0):
    """One loss path run in this process: {"peak_extra_bytes", "seconds", ...}. Extra memory = peak minus
    the memory held before the path (inputs, lm_head weight, cache): on CPU the peak RSS (VmHWM, reset
    through /proc/self/clear_refs after setup), on CUDA max_memory_allocated. The lm_head weight gradient
    ([V, H] float32) is allocated inside the path and counted."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    N, V, H, M = tokens, vocab, hidden_size, samples
    # in-place init: no temporaries that would raise the peak before the measurement starts
    hidden = torch.empty(N, H, device=device).normal_().requires_grad_()
    weight = torch.empty(V, H, device=device).normal_(0, 3 / H ** 0.5).requires_grad_()  # logits std ~3
    ids = torch.randint(0, V, (N, M), device=device)
    cache = {"mc_ids": ids, "mc_behavior_logp": torch.empty(N, M, device=device).uniform_(-12, -1),
             "mc_teacher_logp": torch.empty(N, M, device=device).uniform_(-12, -1),
             "loss_mask": torch.ones(N, dtype=torch.bool, device=device), "cu_seqlens": torch.tensor([0, N], device=device)}
    opts = E.LossOptions(name="reverse_kl_mc", samples=M, chunk_size=chunk_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        before = _rss_kb("VmRSS") * 1024
    start = time.perf_counter()
    if variant == "chunked":
        s = E.student_logp(hidden, weight, {"mc_ids": ids}, chunk_size=chunk_size)
    else:  # naive: the whole float32 [N, V] log-softmax, then gather
        s = {"mc_ids": torch.log_softmax(hidden.float() @ weight.float().T, dim=-1).gather(1, ids)}
    loss, _ = E.compute_loss(s, cache, opts)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kb("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return {"variant": variant, "tokens": N, "peak_extra_bytes": peak - before, "seconds": seconds,
            "loss": float(loss), "grad_finite": bool(torch.isfinite(weight.grad).all())}


def cmd_loss(args):
    tokens = [int(x) for x in args.tokens.split(",")]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu, 1 thread(s)"
    print(f"loss path: reverse_kl_mc (A_theta, ratio), M={SAMPLES} ids/token, V={args.vocab}, H={args.hidden}, "
          f"chunk_size={CHUNK_SIZE}, float32, {device_name}")
    print(f"{'variant':8s} {'tokens':>7s} {'peak extra MB':>14s} {'MB/token':>9s} {'time s':>8s} {'ms/token':>9s}")
    results = {}
    for variant in ("chunked", "naive"):
        for n in tokens:
            if variant == "naive" and n > NAIVE_MAX_TOKENS:
                continue
            spec = dict(variant=variant, tokens=n, vocab=args.vocab, hidden_size=args.hidden, device=args.device)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "_loss_point", json.dumps(spec)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{variant} at {n} tokens failed (rc {out.returncode}): {out.stderr.strip()[-500:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if not r["grad_finite"]:
                raise RuntimeError(f"{variant} at {n} tokens gave a non-finite gradient")
            results.setdefault(variant, []).append(r)
            mb = r["peak_extra_bytes"] / 2**20
            print(f"{variant:8s} {n:7d} {mb:14.1f} {mb / n:9.3f} {r['seconds']:8.2f} {1e3 * r['seconds'] / n:9.2f}", flush=True)
    print(f"linear fit peak_extra = a + b * tokens, extrapolated to {EXTRAPOLATE} tokens:")
    for variant, rs in results.items():
        if len(rs) < 2:
            continue
        x = torch.tensor([float(r["tokens"]) for r in rs], dtype=torch.float64)
        y = torch.tensor([r["peak_extra_bytes"] / 2**20 for r in rs], dtype=torch.float64)
        b = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
        a = float(y.mean()) - b * float(x.mean())
        t = sum(r["seconds"] for r in rs) / sum(r["tokens"] for r in rs)
        print(f"  {variant:8s} a = {a:8.1f} MB  b = {b:.4f} MB/token  ->  {(a + b * EXTRAPOLATE) / 1024:6.2f} GB, "
              f"~{t * EXTRAPOLATE:.0f} s at this speed")
    V, H = args.vocab, args.hidden
    print(f"reference sizes: float32 [{EXTRAPOLATE}, {V}] = {EXTRAPOLATE * V * 4 / 2**30:.2f} GB; "
          f"float32 [chunk={CHUNK_SIZE}, V] = {CHUNK_SIZE * V * 4 / 2**20:.0f} MB; lm_head grad [V, H] = {V * H * 4 / 2**20:.0f} MB")


# ----------------------------------------------------------------------------- pipeline throughput
def throughput(overrides, schedules, config="configs/default.yaml"):
    """Run the real pipeline once per schedule on the same config; trained tokens/s at steady state.

    The first schedule must be `sync`: nothing overlaps there, so its per-step seconds are each stage's
    busy time (gen_s rollout, score_s teacher, train_s + sync_s learner), and an overlapping schedule can
    at best reach speed-up = sum(stage times) / max(stage time) over sync (the ideal bound)."""
    import asyncopd
    rows = []
    for name, extra in schedules:
        cfg = asyncopd.load_config(config, [*overrides, *extra, "progress=false", "eval_size=0",
                                          f"run_name=bench-{name}-{time.strftime('%H%M%S')}"])
        steps = asyncopd.run(cfg)["steps"][2:]  # skip start-up (process spawn, first batches)
        span = steps[-1]["time"] - steps[0]["time"]
        mean = lambda k: sum(r[k] for r in steps[1:]) / len(steps[1:])  # noqa: E731
        row = {"schedule": name, "tokens_per_s": sum(r["tokens"] for r in steps[1:]) / span, "step_s": span / len(steps[1:]),
               "gen_s": mean("gen_s"), "score_s": mean("score_s"), "train_s": mean("train_s") + mean("sync_s"),
               "stale_mean": mean("stale_mean")}
        row["busy"] = max(row["gen_s"], row["score_s"], row["train_s"]) / row["step_s"]  # bottleneck utilisation
        rows.append(row)
    stages = [rows[0]["gen_s"], rows[0]["score_s"], rows[0]["train_s"]]
    for r in rows:
        r.update(bound=sum(stages) / max(stages), speedup=r["tokens_per_s"] / rows[0]["tokens_per_s"])
        r["efficiency"] = r["speedup"] / r["bound"]
    return rows


def cmd_pipeline(args):
    overrides = [f"steps={args.steps}", *args.overrides]
    schedules = [("sync", ["schedule=sync"]), ("step_off(2)", ["schedule=step_off", "step_off=2"]),
                 ("async", ["schedule=async", f"max_staleness={args.max_staleness}"])]
    rows = throughput(overrides, schedules, args.config)
    print(f"{'schedule':<12} {'tokens/s':>9} {'speed-up':>9} {'bound':>6} {'of bound':>9} {'s/step':>7} "
          f"{'gen s/step':>10} {'score s/step':>12} {'learn s/step':>12} {'bottleneck busy':>15} {'staleness':>9}")
    for r in rows:
        print(f"{r['schedule']:<12} {r['tokens_per_s']:>9.0f} {r['speedup']:>8.2f}x {r['bound']:>5.2f}x "
              f"{100 * r['efficiency']:>8.0f}% {r['step_s']:>7.3f} {r['gen_s']:>10.3f} {r['score_s']:>12.3f} "
              f"{r['train_s']:>12.3f} {100 * r['busy']:>14.0f}% {r['stale_mean']:>9.2f}")
    print("bound = sum/max of the sync run's stage times (one device per stage); sync also pays per-step hand-offs "
          "outside the stages, which overlap hides too. bottleneck busy = slowest stage's seconds / wall seconds per step.")


# ----------------------------------------------------------------------------- offline (Lightning OPD)
def _asyncopd(argv, script="asyncopd.py", cpus=0):
    """`python SCRIPT ARGV` in a fresh process, on the first `cpus` allowed cores if cpus > 0 (its children
    inherit them; Linux only, elsewhere unpinned): (launch time, wall seconds, stdout)."""
    cores = sorted(os.sched_getaffinity(0))[:cpus] if cpus and hasattr(os, "sched_setaffinity") else None
    pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    t0 = time.time()
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, preexec_fn=pin,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        raise RuntimeError(f"{script} {' '.join(argv)} failed: {out.stderr.strip()[-800:]}")
    return t0, time.time() - t0, out.stdout.strip()


def cmd_offline(args):
    """Online async OPD vs offline OPD on fixed rollouts of the SFT student (precompute included), with the
    config's estimator for both, plus Lightning OPD's own single-sample loss (A_theta = t - s, no ratio) on
    the same cache; then the teacher-consistency ablation: teacher B (not the SFT teacher) online and
    offline. Runs checkpoint every --eval-every steps with evaluation off; checkpoints are graded afterwards
    on --eval-n held-out problems (greedy), so grading never slows a timed run."""
    import asyncopd
    import task
    import teacher_cache
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(args.threads)
    cfg, out = asyncopd.load_config(args.config, args.overrides), os.path.abspath(args.out)
    if not os.path.isfile(os.path.join(args.teacher_b, "config.json")):
        raise ValueError(f"--teacher-b {args.teacher_b}: no model; train one: python sft.py teacher --out {args.teacher_b} --seed 1")
    common = [args.config, *args.overrides, f"steps={args.steps}", f"save_every={args.eval_every}", "eval_size=0",
              "progress=false", f"threads={args.threads}", f"out_dir={out}", f"precompute_prompts={args.prompts}",
              f"chunk_prompts={args.chunk_prompts}", "allow_teacher_mismatch=true"]  # only teacher B needs it
    lightning = ["loss.name=reverse_kl_pg", "loss.advantage=theta", "loss.ratio=false"]
    specs = [("online A", "A", False, []), ("offline A", "A", True, []), ("offline A, Lightning", "A", True, lightning),
             ("offline B", "B", True, []), ("online B", "B", False, [])]
    teachers, pre_s, runs = {"A": cfg.teacher, "B": args.teacher_b}, {}, {}
    for name, who, offline, extra in specs:
        tag = name.replace(", ", "_").replace(" ", "_")
        extra = [f"teacher={teachers[who]}", f"run_name={tag}", f"cache_dir={out}/cache_{who}", *extra]
        shutil.rmtree(os.path.join(out, tag), ignore_errors=True)  # a rerun starts from scratch
        if offline and who not in pre_s:
            shutil.rmtree(os.path.join(out, f"cache_{who}"), ignore_errors=True)
            _, pre_s[who], msg = _asyncopd(["precompute", *common, f"teacher={teachers[who]}", f"cache_dir={out}/cache_{who}"])
            print(f"precompute {who}: {msg} [{pre_s[who]:.1f}s with start-up]", flush=True)
        t0, wall, _ = _asyncopd(["train", *common, *(["schedule=offline"] if offline else []), *extra])
        runs[name] = (os.path.join(out, tag), pre_s[who] if offline else 0.0, t0, wall)
    tok, rows = AutoTokenizer.from_pretrained(cfg.student), task.load_prompts("addition", "test", args.eval_n)
    grade = lambda d: task.evaluate(AutoModelForCausalLM.from_pretrained(d), tok, rows)  # noqa: E731
    acc0, table = grade(cfg.student), {}
    for name, (run, pre, t0, wall) in runs.items():
        with open(os.path.join(run, "metrics.jsonl")) as f:
            steps = {r["step"]: r for r in map(json.loads, f) if r["kind"] == "step"}
        points = [(0, 0.0, acc0)] + [(k, pre + steps[k]["time"] - t0, grade(os.path.join(run, f"ckpt_{k:05d}")))
                                     for k in sorted(steps) if k % args.eval_every == 0 or k == args.steps]
        rate = (len(steps) - 1) / (steps[max(steps)]["time"] - steps[min(steps)]["time"])
        table[name] = dict(pre=pre, wall=pre + wall, rate=rate, points=points)
    target = min(table[n]["points"][-1][2] for n in ("online A", "offline A"))
    print(f"\n{cfg.loss.name} (advantage {cfg.loss.advantage}, ratio {cfg.loss.ratio}), Lightning = reverse_kl_pg "
          f"(A_theta, no ratio); {args.steps} steps x {cfg.batch_size} prompts; offline: {args.prompts} prompts rolled out once")
    print(f"held-out accuracy (greedy, n={args.eval_n}) by learner step; student before OPD {100 * acc0:.1f}%, "
          f"teacher A (SFT teacher) {100 * grade(cfg.teacher):.1f}%, teacher B {100 * grade(args.teacher_b):.1f}%")
    print(f"{'run':<21} {'precompute s':>12} {'steps/s':>8} {'total s':>8} {f's to {100 * target:.1f}%':>10}  "
          + " ".join(f"{'@' + str(k):>6}" for k, _, _ in table["online A"]["points"]))
    for name, r in table.items():
        hit = next((s for _, s, a in r["points"] if a >= target), None)
        print(f"{name:<21} {r['pre']:>12.1f} {r['rate']:>8.2f} {r['wall']:>8.1f} {'-' if hit is None else f'{hit:.1f}':>10}  "
              + " ".join(f"{100 * a:>5.1f}%" for _, _, a in r["points"]))
    cache, meta = teacher_cache.load_dir(f"{out}/cache_A")
    disk = sum(os.path.getsize(os.path.join(f"{out}/cache_A", n)) for n in os.listdir(f"{out}/cache_A"))
    single = {k: v for k, v in cache.items() if not k.startswith("mc_")}  # what a reverse_kl_pg precompute writes
    print(f"cache A: {meta['num_sequences']} sequences, {meta['num_tokens']} tokens, M={cfg.loss.samples}: "
          f"{teacher_cache.bytes_per_token(cache):.1f} bytes/token in memory ({disk / meta['num_tokens']:.1f} on disk); "
          f"without the mc_* columns (a reverse_kl_pg cache) {teacher_cache.bytes_per_token(single):.1f}")
    print("steps/s: learner steps per second, step 1 to the last (start-up excluded). total s, s to target: wall clock "
          "from launch (offline: precompute included) to the end / to the first checkpoint at the target (the lower "
          "final accuracy of online A and offline A). Teacher B runs use allow_teacher_mismatch=true, same prompts and seeds.")


# ----------------------------------------------------------------------------- memory (shipped GPU configs)
GPU_BYTES, FIT = 80e9, 0.85  # an 80 GB GPU; a config fits if every device's modelled peak is <= 85% of it (68 GB)
GPU_CONFIGS = ["configs/gpu1_smoke.yaml", "configs/qwen2.5_gsm8k_4gpu.yaml", "configs/qwen3_deepmath_8gpu.yaml",
               "configs/qwen3_deepmath_8gpu_fkl.yaml"]
# Real model dims, from each model's config.json on the Hugging Face Hub (Qwen/<name>; nothing is downloaded here).
MODELS = {
    "Qwen2.5-0.5B-Instruct": dict(arch="qwen2", hidden=896, inter=4864, layers=24, heads=14, kv=2, head_dim=64, tied=True),
    "Qwen2.5-1.5B-Instruct": dict(arch="qwen2", hidden=1536, inter=8960, layers=28, heads=12, kv=2, head_dim=128, tied=True),
    "Qwen3-1.7B-Base": dict(arch="qwen3", hidden=2048, inter=6144, layers=28, heads=16, kv=8, head_dim=128, tied=True),
    "Qwen3-8B": dict(arch="qwen3", hidden=4096, inter=12288, layers=36, heads=32, kv=8, head_dim=128, tied=False),
}
VOCAB = 151936  # every model above (config.json vocab_size)
OVERHEAD, SLACK = 2.5e9, 0.05  # per process: CUDA context + NCCL/cuBLAS workspaces; allocator fragmentation on tensors
VLLM_BUDGET = "vLLM gpu_memory_utilization x GPU (weights, KV cache, activations, its CUDA context: all inside)"


def hf_config(name):
    from transformers import Qwen2Config, Qwen3Config
    d = MODELS[name]
    kind = Qwen3Config if d["arch"] == "qwen3" else Qwen2Config
    conf = kind(vocab_size=VOCAB, hidden_size=d["hidden"], intermediate_size=d["inter"], num_hidden_layers=d["layers"],
                num_attention_heads=d["heads"], num_key_value_heads=d["kv"], tie_word_embeddings=d["tied"],
                **({"head_dim": d["head_dim"]} if d["arch"] == "qwen3" else {}))
    conf._attn_implementation = "sdpa"
    return conf


def layer_activations(name, tokens=256):
    """One real-size decoder layer in bf16 on CPU, batch 1 x `tokens`, no padding mask: bytes per token saved for
    backward (torch.autograd.graph.saved_tensors_hooks, unique storages, parameters excluded), without and with
    activation checkpointing (the learner's checkpoint_wrapper, non-reentrant: the hooks see what the checkpoint
    keeps, its input; what the layer saves inside goes to the checkpoint's own hooks and is recomputed)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3
    conf = hf_config(name)
    mod = modeling_qwen3 if MODELS[name]["arch"] == "qwen3" else modeling_qwen2
    torch.manual_seed(0)
    layer = getattr(mod, f"{mod.__name__.split('_')[-1].capitalize()}DecoderLayer")(conf, layer_idx=0).to(torch.bfloat16)
    rope = getattr(mod, f"{mod.__name__.split('_')[-1].capitalize()}RotaryEmbedding")(conf)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    pos = torch.arange(tokens)[None]
    out = {"params": sum(p.numel() for p in layer.parameters())}
    for ckpt in (False, True):
        x = torch.randn(1, tokens, conf.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        cos_sin = rope(x, pos)
        run = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT) if ckpt else layer
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(x, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
        out["ckpt" if ckpt else "plain"] = sum(seen.values()) / tokens
    return out


def model_params(name):
    """(total, per decoder layer) parameter counts of the real model, built on the meta device."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(name))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return sum(p.numel() for p in model.parameters()), layer


def cache_bytes_per_token(cfg):
    """Bytes per response token of the batch's cache fields (teacher_cache.py's table) for this estimator."""
    fields = E.required_fields(cfg.loss) | {"behavior_logp", "teacher_logp", "policy_version"}
    width = {"K": cfg.loss.teacher_topk, "Ks": cfg.loss.student_topk, "M": cfg.loss.samples, "Mt": cfg.loss.samples}
    import teacher_cache
    total = 0
    for f in fields:
        spec = teacher_cache.FIELD_SPECS[f]
        if spec["rows"] == "N":
            total += torch.empty(0, dtype=spec["dtype"]).element_size() * (width[spec["width"]] if spec["width"] else 1)
    return total + 8  # + the prompt ids, ~1 prompt token per response token at most


def learner_terms(cfg, m, act):
    """Peak bytes on one learner rank (FSDP2, bf16 compute, fp32 master weights), term by term."""
    import asyncopd
    d, W = MODELS[m["name"]], len(cfg.learner_devices)
    P, PL, H, L, V = m["params"], m["layer_params"], d["hidden"], d["layers"], VOCAB
    root = P - L * PL  # embeddings (+ untied lm_head) + final norm: FSDP2's root group, unsharded for fwd+bwd
    S = cfg.max_prompt_len + cfg.max_new_tokens  # longest padded sequence
    shard = cfg.batch_size // (cfg.mini_batches * W) * S  # a rank's mini-batch, padded, in one pass
    T = max(min(cfg.micro_batch_tokens or shard, shard), S)  # padded tokens per pass; a longer sequence runs alone
    K = {"reverse_kl_mc": cfg.loss.samples, "forward_kl_topk": cfg.loss.teacher_topk}.get(cfg.loss.name, 16) + 1
    C = cfg.loss.chunk_size
    a = act["plain"] + 2 * (d["heads"] - d["kv"]) * d["head_dim"] * 2  # + k, v repeated to all heads (SDPA with a mask)
    if cfg.activation_checkpointing:  # layer inputs kept; one layer recomputed, plus as much again for its gradients
        acts, mask = T * (L * act["ckpt"] + 2 * a), T * S * (1 + 2)
    else:  # every layer's saved set, plus one layer's gradients
        acts, mask = T * (L + 1) * a, T * S * (1 + 2 * L)
    dtype = 2 if cfg.mixed_precision else 4  # the training dtype: compute, published weights
    transport = asyncopd.resolve_transport(cfg)
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
        "rank 0, weight_transport=handoff: the rollout's weight buffer": dtype * P * (transport == "handoff"),
    }, T


def teacher_terms(cfg, m, act, phase):
    """Peak bytes of the teacher process: bf16 weights + one token-budget sub-batch forward without grad
    (at most one layer's intermediates alive: bounded by that layer's saved-for-backward set) + the unit's
    gathered rows + the chunked log_softmax; or the greedy evaluation (HF engine, bf16 KV cache)."""
    d = MODELS[m["name"]]
    P, H, L, V, C = m["params"], d["hidden"], d["layers"], VOCAB, 1024  # score_unit: teacher_cache.score's chunk
    S = cfg.max_prompt_len + cfg.max_new_tokens
    a = act["plain"] + 2 * (d["heads"] - d["kv"]) * d["head_dim"] * 2
    kv = 2 * d["kv"] * d["head_dim"] * 2 * L  # bf16 K and V, all layers, per token
    if phase == "eval":
        B = min(cfg.eval_size, 250)  # task.evaluate's batch
        return {"bf16 weights": 2 * P, f"KV cache {B} x {S} tokens": B * S * kv,
                f"prefill {B} x {cfg.max_prompt_len} tokens, one layer": B * cfg.max_prompt_len * (a + 4 * H),
                "[B, V] sampling buffers": B * V * 32}, B * S
    unit = cfg.rollout_batch_size * S
    T = max(min(cfg.teacher_batch_tokens or unit, unit), S)
    N = cfg.rollout_batch_size * cfg.max_new_tokens
    return {"bf16 weights": 2 * P,
            f"sub-batch forward ({T} tokens), one layer live": T * (a + 3 * 2 * H),
            "4D padding mask + SDPA bias copy": T * S * 3,
            "unit's gathered rows [N, H] bf16": N * 2 * H,
            f"chunked log_softmax [{C}, V] bf16 + 2 fp32 (+exp)": C * V * 14,
            "unit's cache fields in and out (x2 for validate)": 2 * N * cache_bytes_per_token(cfg)}, T


def rollout_terms(cfg, m, act, vllm):
    """vLLM: its gpu_memory_utilization share of the GPU (weights, KV cache, activations, all inside it) + the MC
    draws outside it (vllm_engine.draw: fp32 z/T [rows, V], then float64 log-softmax, exp and CDF per chunk of
    ROW_CHUNK_ELEMENTS; one row per request of the unit) + the recorded draws of a unit until generate() returns.
    HF engine, in the training dtype (bf16 with mixed_precision): weights + KV cache + prefill of one layer + fp32
    [B, V] buffers."""
    d = MODELS[m["name"]]
    S, V = cfg.max_prompt_len + cfg.max_new_tokens, VOCAB
    mc = E.needs(cfg.loss).mc_samples
    if vllm:
        return {VLLM_BUDGET: cfg.gpu_memory_utilization * GPU_BYTES,
                f"MC draws (M={mc}): workspace [{cfg.rollout_batch_size}, V]":
                    (4 * cfg.rollout_batch_size * V + 24 * min(cfg.rollout_batch_size * V, 2**24)) if mc else 0,
                f"MC draws (M={mc}): a unit's recorded ids + b": cfg.rollout_batch_size * S * (mc - 1) * 12 if mc else 0}, 0
    B = max(cfg.rollout_batch_size, min(cfg.eval_size, 250))  # a unit, or worker 0's evaluation batch
    w = 2 if cfg.mixed_precision else 4  # bytes per value in the training dtype
    a = (act["plain"] + 2 * (d["heads"] - d["kv"]) * d["head_dim"] * 2) * w // 2  # measured in bf16
    return {f"weights ({w} bytes)": w * m["params"],
            f"KV cache {B} x {S} tokens": B * S * 2 * d["kv"] * d["head_dim"] * w * d["layers"],
            f"prefill {B} x {cfg.max_prompt_len} tokens, one layer": B * cfg.max_prompt_len * (a + 2 * w * d["hidden"]),
            "[B, V] sampling buffers (logits, log-softmax, float64 CDF)": B * V * 32}, B * S


def cmd_memory(args):
    import asyncopd
    torch.set_num_threads(args.threads)
    measured = {}
    print(f"saved activations per token, one real-size decoder layer, bf16, CPU, {args.tokens} tokens "
          "(saved_tensors_hooks; ckpt: what the checkpoint keeps)")
    for name in MODELS:
        act = layer_activations(name, args.tokens)
        total, layer = model_params(name)
        measured[name] = dict(act=act, params=total, layer_params=layer, name=name)
        print(f"  {name:<22} plain {act['plain'] / 1024:7.1f} KiB/token/layer   ckpt {act['ckpt'] / 1024:5.1f} KiB   "
              f"x {MODELS[name]['layers']} layers; params {total / 1e9:.3f} B ({layer / 1e6:.1f} M per layer)")
    ok = True
    for path in args.configs:
        cfg = asyncopd.load_config(path)
        cfg.rollout_batch_size = cfg.rollout_batch_size or cfg.batch_size
        s, t = (measured[os.path.basename(cfg.student)], measured[os.path.basename(cfg.teacher)])
        vllm = cfg.engine == "vllm"
        roles = [("learner rank", cfg.learner_devices, *learner_terms(cfg, s, s["act"])),
                 ("teacher scoring", [cfg.teacher_device], *teacher_terms(cfg, t, t["act"], "score")),
                 ("rollout worker" + (" (vLLM)" if vllm else " (HF)"), cfg.rollout_devices, *rollout_terms(cfg, s, s["act"], vllm))]
        if cfg.eval_teacher and cfg.eval_size:
            roles.append(("teacher evaluation", [cfg.teacher_device], *teacher_terms(cfg, t, t["act"], "eval")))
        print(f"\n{path}: student {s['name']}, teacher {t['name']}, {cfg.loss.name}; peak GB per process "
              f"(sum of the terms + {SLACK:.0%} fragmentation + {OVERHEAD / 1e9:.1f} GB CUDA context; vLLM: its budget)")
        per_device = {}
        for role, devices, terms, tokens in roles:
            budget = terms.get(VLLM_BUDGET, 0.0)  # vLLM keeps itself within its budget; only what is outside gets slack
            peak = budget + sum(v for k, v in terms.items() if k != VLLM_BUDGET) * (1 + SLACK) + (0 if budget else OVERHEAD)
            print(f"  {role:<26} {peak / 1e9:6.1f} GB on {', '.join(devices)}")
            for k, v in terms.items():
                print(f"      {v / 1e9:7.2f}  {k}")
            for dev in set(devices):  # evaluation and scoring are phases of one process: its larger one counts
                key = (dev, role.split()[0])
                per_device[key] = max(per_device.get(key, 0.0), peak)
        devices = {}
        for (dev, _), peak in per_device.items():
            devices[dev] = devices.get(dev, 0.0) + peak  # roles sharing a GPU add up
        for dev, peak in sorted(devices.items()):
            fits = peak <= FIT * GPU_BYTES
            ok &= fits
            print(f"  {dev:<8} {peak / 1e9:6.1f} GB of {GPU_BYTES / 1e9:.0f} GB ({100 * peak / GPU_BYTES:.0f}%)  "
                  f"{'fits' if fits else 'DOES NOT FIT'} (limit {FIT * GPU_BYTES / 1e9:.0f} GB)")
    print("\nall configs fit" if ok else "\nsome config does not fit: lower micro_batch_tokens / teacher_batch_tokens / "
          "gpu_memory_utilization or turn on activation_checkpointing")
    return ok
# ----------------------------------------------------------------------------- peer: asyncopd vs TRL
# Systems of `bench.py peer`: asyncopd as key=value overrides of --config, or a TRL trainer by name (see trl_run).
PEER_SYSTEMS = {
    "asyncopd": [],                                   # the config as is (default: async, MC-64 reverse KL, A_theta)
    "asyncopd-sync": ["schedule=sync"],               # the same estimator, strict sync: nothing overlaps
    "asyncopd-dense": ["loss.name=reverse_kl_dense"],  # async, exact reverse KL over the vocabulary
    "trl-gkd": "gkd",                                 # TRL 1.16 GKDTrainer, lmbda=1, beta=1: exact reverse KL, sync, 1 process
    "trl-distill": "distill",                         # TRL 1.16 DistillationTrainer, beta=1: the same loss, TRL's stable API
}
THRESHOLDS = (0.80, 0.90, 0.95)


def trl_run(trainer, config, overrides, run_dir, steps, save_every, seed, threads):
    """TRL's GKDTrainer or DistillationTrainer in this process with asyncopd's models, prompts (in the same order per
    step), batch, lengths, temperature and optimizer (AdamW, constant lr, betas, weight decay, grad clip). Every batch
    is sampled from the student (GKD: lmbda=1); beta=1: TRL's generalized JSD is then KL(student || teacher) over the
    whole vocabulary (trl 1.16: F.kl_div(t, s) in gkd_trainer.py, a chunked kernel in distillation_trainer.py).
    Writes metrics.jsonl step times and ckpt_NNNNN like asyncopd."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never reach the hub
    torch.set_num_threads(threads)
    import asyncopd
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    cfg = asyncopd.load_config(config, [*overrides, f"seed={seed}", f"steps={steps}", "eval_size=0"])
    tok, train, _ = asyncopd.validate(cfg)  # asyncopd's checks; its tokenizer and encoded prompts
    order = [i for u in range(steps * asyncopd.units_per_batch(cfg)) for i in asyncopd.unit_prompt_indices(cfg, len(train), u)]

    def collate(rows):  # prompt ids only (GKD's own collator wants chat messages; the task has no template). No
        ids = torch.tensor([r["ids"] for r in rows])  # labels, so the loss is the token mean over the sampled
        return {"prompts": ids, "prompt_attention_mask": torch.ones_like(ids)}  # responses, as asyncopd's

    log = open(os.path.join(run_dir, "metrics.jsonl"), "w")

    class Saver(TrainerCallback):  # step end time, then a checkpoint every save_every steps (graded afterwards)
        def on_step_end(self, _args, state, control, model=None, **kw):
            log.write(json.dumps({"kind": "step", "step": state.global_step, "time": time.time()}) + "\n")
            if state.global_step % save_every == 0 or state.global_step == steps:
                model.save_pretrained(os.path.join(run_dir, f"ckpt_{state.global_step:05d}"))

    # asyncopd's optimizer, not TRL's defaults (lr 2e-5 or 1e-6 decaying linearly, bf16, activation checkpointing:
    # settings for billion-parameter models that would handicap TRL here); float32 on the CPU like asyncopd's learner
    common = dict(output_dir=run_dir, max_steps=steps, per_device_train_batch_size=cfg.batch_size, seed=seed, beta=1.0,
                  temperature=cfg.temperature, learning_rate=cfg.lr, lr_scheduler_type="constant", adam_beta1=cfg.betas[0],
                  adam_beta2=cfg.betas[1], weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip, bf16=False,
                  gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to="none",
                  logging_steps=max(1, steps // 10), disable_tqdm=True)
    if trainer == "gkd":  # each run imports only its trainer: imports are on the clock
        from trl.experimental.gkd import GKDConfig, GKDTrainer as Trainer
        args = GKDConfig(**common, lmbda=1.0, max_new_tokens=cfg.max_new_tokens, train_sampling_strategy="sequential")
        extra = dict(data_collator=collate, train_dataset=Dataset.from_dict({"ids": [train[i]["ids"] for i in order]}))
    else:  # takes text prompts; counts the loss's tokens after sampling (huggingface/trl#6478)
        from trl import DistillationConfig, DistillationTrainer as Trainer
        args = DistillationConfig(**common, max_completion_length=cfg.max_new_tokens, shuffle_dataset=False)
        extra = dict(train_dataset=Dataset.from_dict({"prompt": [train[i]["prompt"] for i in order]}))
    student, teacher = AutoModelForCausalLM.from_pretrained(cfg.student), AutoModelForCausalLM.from_pretrained(cfg.teacher)
    Trainer(model=student, teacher_model=teacher, args=args, processing_class=tok, callbacks=[Saver()], **extra).train()
    log.close()


def cmd_peer(args):
    """Each system and seed runs alone in a fresh process on the same --cpus cores, checkpointing every
    --save-every steps with no evaluation; then every checkpoint is graded (greedy, --eval-n held-out problems),
    off the clock. Times are seconds from the launch of the process to the end of the checkpoint's step."""
    systems, seeds = args.systems.split(","), [int(x) for x in args.seeds.split(",")]
    if any(s not in PEER_SYSTEMS for s in systems):
        raise SystemExit(f"bench.py peer: unknown system in --systems {args.systems}; use some of {','.join(PEER_SYSTEMS)}")
    if any(isinstance(PEER_SYSTEMS[s], str) for s in systems):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("bench.py peer: the trl-* systems need TRL: .venv/bin/python -m pip install trl==1.16.0 "
                             "(or leave them out of --systems)") from None
    import asyncopd
    import task
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(args.cpus)
    cfg, out = asyncopd.load_config(args.config, args.overrides), os.path.abspath(args.out)
    tok, rows = AutoTokenizer.from_pretrained(cfg.student), task.load_prompts("addition", "test", args.eval_n)
    grade = lambda d: task.evaluate(AutoModelForCausalLM.from_pretrained(d), tok, rows)  # noqa: E731
    results = []
    for seed in seeds:
        for name in systems:
            run_dir = os.path.join(out, f"{name}-{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts from scratch
            if isinstance(PEER_SYSTEMS[name], str):
                os.makedirs(run_dir)
                spec = dict(trainer=PEER_SYSTEMS[name], config=args.config, overrides=args.overrides, run_dir=run_dir,
                            steps=args.steps, save_every=args.save_every, seed=seed, threads=args.trl_threads or args.cpus)
                t0, _, _ = _asyncopd(["_trl", json.dumps(spec)], "bench.py", args.cpus)
            else:
                t0, _, _ = _asyncopd(["train", args.config, *PEER_SYSTEMS[name], *args.overrides, f"steps={args.steps}",
                                      f"save_every={args.save_every}", "eval_size=0", "progress=false", f"seed={seed}",
                                      f"out_dir={out}", f"run_name={name}-{seed}"], cpus=args.cpus)
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                times = {r["step"]: r["time"] - t0 for r in map(json.loads, f) if r["kind"] == "step"}
            last = max(times)
            points = [(k, times[k], grade(os.path.join(run_dir, f"ckpt_{k:05d}"))) for k in sorted(times)
                      if k % args.save_every == 0 or k == last]
            for k, _, _ in points:  # graded: the checkpoints are not needed any more
                shutil.rmtree(os.path.join(run_dir, f"ckpt_{k:05d}"))
            hits = {th: next(((k, t) for k, t, a in points if a >= th), None) for th in THRESHOLDS}
            results.append(dict(system=name, seed=seed, start_s=times[1], step_s=(times[last] - times[1]) / max(1, last - 1),
                                points=points, hits={f"{th:.2f}": hit for th, hit in hits.items()}))
            print(f"{name}-{seed}: {last} steps, graded {len(points)} checkpoints", flush=True)
    with open(os.path.join(out, "peer.json"), "w") as f:
        json.dump(results, f)
    print(f"\n{args.steps} steps x {cfg.batch_size} prompts, {args.cpus} cores each (TRL: {args.trl_threads or args.cpus} "
          f"threads; asyncopd: {cfg.threads} per process), checkpoints every {args.save_every} "
          f"steps graded on {args.eval_n} held-out problems (greedy), student before {100 * grade(cfg.student):.1f}%")
    print(f"{'system':<15} {'seed':>4} {'start s':>7} {'s/step':>6} "
          + " ".join(f"{f'{100 * th:.0f}%: s (step)':>16}" for th in THRESHOLDS) + f" {'final':>6}")
    for r in results:
        cells = [f"{h[1]:.1f} ({h[0]})" if h else "not reached" for h in r["hits"].values()]
        print(f"{r['system']:<15} {r['seed']:>4} {r['start_s']:>7.1f} {r['step_s']:>6.3f} " + " ".join(f"{c:>16}" for c in cells)
              + f" {100 * r['points'][-1][2]:>5.1f}%")
    print("start s: launch to the end of step 1; s/step: after it. s (step): seconds from launch and learner step of the "
          "first checkpoint at that held-out accuracy.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        c = f"C{systems.index(r['system'])}"
        ax.plot([t for _, t, _ in r["points"]], [a for _, _, a in r["points"]], c, marker=".",
                label=r["system"] if r["seed"] == seeds[0] else None)
    for th in THRESHOLDS:
        ax.axhline(th, color="grey", lw=0.5, ls="--")
    ax.set(xlabel="seconds since launch", ylabel=f"held-out accuracy (greedy, n={args.eval_n})", ylim=(0, 1),
           title=f"accuracy vs seconds, {args.cpus} cores, seeds {args.seeds}")
    ax.legend()
    fig.savefig(os.path.join(out, "peer.png"), dpi=80)
    print(f"plot: {out}/peer.png, points: {out}/peer.json")
    return results
# ----------------------------------------------------------------------------- MC draws inside vLLM
def cmd_mc_draw(args):
    import types

    import numpy as np
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

    import vllm_engine
    torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    n = max(rows_list)
    state = LogitsProcRequestState(device=torch.device(args.device), max_num_reqs=n, vocab_size=args.vocab,
                                   all_token_ids=None, prompt_len=None, total_len=None,
                                   prefill_len=types.SimpleNamespace(np=np.zeros(n, dtype=np.int32)))
    proc = vllm_engine.MCDrawProcessor(types.SimpleNamespace(speculative_config=None, watermark_config=None), state)
    for s in range(n):
        extra = {vllm_engine.MC_KEY: {"request": s, "draws": args.samples - 1, "seed": s}}
        proc.add_request(s, SamplingParams(temperature=0.8, extra_args=extra))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"MCDrawProcessor.apply per decode step, V={args.vocab}, M={args.samples}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    for rows in rows_list:
        idx = torch.arange(rows, device=args.device)
        ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.arange(rows),
                            expanded_local_pos=torch.zeros_like(idx), input_ids=torch.zeros_like(idx),
                            pos=torch.full((rows,), 100, device=args.device), seq_lens_upper_bound_np=np.full(rows, 101))
        logits = torch.randn(rows, args.vocab, device=args.device) * 3
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("loss", help="memory and time of the loss path: chunked vs naive student gather")
    p.add_argument("--tokens", default="1024,2048,4096", help="comma-separated response-token counts")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=cmd_loss)
    p = sub.add_parser("pipeline", help="trained tokens/s: sync vs step_off(2) vs async, with the ideal bound")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--max-staleness", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every schedule")
    p.set_defaults(fn=cmd_pipeline)
    p = sub.add_parser("offline", help="online async vs offline Lightning OPD, and teacher consistency (A vs B)")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10, help="checkpoint (and grade) every N learner steps")
    p.add_argument("--eval-n", type=int, default=1000, help="held-out problems per grade")
    p.add_argument("--prompts", type=int, default=3840, help="precompute: prompts rolled out once")
    p.add_argument("--chunk-prompts", type=int, default=256)
    p.add_argument("--teacher-b", default="/tmp/asyncopd_teacher_b", help="a different teacher (not committed)")
    p.add_argument("--out", default="/tmp/asyncopd_bench_offline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run, e.g. lr=0.0003")
    p.set_defaults(fn=cmd_offline)
    p = sub.add_parser("memory", help="modelled peak GPU memory per role of each shipped GPU config, from measured layers")
    p.add_argument("configs", nargs="*", default=GPU_CONFIGS)
    p.add_argument("--tokens", type=int, default=256, help="sequence length of the measured layer forward")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(fn=lambda a: sys.exit(0 if cmd_memory(a) else 1))
    p = sub.add_parser("peer", help="asyncopd vs TRL (GKD, Distillation): seconds and steps to 80/90/95%% held-out accuracy")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--systems", default=",".join(PEER_SYSTEMS), help="comma-separated keys of PEER_SYSTEMS")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--save-every", type=int, default=50, help="checkpoint (and grade) every N learner steps")
    p.add_argument("--eval-n", type=int, default=500, help="held-out problems per grade")
    p.add_argument("--cpus", type=int, default=2, help="cores every run is pinned to (asyncopd: threads per process from the config)")
    p.add_argument("--trl-threads", type=int, default=0, help="TRL's torch threads (0 = --cpus; 1 can be 4x faster on a busy machine)")
    p.add_argument("--out", default="/tmp/asyncopd_bench_peer")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every system (TRL takes models, data, batch, lengths, optimizer)")
    p.set_defaults(fn=cmd_peer)
    p = sub.add_parser("_trl", help=argparse.SUPPRESS)  # internal: one TRL run, fresh process
    p.add_argument("spec")
    p.set_defaults(fn=lambda a: trl_run(**json.loads(a.spec)))
    p = sub.add_parser("mc-draw", help="cost of the vLLM MC-draw logits processor per decode step")
    p.add_argument("--rows", default="1,8,32,128", help="logits rows (requests) per step")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--samples", type=int, default=64, help="M (M-1 draws per row)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(fn=cmd_mc_draw)
    p = sub.add_parser("_loss_point", help=argparse.SUPPRESS)  # internal: one measurement, fresh process
    p.add_argument("spec")
    p.set_defaults(fn=lambda a: print(json.dumps(loss_point(**json.loads(a.spec)))))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
