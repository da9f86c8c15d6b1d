"""Benchmarks on this machine (commands, not timed tests); the GPU sizing ones are in bench_gpu.py. From the repository
root, with the environment `bash run.sh` made:

    .venv/bin/python -m tools.bench pipeline [--config configs/default.yaml] [--steps 24] [--repeats 1] [k=v ...]
    .venv/bin/python -m tools.bench offline [--steps 60] [--prompts 3840] [--teacher-b DIR] [key=value ...]
    .venv/bin/python -m tools.bench peer [--systems asyncopd,...,trl-distill] [--seeds 0,1,2] [--steps 2000] [k=v ...]

pipeline: the real pipeline (`asyncopd.py train`, a fresh process per run) per schedule on one config; see throughput().
offline: online async OPD vs offline Lightning OPD (precompute included) and teacher A vs B; see cmd_offline().
peer: seconds from launch to 80/90/95% held-out accuracy, asyncopd configs vs TRL's GKDTrainer and DistillationTrainer
(optional: `pip install trl==1.16.0`), evaluation off the clock; see cmd_peer().
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.utils import logging as hf_logging

import batch_format
import config
import schedule
import task
import teacher_cache
from optional import offline
from runtime import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: asyncopd.py is here


# ----------------------------------------------------------------------------- pipeline throughput
def throughput(overrides, schedules, config_path="configs/default.yaml", repeats=1):
    """Run the real pipeline (asyncopd.py train) per schedule on the same config; trained tokens/s at steady state.

    The first schedule must be `sync`: nothing overlaps there, so its per-step seconds are each stage's busy time
    (gen_s rollout, score_s teacher, train_s + sync_s learner), and an overlapping schedule can at best reach
    speed-up = sum(stage times) / max(max stage time, sum / cores) over sync (the ideal bound): a stage per device,
    and when every role is on the CPU, no more than `cores` stages busy at once (this process's allowed cores).
    repeats > 1: the schedules run in turn that many rounds, each round measured against its own sync run (a shared
    machine's slow drifts cancel); every number is the median over rounds, the efficiency also its min and max."""
    rounds = []
    for round_ in range(repeats):
        rows = []
        for name, extra in schedules:
            args = [*overrides, *extra, "progress=false", "eval_size=0",
                    f"run_name=bench-{name}-{round_}-{time.strftime('%H%M%S')}"]
            args += unread_keys(config_path, args)  # e.g. the config's max_staleness in the sync run
            cfg = config.load_config(config_path, args)
            _run_script(["train", config_path, *args])  # a fresh process per run: no run inherits another's state
            with open(os.path.join(cfg.out_dir, cfg.run_name, "metrics.jsonl")) as f:
                steps = [r for r in map(json.loads, f) if r["kind"] == "step"][2:]  # skip start-up (first batches)
            span, timed = steps[-1]["time"] - steps[0]["time"], steps[1:]  # the steps that end inside the span
            mean = lambda k, timed=timed: sum(r[k] for r in timed) / len(timed)  # noqa: E731 - a one-line helper
            row = {"tokens_per_s": sum(r["tokens"] for r in timed) / span, "step_s": span / len(timed),
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
        rounds.append(rows)
    return [dict({key: statistics.median(rd[i][key] for rd in rounds) for key in rounds[0][i]}, schedule=name,
                 runs=repeats, efficiency_min=min(rd[i]["efficiency"] for rd in rounds),
                 efficiency_max=max(rd[i]["efficiency"] for rd in rounds))
            for i, (name, _) in enumerate(schedules)]


def cmd_pipeline(args):
    if args.steps < 4:  # throughput() drops two start-up steps and times the rest from the first one kept
        raise SystemExit(f"tools.bench pipeline: --steps {args.steps} leaves nothing to time (the first two steps are "
                         "start-up): use --steps 4 or more, e.g. 60")
    rows = throughput([f"steps={args.steps}", *args.overrides], [
        ("sync", ["schedule=sync"]), ("step_off(2)", ["schedule=step_off", "step_off=2"]),
        ("async", ["schedule=async", f"max_staleness={args.max_staleness}"])], args.config, args.repeats)
    print(f"{'schedule':<12} {'tokens/s':>9} {'speed-up':>9} {'bound':>6} {'of bound (min-max)':>19} {'s/step':>7} "
          f"{'gen s/step':>10} {'score s/step':>12} {'learn s/step':>12} {'bottleneck busy':>15} {'staleness':>9}")
    for r in rows:
        spread = f"{100 * r['efficiency']:.0f}% ({100 * r['efficiency_min']:.0f}-{100 * r['efficiency_max']:.0f})"
        print(f"{r['schedule']:<12} {r['tokens_per_s']:>9.0f} {r['speedup']:>8.2f}x {r['bound']:>5.2f}x "
              f"{spread:>19} {r['step_s']:>7.3f} {r['gen_s']:>10.3f} {r['score_s']:>12.3f} "
              f"{r['train_s']:>12.3f} {100 * r['busy']:>14.0f}% {r['stale_mean']:>9.2f}")
    print(f"medians over {args.repeats} round(s), each schedule against its round's sync run. bound = sum / max(max, "
          "sum / cores) of the sync run's stage times (a device per stage; on the CPU at most `cores` stages at "
          "once); sync also pays per-step hand-offs outside the stages, which overlap hides too. bottleneck busy = "
          "slowest stage's seconds / wall seconds per step.")


# ----------------------------------------------------------------------------- timed runs, graded afterwards
def _run_script(argv, module=None, cpus=0):
    """`python asyncopd.py ARGV` (or `python -m MODULE ARGV`) in a fresh process, in our working directory, on the
    first `cpus` allowed cores if cpus > 0 (its children inherit them; Linux only, elsewhere unpinned):
    (launch time, wall seconds, stdout)."""
    cores = sorted(os.sched_getaffinity(0))[:cpus] if cpus and hasattr(os, "sched_setaffinity") else None
    what = ["-m", module] if module else [os.path.join(ROOT, "asyncopd.py")]
    t0 = time.time()
    out = subprocess.run([sys.executable, *what, *argv], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT),  # -m tools.bench from any working directory
                         preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    if out.returncode:
        raise RuntimeError(f"{' '.join(what)} {' '.join(argv)} failed: {out.stderr.strip()[-800:]}")
    return t0, time.time() - t0, out.stdout.strip()


def unread_keys(config_path, overrides, precompute=False):
    """key=default for each key of the config file that the run's schedule does not read (preflight.SCHEDULE_KEYS):
    a comparison runs one config under several schedules, and a schedule refuses a key it would ignore. A key given in
    `overrides` is left alone (and refused if unread)."""
    cfg, default = config.load_config(config_path, overrides), config.Config()
    modes, given = {cfg.schedule, *(["precompute"] if precompute else [])}, {o.split("=")[0] for o in overrides}
    return [f"{k}={getattr(default, k)}" for k, users in preflight.SCHEDULE_KEYS.items()
            if not modes & set(users) and k not in given and getattr(cfg, k) != getattr(default, k)]


def _grader(cfg, n):
    """grade(model dir) -> greedy accuracy on the first n held-out problems."""
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per graded checkpoint would bury the report
    tok, rows = AutoTokenizer.from_pretrained(cfg.student), task.read_prompts("addition", "test", n)
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
                         f".venv/bin/python -m tools.sft teacher --out {args.teacher_b} --seed 1")
    common = [*args.overrides, f"steps={args.steps}", f"save_every={args.eval_every}", "eval_size=0",
              "progress=false", f"threads={args.threads}", f"out_dir={out}"]
    lightning = ["loss.name=reverse_kl_pg", "loss.advantage=theta", "loss.ratio=false"]
    specs = [("online A", "A", False, []), ("offline A", "A", True, []), ("offline A, Lightning", "A", True, lightning),
             ("offline B", "B", True, []), ("online B", "B", False, [])]
    teachers, pre_s, runs = {"A": cfg.teacher, "B": args.teacher_b}, {}, {}
    for name, who, is_offline, extra in specs:
        tag = name.replace(", ", "_").replace(" ", "_")
        teacher, cache = [f"teacher={teachers[who]}"], [f"cache_dir={out}/cache_{who}"]
        shutil.rmtree(os.path.join(out, tag), ignore_errors=True)  # a rerun starts from scratch
        if is_offline and who not in pre_s:
            shutil.rmtree(os.path.join(out, f"cache_{who}"), ignore_errors=True)
            pre = [*common, *teacher, *cache, f"precompute_prompts={args.prompts}",
                   f"chunk_prompts={args.chunk_prompts}"]
            _, pre_s[who], msg = _run_script(["precompute", args.config, *pre, *unread_keys(args.config, pre, True)])
            print(f"precompute {who}: {msg} [{pre_s[who]:.1f}s with start-up]", flush=True)
        run = [*common, *teacher, f"run_name={tag}", *extra]
        if is_offline:  # teacher B's cache did not score the SFT data: the ablation needs allow_teacher_mismatch
            run += ["schedule=offline", *cache] + (["allow_teacher_mismatch=true"] if who == "B" else [])
        t0, wall, _ = _run_script(["train", args.config, *run, *unread_keys(args.config, run)])
        runs[name] = (os.path.join(out, tag), pre_s[who] if is_offline else 0.0, t0, wall)
    _offline_report(args, cfg, out, runs)


def _offline_report(args, cfg, out, runs):
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
          f"{batch_format.bytes_per_token(cache):.1f} bytes/token in memory "
          f"({disk / meta['num_tokens']:.1f} on disk); without the mc_* columns (a reverse_kl_pg cache) "
          f"{batch_format.bytes_per_token(single):.1f}")
    print("steps/s: learner steps per second, step 1 to the last (start-up excluded). total s, s to target: wall clock "
          "from launch (offline: precompute included) to the end / to the first checkpoint at the target (the lower "
          "final accuracy of online A and offline A). Offline B uses allow_teacher_mismatch=true; all runs have the "
          "same prompts and seeds.")


# ----------------------------------------------------------------------------- peer: asyncopd vs TRL
# Systems of `tools.bench peer`: asyncopd as key=value overrides of --config, or a TRL trainer by name (see trl_run).
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
    from datasets import Dataset  # TRL's dependency: optional
    cfg = config.load_config(config_path, [*overrides, f"seed={seed}", f"steps={steps}", "eval_size=0"])
    tok, train, _ = preflight.check_inputs(cfg)  # asyncopd's checks; its tokenizer and encoded prompts
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
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=teacher_cache.scoring_dtype(cfg))  # asyncopd's
    Trainer(model=student, teacher_model=teacher, args=args, processing_class=tok, callbacks=[Saver()], **extra).train()
    log.close()


