"""Benchmarks (commands, not timed tests).

    python bench.py loss [--tokens 1024,2048,4096] [--vocab 151936] [--hidden 896] [--device cpu|cuda]
    python bench.py pipeline [--config configs/default.yaml] [--steps 24] [--max-staleness 2] [key=value ...]
    python bench.py offline [--steps 60] [--prompts 3840] [--teacher-b DIR] [key=value ...]
    python bench.py mc-draw [--rows 1,8,32,128] [--vocab 151936] [--samples 64] [--device cpu|cuda]

loss: peak extra memory and time of the learner's loss path (student_logp + estimator + backward) at a
Qwen-size vocabulary, chunked gather (estimators.student_logp) vs naive (full float32 log_softmax, then
gather), each point in a fresh subprocess; see loss_point(). On CPU, scale tokens down and read the
linear fit's extrapolation to EXTRAPOLATE tokens.
pipeline: the real pipeline (asyncopd.run) once per schedule on one config; see throughput().
offline: online async OPD vs offline Lightning OPD (precompute included) and teacher A vs B; see cmd_offline().
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
def _asyncopd(argv):
    """`python asyncopd.py ARGV` in a fresh process: (launch time, wall seconds, stdout)."""
    t0 = time.time()
    out = subprocess.run([sys.executable, "asyncopd.py", *argv], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode:
        raise RuntimeError(f"asyncopd.py {' '.join(argv)} failed: {out.stderr.strip()[-800:]}")
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
    args.fn(args)


if __name__ == "__main__":
    main()
