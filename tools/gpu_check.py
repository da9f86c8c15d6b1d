"""One command that checks a GPU box: every GPU path of the pipeline, for real, with the shipped tiny models.

    bash run.sh gpu-check            # builds .venv-gpu from requirements-gpu.txt (vLLM) on first use
    python -m tools.gpu_check [--steps 6]  # in any environment with CUDA torch + requirements.txt's packages
    python -m tools.gpu_check --plan 8     # print the runs it would make on an 8-GPU box (no GPU needed)

Each path is `asyncopd.py train` in a fresh process on 1-8 GPUs (roles spread over what is visible):
HF rollout with every role on cuda (host shared-memory weights), HF rollout with the learner's buffer handed
over by CUDA IPC to two rollout workers, the FSDP2 learner on NCCL with bf16 mixed precision (two ranks when
two GPUs are visible), and the vLLM rollout without and with in-engine Monte Carlo draws (when vLLM is
installed), each sync and async. A path passes when the run exits 0 with every step trained, the staleness
bound held (the learner checks it each step) and, for sync runs with importance ratios, the first step's
mean ratio exp(s - b) is within RATIO_TOL of 1: the rollout's b and the learner's s describe the same weights.
Prints one table; exits non-zero if any path failed.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: asyncopd.py is here
RATIO_TOL = 0.05  # bf16 rollout vs bf16-compute learner on the tiny models: |mean exp(s - b) - 1| seen well below this
COMMON = ["student=models/student", "teacher=models/teacher", "data=addition", "eval_size=32", "eval_every=2",
          "max_prompt_len=16", "max_new_tokens=48", "batch_size=32", "rollout_batch_size=16", "lr=5e-4",
          "mixed_precision=true", "progress=false", "threads=4"]
MC = ["loss.name=reverse_kl_mc", "loss.advantage=theta", "loss.ratio=true", "loss.samples=16"]
FKL = ["loss.name=forward_kl_topk", "loss.teacher_topk=8"]


def plan(n_gpus, with_vllm):
    """[(path, schedule, overrides)] for n_gpus visible GPUs: rollout on 0, teacher on 1, learner on the last two
    (wrapping around on smaller boxes; NCCL needs distinct GPUs, so one rank on a 1-GPU box)."""
    gpu = lambda i: f"cuda:{i % n_gpus}"  # noqa: E731
    learners = [gpu(n_gpus - 2), gpu(n_gpus - 1)] if n_gpus >= 2 else [gpu(0)]
    roles = [f"rollout_devices=[{gpu(0)}]", f"teacher_device={gpu(1)}", f"learner_devices=[{','.join(learners)}]"]
    paths = [("hf, all roles on cuda, shared-memory weights", roles + ["weight_transport=shared"] + MC),
             ("hf, CUDA IPC weights to 2 rollout workers", roles[1:] + [f"rollout_devices=[{gpu(0)},{gpu(0)}]",
                                                                        "weight_transport=handoff"] + MC),
             (f"NCCL learner x{len(learners)}, bf16 mixed precision, fkl", roles + FKL)]
    if with_vllm:
        vllm = roles + ["engine=vllm", "gpu_memory_utilization=0.3"]
        paths += [("vllm rollout, forward KL top-K", vllm + FKL),
                  ("vllm rollout, MC reverse KL (in-engine draws)", vllm + MC)]
    schedules = [("sync", ["schedule=sync"]), ("async", ["schedule=async", "max_staleness=2"])]
    return [(name, sched, over + extra) for name, over in paths for sched, extra in schedules]


def run_path(name, schedule, overrides, steps, out_dir):
    run_name = f"{len(os.listdir(out_dir)):02d}-{schedule}"
    argv = [sys.executable, os.path.join(ROOT, "asyncopd.py"), "train", *COMMON, *overrides, f"steps={steps}",
            f"out_dir={out_dir}", f"run_name={run_name}"]
    t0 = time.time()
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    seconds = time.time() - t0
    metrics = os.path.join(out_dir, run_name, "metrics.jsonl")
    recs = [json.loads(line) for line in open(metrics)] if os.path.isfile(metrics) else []
    steps_done = [r for r in recs if r["kind"] == "step"]
    problem = ""
    if out.returncode:
        problem = (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1][:160]
    elif len(steps_done) != steps:
        problem = f"{len(steps_done)} of {steps} steps"
    elif schedule == "sync" and "ratio_mean" in steps_done[0] and abs(steps_done[0]["ratio_mean"] - 1) > RATIO_TOL:
        problem = f"step-1 mean ratio {steps_done[0]['ratio_mean']:.4f}: rollout b and learner s disagree"
    tok_s = steps_done[-1]["tokens_per_s"] if steps_done else 0.0
    ratio = steps_done[0].get("ratio_mean") if steps_done else None
    return {"path": name, "schedule": schedule, "ok": not problem, "seconds": seconds, "tokens_per_s": tok_s,
            "ratio": ratio, "problem": problem, "run": os.path.join(out_dir, run_name)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="learner steps per path")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="run folders go here")
    p.add_argument("--plan", type=int, metavar="N_GPUS", help="only print the runs for N_GPUS (no GPU needed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with_vllm = importlib.util.find_spec("vllm") is not None
    if args.plan:
        for name, schedule, over in plan(args.plan, with_vllm=True):
            print(f"{name} [{schedule}]: {' '.join(over)}")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False): run it on a GPU machine "
              "with a CUDA build of torch", file=sys.stderr)
        return 2
    n = min(torch.cuda.device_count(), 8)
    os.makedirs(args.out, exist_ok=True)
    print(f"gpu_check: {n} GPU(s) ({torch.cuda.get_device_name(0)}), torch {torch.__version__}, "
          f"vllm {'installed' if with_vllm else 'not installed: vLLM paths skipped'}", flush=True)
    rows = []
    for name, schedule, over in plan(n, with_vllm):
        rows.append(run_path(name, schedule, over, args.steps, args.out))
        r = rows[-1]
        print(f"  {'pass' if r['ok'] else 'FAIL'}  {name} [{schedule}] {r['seconds']:.0f}s {r['problem']}", flush=True)
    w = max(len(r["path"]) for r in rows)
    print(f"\n{'path':<{w}}  {'schedule':<8} {'result':<6} {'seconds':>7} {'tokens/s':>9} {'ratio@1':>8}")
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.4f}"
        print(f"{r['path']:<{w}}  {r['schedule']:<8} {'pass' if r['ok'] else 'FAIL':<6} {r['seconds']:>7.1f} "
              f"{r['tokens_per_s']:>9.0f} {ratio:>8}")
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"FAIL {r['path']} [{r['schedule']}]: {r['problem']} (see {r['run']}/error.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