def cmd_peer(args):
    """Each system and seed runs alone in a fresh process on the same --cpus cores, checkpointing every
    --save-every steps with no evaluation; then every checkpoint is graded (greedy, --eval-n held-out problems),
    off the clock. Times are seconds from the launch of the process to the end of the checkpoint's step."""
    systems, seeds = args.systems.split(","), [int(x) for x in args.seeds.split(",")]
    if any(s not in PEER_SYSTEMS for s in systems):
        raise SystemExit(f"tools.bench peer: unknown system in --systems {args.systems}; "
                         f"use some of {','.join(PEER_SYSTEMS)}")
    if any(isinstance(PEER_SYSTEMS[s], tuple) for s in systems):
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("tools.bench peer: the trl-* systems need TRL: .venv/bin/python -m pip install "
                             "trl==1.16.0 (or leave them out of --systems)") from None
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
                t0, _, _ = _run_script(["_trl", json.dumps(spec)], "tools.bench", args.cpus)
            else:
                run = [*PEER_SYSTEMS[name], *args.overrides, f"steps={args.steps}", f"save_every={args.save_every}",
                       "eval_size=0", "progress=false", f"seed={seed}", f"out_dir={out}", f"run_name={name}-{seed}"]
                t0, _, _ = _run_script(["train", args.config, *run, *unread_keys(args.config, run)], cpus=args.cpus)
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


