"""Benchmarks (commands, not timed tests).

    python bench.py loss [--tokens 1024,2048,4096] [--vocab 151936] [--hidden 896] [--device cpu|cuda]
    python bench.py pipeline [--config configs/default.yaml] [--steps 24] [--max-staleness 2] [key=value ...]
    python bench.py offline [--steps 60] [--prompts 3840] [--teacher-b DIR] [key=value ...]
    python bench.py memory [CONFIG.yaml ...] [--tokens 256]
    python bench.py peer [--systems asyncopd,...,trl-distill] [--seeds 0,1,2] [--steps 2000] [key=value ...]
    python bench.py mc-draw [--rows 1,8,32,128] [--vocab 151936] [--samples 64] [--device cpu|cuda]

loss: peak extra memory and time of the learner's loss path (student_logp + estimator + backward) at a Qwen-size
vocabulary, chunked gather (estimators.student_logp) vs naive (full float32 log_softmax, then gather), each point in a
fresh subprocess; see loss_point(). On CPU, scale tokens down and read the linear fit's extrapolation to EXTRAPOLATE.
pipeline: the real pipeline (asyncopd.run) once per schedule on one config; see throughput().
offline: online async OPD vs offline Lightning OPD (precompute included) and teacher A vs B; see cmd_offline().
memory: modelled peak GPU memory of every role of each shipped GPU config against an 80 GB GPU (fits: <= 68 GB), from
one real-size decoder layer per model measured on CPU in seconds (no downloads); see cmd_memory() and the *_terms()
functions, one line per term. Exit status 1 if a config does not fit.
peer: seconds from launch to 80/90/95% held-out accuracy, asyncopd configs vs TRL's GKDTrainer and DistillationTrainer
(optional: `pip install trl==1.16.0`), evaluation off the clock; see cmd_peer().
mc-draw: time per decode step of vllm_engine.MCDrawProcessor.apply (M-1 draws per row inside vLLM); needs vllm
importable (the test .venv has it: bash run.sh test once).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import torch

import config
import estimators as E
import offline
import schedule

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
        s = E.student_logp(hidden, weight, {"mc_ids": ids}, chunk_size=chunk_size)
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
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "_loss_point", json.dumps(spec)],
                             capture_output=True, text=True)  # a fresh process: the peak is this point's alone
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


# ----------------------------------------------------------------------------- pipeline throughput
def throughput(overrides, schedules, config_path="configs/default.yaml"):
    """Run the real pipeline once per schedule on the same config; trained tokens/s at steady state.

    The first schedule must be `sync`: nothing overlaps there, so its per-step seconds are each stage's busy time
    (gen_s rollout, score_s teacher, train_s + sync_s learner), and an overlapping schedule can at best reach
    speed-up = sum(stage times) / max(max stage time, sum / cores) over sync (the ideal bound): a stage per device,
    and when every role is on the CPU, no more than `cores` stages busy at once (this process's allowed cores)."""
    import asyncopd
    rows = []
    for name, extra in schedules:
        cfg = config.load_config(config_path, [*overrides, *extra, "progress=false", "eval_size=0",
                                          f"run_name=bench-{name}-{time.strftime('%H%M%S')}"])
        with open(os.path.join(asyncopd.run(cfg)["run_dir"], "metrics.jsonl")) as f:
            steps = [r for r in map(json.loads, f) if r["kind"] == "step"][2:]  # skip start-up (first batches)
        span, timed = steps[-1]["time"] - steps[0]["time"], steps[1:]  # the steps that end inside the span
        mean = lambda k, timed=timed: sum(r[k] for r in timed) / len(timed)  # noqa: E731 - a one-line helper
        row = {"schedule": name, "tokens_per_s": sum(r["tokens"] for r in timed) / span, "step_s": span / len(timed),
               "gen_s": mean("gen_s"), "score_s": mean("score_s"), "train_s": mean("train_s") + mean("sync_s"),
               "stale_mean": mean("stale_mean")}
        row["busy"] = max(row["gen_s"], row["score_s"], row["train_s"]) / row["step_s"]  # bottleneck utilisation
        rows.append(row)
    stages = [rows[0]["gen_s"], rows[0]["score_s"], rows[0]["train_s"]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    on_cpu = all(str(d) == "cpu" for d in config.role_devices(cfg))
    for r in rows:
        r.update(bound=sum(stages) / max(max(stages), sum(stages) / cores if on_cpu else 0),
                 speedup=r["tokens_per_s"] / rows[0]["tokens_per_s"])
        r["efficiency"] = r["speedup"] / r["bound"]
    return rows


def cmd_pipeline(args):
    if args.steps < 4:  # throughput() drops two start-up steps and times the rest from the first one kept
        raise SystemExit(f"bench.py pipeline: --steps {args.steps} leaves nothing to time (the first two steps are "
                         "start-up): use --steps 4 or more, e.g. 60")
    rows = throughput([f"steps={args.steps}", *args.overrides], [
        ("sync", ["schedule=sync"]), ("step_off(2)", ["schedule=step_off", "step_off=2"]),
        ("async", ["schedule=async", f"max_staleness={args.max_staleness}"])], args.config)
    print(f"{'schedule':<12} {'tokens/s':>9} {'speed-up':>9} {'bound':>6} {'of bound':>9} {'s/step':>7} "
          f"{'gen s/step':>10} {'score s/step':>12} {'learn s/step':>12} {'bottleneck busy':>15} {'staleness':>9}")
    for r in rows:
        print(f"{r['schedule']:<12} {r['tokens_per_s']:>9.0f} {r['speedup']:>8.2f}x {r['bound']:>5.2f}x "
              f"{100 * r['efficiency']:>8.0f}% {r['step_s']:>7.3f} {r['gen_s']:>10.3f} {r['score_s']:>12.3f} "
              f"{r['train_s']:>12.3f} {100 * r['busy']:>14.0f}% {r['stale_mean']:>9.2f}")
    print("bound = sum / max(max, sum / cores) of the sync run's stage times (a device per stage; on the CPU at most "
          "`cores` stages at once); sync also pays per-step hand-offs outside the stages, which overlap hides too. "
          "bottleneck busy = slowest stage's seconds / wall seconds per step.")


# ----------------------------------------------------------------------------- timed runs, graded afterwards
def _run_script(argv, script="asyncopd.py", cpus=0):
    """`python SCRIPT ARGV` in a fresh process, on the first `cpus` allowed cores if cpus > 0 (its children
    inherit them; Linux only, elsewhere unpinned): (launch time, wall seconds, stdout)."""
    cores = sorted(os.sched_getaffinity(0))[:cpus] if cpus and hasattr(os, "sched_setaffinity") else None
    t0 = time.time()
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=os.path.dirname(
        os.path.abspath(__file__)), preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    if out.returncode:
        raise RuntimeError(f"{script} {' '.join(argv)} failed: {out.stderr.strip()[-800:]}")
    return t0, time.time() - t0, out.stdout.strip()


def _grader(cfg, n):
    """grade(model dir) -> greedy accuracy on the first n held-out problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import task
    tok, rows = AutoTokenizer.from_pretrained(cfg.student), task.load_prompts("addition", "test", n)
    return lambda model_dir: task.evaluate(AutoModelForCausalLM.from_pretrained(model_dir), tok, rows)


def _graded_points(run_dir, every, grade, t0, offset=0.0):
    """Step end times from the run's metrics.jsonl (seconds since t0), and (step, offset + seconds, accuracy) of
    the checkpoint every `every` steps and of the last."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = {r["step"]: r["time"] - t0 for r in map(json.loads, f) if r["kind"] == "step"}
    return times, [(k, offset + times[k], grade(os.path.join(run_dir, f"ckpt_{k:05d}"))) for k in sorted(times)
                   if k % every == 0 or k == max(times)]


# ----------------------------------------------------------------------------- offline (Lightning OPD)
def cmd_offline(args):
    """Online async OPD vs offline OPD on fixed rollouts of the SFT student (precompute included), with the config's
    estimator for both, plus Lightning OPD's own single-sample loss (A_theta = t - s, no ratio) on the same cache;
    then the teacher-consistency ablation: teacher B (not the SFT teacher) online and offline. Runs checkpoint every
    --eval-every steps with evaluation off; checkpoints are graded afterwards on --eval-n held-out problems
    (greedy), so grading never slows a timed run."""
    torch.set_num_threads(args.threads)
    cfg, out = config.load_config(args.config, args.overrides), os.path.abspath(args.out)
    if not os.path.isfile(os.path.join(args.teacher_b, "config.json")):
        raise ValueError(f"--teacher-b {args.teacher_b}: no model; train one: "
                         f"python sft.py teacher --out {args.teacher_b} --seed 1")
    common = [args.config, *args.overrides, f"steps={args.steps}", f"save_every={args.eval_every}", "eval_size=0",
              "progress=false", f"threads={args.threads}", f"out_dir={out}", f"precompute_prompts={args.prompts}",
              f"chunk_prompts={args.chunk_prompts}", "allow_teacher_mismatch=true"]  # only teacher B needs it
    lightning = ["loss.name=reverse_kl_pg", "loss.advantage=theta", "loss.ratio=false"]
    specs = [("online A", "A", False, []), ("offline A", "A", True, []), ("offline A, Lightning", "A", True, lightning),
             ("offline B", "B", True, []), ("online B", "B", False, [])]
    teachers, pre_s, runs = {"A": cfg.teacher, "B": args.teacher_b}, {}, {}
    for name, who, is_offline, extra in specs:
        tag = name.replace(", ", "_").replace(" ", "_")
        teacher = [f"teacher={teachers[who]}", f"cache_dir={out}/cache_{who}"]
        shutil.rmtree(os.path.join(out, tag), ignore_errors=True)  # a rerun starts from scratch
        if is_offline and who not in pre_s:
            shutil.rmtree(os.path.join(out, f"cache_{who}"), ignore_errors=True)
            _, pre_s[who], msg = _run_script(["precompute", *common, *teacher])
            print(f"precompute {who}: {msg} [{pre_s[who]:.1f}s with start-up]", flush=True)
        offline_args = ["schedule=offline"] if is_offline else []
        t0, wall, _ = _run_script(["train", *common, *offline_args, *teacher, f"run_name={tag}", *extra])
        runs[name] = (os.path.join(out, tag), pre_s[who] if is_offline else 0.0, t0, wall)
    _offline_report(args, cfg, out, runs)


def _offline_report(args, cfg, out, runs):
    import teacher_cache
    grade = _grader(cfg, args.eval_n)
    acc0, table = grade(cfg.student), {}
    for name, (run, pre, t0, wall) in runs.items():
        times, points = _graded_points(run, args.eval_every, grade, t0, offset=pre)
        rate = (len(times) - 1) / (times[max(times)] - times[min(times)])
        table[name] = dict(pre=pre, wall=pre + wall, rate=rate, points=[(0, 0.0, acc0)] + points)
    target = min(table[n]["points"][-1][2] for n in ("online A", "offline A"))
    print(f"\n{cfg.loss.name} (advantage {cfg.loss.advantage}, ratio {cfg.loss.ratio}), Lightning = reverse_kl_pg "
          f"(A_theta, no ratio); {args.steps} steps x {cfg.batch_size} prompts; offline: {args.prompts} prompts rolled "
          "out once")
    print(f"held-out accuracy (greedy, n={args.eval_n}) by learner step; student before OPD {100 * acc0:.1f}%, "
          f"teacher A (SFT teacher) {100 * grade(cfg.teacher):.1f}%, teacher B {100 * grade(args.teacher_b):.1f}%")
    print(f"{'run':<21} {'precompute s':>12} {'steps/s':>8} {'total s':>8} {f's to {100 * target:.1f}%':>10}  "
          + " ".join(f"{'@' + str(k):>6}" for k, _, _ in table["online A"]["points"]))
    for name, r in table.items():
        hit = next((f"{s:.1f}" for _, s, a in r["points"] if a >= target), "-")
        print(f"{name:<21} {r['pre']:>12.1f} {r['rate']:>8.2f} {r['wall']:>8.1f} {hit:>10}  "
              + " ".join(f"{100 * a:>5.1f}%" for _, _, a in r["points"]))
    cache, meta = offline.load_dir(f"{out}/cache_A")
    disk = sum(os.path.getsize(os.path.join(f"{out}/cache_A", n)) for n in os.listdir(f"{out}/cache_A"))
    single = {k: v for k, v in cache.items() if not k.startswith("mc_")}  # what a reverse_kl_pg precompute writes
    print(f"cache A: {meta['num_sequences']} sequences, {meta['num_tokens']} tokens, M={cfg.loss.samples}: "
          f"{teacher_cache.bytes_per_token(cache):.1f} bytes/token in memory "
          f"({disk / meta['num_tokens']:.1f} on disk); without the mc_* columns (a reverse_kl_pg cache) "
          f"{teacher_cache.bytes_per_token(single):.1f}")
    print("steps/s: learner steps per second, step 1 to the last (start-up excluded). total s, s to target: wall clock "
          "from launch (offline: precompute included) to the end / to the first checkpoint at the target (the lower "
          "final accuracy of online A and offline A). Teacher B runs use allow_teacher_mismatch=true, same prompts "
          "and seeds.")


# ----------------------------------------------------------------------------- memory (shipped GPU configs)
GPU_BYTES, FIT = 80e9, 0.85  # an 80 GB GPU; a config fits if every device's modelled peak is <= 85% of it (68 GB)
GPU_CONFIGS = ["configs/gpu1_smoke.yaml", "configs/qwen2.5_gsm8k_4gpu.yaml", "configs/qwen3_deepmath_8gpu.yaml",
               "configs/qwen3_deepmath_8gpu_fkl.yaml"]
# Real model dims, from each model's config.json on the Hugging Face Hub (Qwen/<name>; nothing is downloaded here).
MODELS = {
    "Qwen2.5-0.5B-Instruct": dict(hidden=896, inter=4864, layers=24, heads=14, kv=2, head_dim=64, tied=True),
    "Qwen2.5-1.5B-Instruct": dict(hidden=1536, inter=8960, layers=28, heads=12, kv=2, head_dim=128, tied=True),
    "Qwen3-1.7B-Base": dict(hidden=2048, inter=6144, layers=28, heads=16, kv=8, head_dim=128, tied=True),
    "Qwen3-8B": dict(hidden=4096, inter=12288, layers=36, heads=32, kv=8, head_dim=128, tied=False),
}
VOCAB = 151936  # every model above (config.json vocab_size)
OVERHEAD, SLACK = 2.5e9, 0.05  # per process: CUDA context + NCCL/cuBLAS workspaces; allocator fragmentation on tensors
VLLM_BUDGET = "vLLM gpu_memory_utilization x GPU (weights, KV cache, activations, its CUDA context: all inside)"


def measure_model(name, tokens=256):
    """MODELS[name] plus parameter counts of the real model (built on the meta device) and, from one real-size decoder
    layer in bf16 on CPU, batch 1 x `tokens`, no padding mask, the bytes per token saved for backward
    (saved_tensors_hooks, unique storages, parameters excluded), without and with activation checkpointing (the
    learner's non-reentrant checkpoint_wrapper: the hooks see what the checkpoint keeps, its input; what the layer
    saves inside goes to the checkpoint's own hooks and is recomputed)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config
    from transformers.models.qwen2 import modeling_qwen2 as qwen2
    from transformers.models.qwen3 import modeling_qwen3 as qwen3
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


def cache_bytes_per_token(cfg):
    """Bytes per response token of the batch's cache fields (teacher_cache.py's table) for this estimator."""
    import teacher_cache
    fields = E.required_fields(cfg.loss) | {"behavior_logp", "teacher_logp", "policy_version"}
    width = {"K": cfg.loss.teacher_topk, "Ks": cfg.loss.student_topk, "M": cfg.loss.samples, "Mt": cfg.loss.samples}
    specs = [teacher_cache.FIELD_SPECS[f] for f in fields]
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
        s, t = measured[os.path.basename(cfg.student)], measured[os.path.basename(cfg.teacher)]
        rollout = f"rollout worker ({'vLLM' if cfg.engine == 'vllm' else 'HF'})"
        roles = [("learner rank", cfg.learner_devices, learner_terms(cfg, s)),
                 ("teacher scoring", [cfg.teacher_device], teacher_terms(cfg, t)),
                 (rollout, cfg.rollout_devices, rollout_terms(cfg, s))]
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


# ----------------------------------------------------------------------------- peer: asyncopd vs TRL
# Systems of `bench.py peer`: asyncopd as key=value overrides of --config, or a TRL trainer by name (see trl_run).
PEER_SYSTEMS = {
    "asyncopd": [],                                  # the config as is (default: async, exact forward KL)
    "asyncopd-sync": ["schedule=sync"],              # the same estimator, strict sync: nothing overlaps
    "asyncopd-rkl": ["loss.name=reverse_kl_dense"],  # async, exact reverse KL over the vocabulary (TRL GKD's loss)
    "asyncopd-mc": ["loss.name=reverse_kl_mc", "loss.samples=64"],  # async, the paper's MC-64 reverse KL, A_theta
    "trl-gkd": ("gkd", 1.0),          # TRL 1.16 GKDTrainer, lmbda=1, beta=1: exact reverse KL, sync, 1 process
    "trl-gkd-fkl": ("gkd", 0.0),      # the same, beta=0: exact forward KL (asyncopd's forward_kl_dense)
    "trl-distill": ("distill", 1.0),  # TRL 1.16 DistillationTrainer, beta=1: reverse KL, TRL's stable API
}
THRESHOLDS = (0.80, 0.90, 0.95)


def trl_run(trainer, beta, config_path, overrides, run_dir, steps, save_every, seed, threads):
    """TRL's GKDTrainer or DistillationTrainer in this process with asyncopd's models (the teacher in its dtype),
    prompts (in the same order per step), batch, lengths, temperature and optimizer (AdamW, constant lr, betas,
    weight decay, grad clip). Every batch is sampled from the student (GKD: lmbda=1); TRL's generalized JSD over the
    whole vocabulary is then KL(student || teacher) at beta=1 and KL(teacher || student) at beta=0 (trl 1.16:
    F.kl_div in gkd_trainer.py, a chunked kernel in distillation_trainer.py).
    Writes metrics.jsonl step times and ckpt_NNNNN like asyncopd."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local; never reach the hub
    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    cfg = config.load_config(config_path, [*overrides, f"seed={seed}", f"steps={steps}", "eval_size=0"])
    tok, train, _ = config.validate(cfg)  # asyncopd's checks; its tokenizer and encoded prompts
    order = [i for u in range(steps * schedule.units_per_batch(cfg))
             for i in schedule.unit_prompt_indices(cfg, len(train), u)]

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
    common = dict(output_dir=run_dir, max_steps=steps, per_device_train_batch_size=cfg.batch_size, seed=seed, beta=beta,
                  temperature=cfg.temperature, learning_rate=cfg.lr, lr_scheduler_type="constant",
                  adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1], weight_decay=cfg.weight_decay,
                  max_grad_norm=cfg.grad_clip, bf16=False, gradient_checkpointing=False, use_cpu=True,
                  save_strategy="no", report_to="none", logging_steps=max(1, steps // 10), disable_tqdm=True)
    if trainer == "gkd":  # each run imports only its trainer: imports are on the clock
        from trl.experimental.gkd import GKDConfig
        from trl.experimental.gkd import GKDTrainer as Trainer
        args = GKDConfig(**common, lmbda=1.0, max_new_tokens=cfg.max_new_tokens, train_sampling_strategy="sequential")
        extra = dict(data_collator=collate, train_dataset=Dataset.from_dict({"ids": [train[i]["ids"] for i in order]}))
    else:  # takes text prompts; counts the loss's tokens after sampling (huggingface/trl#6478)
        from trl import DistillationConfig
        from trl import DistillationTrainer as Trainer
        args = DistillationConfig(**common, max_completion_length=cfg.max_new_tokens, shuffle_dataset=False)
        extra = dict(train_dataset=Dataset.from_dict({"prompt": [train[i]["prompt"] for i in order]}))
    student = AutoModelForCausalLM.from_pretrained(cfg.student)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=config.teacher_dtype(cfg))  # asyncopd's teacher
    Trainer(model=student, teacher_model=teacher, args=args, processing_class=tok, callbacks=[Saver()], **extra).train()
    log.close()


def cmd_peer(args):
    """Each system and seed runs alone in a fresh process on the same --cpus cores, checkpointing every
    --save-every steps with no evaluation; then every checkpoint is graded (greedy, --eval-n held-out problems),
    off the clock. Times are seconds from the launch of the process to the end of the checkpoint's step."""
    systems, seeds = args.systems.split(","), [int(x) for x in args.seeds.split(",")]
    if any(s not in PEER_SYSTEMS for s in systems):
        raise SystemExit(f"bench.py peer: unknown system in --systems {args.systems}; "
                         f"use some of {','.join(PEER_SYSTEMS)}")
    if any(isinstance(PEER_SYSTEMS[s], tuple) for s in systems):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("bench.py peer: the trl-* systems need TRL: .venv/bin/python -m pip install trl==1.16.0 "
                             "(or leave them out of --systems)") from None
    torch.set_num_threads(args.cpus)
    cfg, out = config.load_config(args.config, args.overrides), os.path.abspath(args.out)
    grade, results = _grader(cfg, args.eval_n), []
    for seed in seeds:
        for name in systems:
            run_dir = os.path.join(out, f"{name}-{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts from scratch
            if isinstance(PEER_SYSTEMS[name], tuple):
                os.makedirs(run_dir)
                trainer, beta = PEER_SYSTEMS[name]
                spec = dict(trainer=trainer, beta=beta, config_path=args.config, overrides=args.overrides,
                            run_dir=run_dir, steps=args.steps, save_every=args.save_every, seed=seed,
                            threads=args.trl_threads or args.cpus)
                t0, _, _ = _run_script(["_trl", json.dumps(spec)], "bench.py", args.cpus)
            else:
                t0, _, _ = _run_script(["train", args.config, *PEER_SYSTEMS[name], *args.overrides,
                                        f"steps={args.steps}", f"save_every={args.save_every}", "eval_size=0",
                                        "progress=false", f"seed={seed}", f"out_dir={out}", f"run_name={name}-{seed}"],
                                       cpus=args.cpus)
            times, points = _graded_points(run_dir, args.save_every, grade, t0)
            for k, _, _ in points:  # graded: the checkpoints are not needed any more
                shutil.rmtree(os.path.join(run_dir, f"ckpt_{k:05d}"))
            last = max(times)
            hits = {f"{th:.2f}": next(((k, t) for k, t, a in points if a >= th), None) for th in THRESHOLDS}
            results.append(dict(system=name, seed=seed, start_s=times[1], points=points, hits=hits,
                                step_s=(times[last] - times[1]) / max(1, last - 1)))
            print(f"{name}-{seed}: {last} steps, graded {len(points)} checkpoints", flush=True)
    with open(os.path.join(out, "peer.json"), "w") as f:
        json.dump(results, f)
    _peer_report(args, cfg, out, grade(cfg.student), systems, seeds, results)
    return results


def _peer_report(args, cfg, out, acc0, systems, seeds, results):
    print(f"\n{args.steps} steps x {cfg.batch_size} prompts, {args.cpus} cores each "
          f"(TRL: {args.trl_threads or args.cpus} threads; asyncopd: {cfg.threads} per process), checkpoints every "
          f"{args.save_every} steps graded on {args.eval_n} held-out problems (greedy), "
          f"student before {100 * acc0:.1f}%")
    print(f"{'system':<15} {'seed':>4} {'start s':>7} {'s/step':>6} "
          + " ".join(f"{f'{100 * th:.0f}%: s (step)':>16}" for th in THRESHOLDS) + f" {'final':>6}")
    for r in results:
        cells = [f"{h[1]:.1f} ({h[0]})" if h else "not reached" for h in r["hits"].values()]
        print(f"{r['system']:<15} {r['seed']:>4} {r['start_s']:>7.1f} {r['step_s']:>6.3f} "
              + " ".join(f"{c:>16}" for c in cells) + f" {100 * r['points'][-1][2]:>5.1f}%")
    print("start s: launch to the end of step 1; s/step: after it. s (step): seconds from launch and learner step of "
          "the first checkpoint at that held-out accuracy.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        ax.plot([t for _, t, _ in r["points"]], [a for _, _, a in r["points"]], f"C{systems.index(r['system'])}",
                marker=".", label=r["system"] if r["seed"] == seeds[0] else None)
    for th in THRESHOLDS:
        ax.axhline(th, color="grey", lw=0.5, ls="--")
    ax.set(xlabel="seconds since launch", ylabel=f"held-out accuracy (greedy, n={args.eval_n})", ylim=(0, 1),
           title=f"accuracy vs seconds, {args.cpus} cores, seeds {args.seeds}")
    ax.legend()
    fig.savefig(os.path.join(out, "peer.png"), dpi=80)
    print(f"plot: {out}/peer.png, points: {out}/peer.json")


# ----------------------------------------------------------------------------- MC draws inside vLLM
def cmd_mc_draw(args):
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

    import vllm_engine
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


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    config, threads, overrides = ("--config", "configs/default.yaml"), ("--threads", 1), "overrides"
    commands = {  # name: (function, help, arguments as (name, default[, help])); a list default: any number of values
        "loss": (cmd_loss, "memory and time of the loss path: chunked vs naive student gather", [
            ("--tokens", "1024,2048,4096", "comma-separated response-token counts"), ("--vocab", 151936),
            ("--hidden", 896), ("--device", "cpu")]),
        "pipeline": (cmd_pipeline, "trained tokens/s: sync vs step_off(2) vs async, with the ideal bound", [
            config, ("--steps", 24), ("--max-staleness", 2),
            (overrides, [], "key=value config overrides for every schedule")]),
        "offline": (cmd_offline, "online async vs offline Lightning OPD, and teacher consistency (A vs B)", [
            config, ("--steps", 60), ("--eval-every", 10, "checkpoint (and grade) every N learner steps"),
            ("--eval-n", 1000, "held-out problems per grade"),
            ("--prompts", 3840, "precompute: prompts rolled out once"), ("--chunk-prompts", 256),
            ("--teacher-b", "/tmp/asyncopd_teacher_b", "a different teacher (not committed)"),
            ("--out", "/tmp/asyncopd_bench_offline"), threads,
            (overrides, [], "key=value config overrides for every run, e.g. lr=0.0003")]),
        "memory": (lambda a: sys.exit(0 if cmd_memory(a) else 1),
                   "modelled peak GPU memory per role of each shipped GPU config, from measured layers", [
            ("configs", GPU_CONFIGS), ("--tokens", 256, "sequence length of the measured layer forward"), threads]),
        "peer": (cmd_peer, "asyncopd vs TRL (GKD, Distillation): seconds and steps to 80/90/95%% held-out accuracy", [
            config, ("--systems", ",".join(PEER_SYSTEMS), "comma-separated keys of PEER_SYSTEMS"), ("--seeds", "0,1,2"),
            ("--steps", 2000), ("--save-every", 50, "checkpoint (and grade) every N learner steps"),
            ("--eval-n", 500, "held-out problems per grade"),
            ("--cpus", 2, "cores every run is pinned to (asyncopd: threads per process from the config)"),
            ("--trl-threads", 0, "TRL's torch threads (0 = --cpus; 1 can be 4x faster on a busy machine)"),
            ("--out", "/tmp/asyncopd_bench_peer"),
            (overrides, [], "key=value overrides for every system "
                            "(TRL takes models, data, batch, lengths, optimizer)")]),
        "_trl": (lambda a: trl_run(**json.loads(a.spec)), argparse.SUPPRESS, [("spec", None)]),  # one TRL run
        "mc-draw": (cmd_mc_draw, "cost of the vLLM MC-draw logits processor per decode step", [
            ("--rows", "1,8,32,128", "logits rows (requests) per step"), ("--vocab", 151936),
            ("--samples", 64, "M (M-1 draws per row)"), ("--device", "cpu"), ("--threads", 2), ("--repeats", 3)]),
        "_loss_point": (lambda a: print(json.dumps(loss_point(**json.loads(a.spec)))), argparse.SUPPRESS,
                        [("spec", None)]),  # internal, like _trl: one measurement in a fresh process
    }
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, summary, arguments) in commands.items():
        p = sub.add_parser(name, help=summary)
        p.set_defaults(fn=fn)
        for arg, default, *help_text in arguments:
            kind = {"nargs": "*"} if isinstance(default, list) else {} if default is None else {"type": type(default)}
            p.add_argument(arg, default=default, help=help_text[0] if help_text else None, **kind)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