# ----------------------------------------------------------------------------- command line
def build_parser(doc: str, commands: dict) -> argparse.ArgumentParser:
    """argparse from {name: (function, help, arguments as (name, default[, help]))}: a subcommand each, which sets
    args.fn to its function; a list default takes any number of values, None a required positional."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, summary, arguments) in commands.items():
        p = sub.add_parser(name, **({"help": summary} if summary else {}))  # None: internal, not in --help
        p.set_defaults(fn=fn)
        for arg, default, *help_text in arguments:
            kind = {"nargs": "*"} if isinstance(default, list) else {} if default is None else {"type": type(default)}
            p.add_argument(arg, default=default, help=help_text[0] if help_text else None, **kind)
    return parser


def parser() -> argparse.ArgumentParser:
    config, threads, overrides = ("--config", "configs/default.yaml"), ("--threads", 1), "overrides"
    return build_parser(__doc__, {
        "pipeline": (cmd_pipeline, "trained tokens/s: sync vs step_off(2) vs async, with the ideal bound", [
            config, ("--steps", 24), ("--max-staleness", 2),
            ("--repeats", 1, "rounds of the three schedules; medians and the min-max of the efficiency"),
            (overrides, [], "key=value config overrides for every schedule")]),
        "offline": (cmd_offline, "online async vs offline Lightning OPD, and teacher consistency (A vs B)", [
            config, ("--steps", 60), ("--eval-every", 10, "checkpoint (and grade) every N learner steps"),
            ("--eval-n", 1000, "held-out problems per grade"),
            ("--prompts", 3840, "precompute: prompts rolled out once"), ("--chunk-prompts", 256),
            ("--teacher-b", "runs/teacher_b", "another teacher: python -m tools.sft teacher --out DIR --seed 1"),
            ("--out", "runs/bench_offline"), threads,
            (overrides, [], "key=value config overrides for every run, e.g. lr=0.0003")]),
        "peer": (cmd_peer, "asyncopd vs TRL (GKD, Distillation): seconds and steps to 80/90/95%% held-out accuracy", [
            config, ("--systems", ",".join(PEER_SYSTEMS), "comma-separated keys of PEER_SYSTEMS"), ("--seeds", "0,1,2"),
            ("--steps", 2000), ("--save-every", 50, "checkpoint (and grade) every N learner steps"),
            ("--eval-n", 500, "held-out problems per grade"),
            ("--cpus", 2, "cores every run is pinned to (asyncopd: threads per process from the config)"),
            ("--trl-threads", 0, "TRL's torch threads (0 = --cpus; 1 can be 4x faster on a busy machine)"),
            ("--out", "runs/bench_peer"),
            (overrides, [], "key=value overrides for every system "
                            "(TRL takes models, data, batch, lengths, optimizer)")]),
        "_trl": (lambda a: trl_run(**json.loads(a.spec)), None, [("spec", None)]),  # one TRL run
    })


def main(argv: list[str] | None = None):
    args = parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    main()
