"""The learner: the student under FSDP2 (`fully_shard`), one optimizer step per mini-batch, weight publishing
to the rollout, and durable checkpoints.

Rank 0 receives whole batches and splits them (plan_batch); every rank trains its shard (train_on_batch), in
micro-batches whose weights reproduce the unsplit gradient exactly. The loss is the estimator of estimators.py on
the student's log-probs, computed inside StudentForLoss so FSDP unshards the output layer for it.
"""
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import time

import torch

import estimators
import teacher_cache
from channels import acquire, beat, sync_devices
from schedule import staleness_bound, to_device


class StudentForLoss(torch.nn.Module):
    """Backbone + chunked log-prob gather inside one forward, so FSDP2 unshards the root
    parameters (embeddings, final norm, lm_head) for it and reduces their gradients."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, input_ids, attention_mask, rows, ids):
        # use_cache=False: no KV cache to fill (a checkpointed layer's recompute would append to it a second time)
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        out = estimators.student_logp(hidden, self.model.get_output_embeddings().weight, ids,
                                      self.cfg.temperature, self.cfg.loss.chunk_size)
        return {k: v.clone() for k, v in out.items()}  # FSDP2 hooks want outputs that are not views


def student_logps(student, cache, cfg, pad_id, device):
    input_ids, attention_mask, rows = teacher_cache.pad_batch(cache, pad_token_id=pad_id)
    ids = estimators.student_ids(cache, cfg.loss) | {"token_ids": cache["token_ids"]}  # token_ids: the logged KL
    ids = to_device(ids, device)
    return student(input_ids.to(device), attention_mask.to(device), rows.to(device), ids)


def build_learner(cfg, rank, world, start_dir, dtype=torch.float32):
    """FSDP2 student + AdamW on this rank; dtype = master weights (float32; tests use float64)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM
    device = torch.device(cfg.learner_devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = AutoModelForCausalLM.from_pretrained(start_dir, dtype=dtype).to(device)
    student = StudentForLoss(model, cfg)
    mesh = init_device_mesh(device.type, (world,))
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.mixed_precision \
        else MixedPrecisionPolicy()
    if cfg.activation_checkpointing:  # before fully_shard, so FSDP's all-gather hooks sit outside the recomputed region
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
        for i, layer in enumerate(model.model.layers):  # state-dict hooks strip "_checkpoint_wrapped_module." again
            model.model.layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(student, mesh=mesh, mp_policy=mp_policy)
    return student, make_optimizer(cfg, student), device


def make_optimizer(cfg, student):
    return torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def copy_weights(student):
    """A copy of a plain (not sharded) StudentForLoss's weights, HF names: what a publish would send."""
    return {k: v.detach().clone() for k, v in student.model.state_dict().items()}


def full_state_dict(student):
    """All ranks must call (it all-gathers); rank 0 gets CPU tensors with HF key names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def plan_batch(cfg, cache, step, world):
    """Rank 0 splits one batch into a shard per learner rank; returns [shard for rank 0, 1, ...].

    Mini-batch i holds sequences i, i+m, ...; rank r trains every world-th of them, in micro-batches of at most
    micro_batch_tokens padded prompt+response tokens (teacher_cache.split_by_tokens; a sequence longer than the
    budget runs alone, over it). FSDP's collectives need the same number of forward/backward passes on every
    rank: a rank with fewer micro-batches repeats its last sequence with weight 0. Each shard carries only its
    rank's sequences plus the few numbers every rank needs:
      cache   the rank's sequences, micro-batch after micro-batch
      plan    per mini-batch, [(first, end, live)]: one pass over sequences first..end-1 of cache (live=False: weight 0)
      denom   per mini-batch, the loss's denominator over ALL ranks: unmasked tokens (token_mean) or sequences
              with an unmasked token (seq_mean), so per-pass weights give exactly the unsplit gradient
      count   per mini-batch, each pass's own part of denom (0 for a filler): its weight is count / denom
      stats   batch-wide staleness and token counts (rank 0 logs them)
    Raises before anything is sent if a token is over the staleness bound."""
    m, bound, agg = cfg.mini_batches, staleness_bound(cfg), cfg.loss.aggregation
    n_seq = len(cache["cu_seqlens"]) - 1
    seq_of_row = torch.repeat_interleave(torch.arange(n_seq), cache["cu_seqlens"].diff())
    stale = m * step + seq_of_row % m - cache["policy_version"]  # row of mini-batch i is trained at version m*step + i
    if int(stale.min()) < 0 or int(stale.max()) > bound:
        raise RuntimeError(f"staleness bound violated at step {step}: token staleness in "
                           f"[{int(stale.min())}, {int(stale.max())}] but schedule {cfg.schedule} allows [0, {bound}]")
    tokens = torch.zeros(n_seq, dtype=torch.int64).index_add_(0, seq_of_row, cache["loss_mask"].long())  # per sequence
    count = (tokens if agg == "token_mean" else (tokens > 0).long()).tolist()
    orders, plans, denom = [[] for _ in range(world)], [[] for _ in range(world)], []
    for i in range(m):
        mini = list(range(i, n_seq, m))
        denom.append(sum(count[j] for j in mini))
        groups = [teacher_cache.split_by_tokens(cache, cfg.micro_batch_tokens, mini[r::world]) for r in range(world)]
        passes = max(len(g) for g in groups)
        for r, g in enumerate(groups):
            plan = []
            for seqs in g:
                plan.append((len(orders[r]), len(orders[r]) + len(seqs), True))
                orders[r] += seqs
            plan += [(len(orders[r]) - 1, len(orders[r]), False)] * (passes - len(g))  # zero-weight filler passes
            plans[r].append(plan)
    stale = stale.float()
    stats = dict(stale_min=float(stale.min()), stale_mean=float(stale.mean()), stale_max=float(stale.max()),
                 stale_hist=torch.bincount(stale.long()).tolist(), tokens=int(cache["loss_mask"].sum()))
    return [{"cache": teacher_cache.select_sequences(cache, orders[r]), "plan": plans[r], "denom": denom,
             "count": [[sum(count[j] for j in orders[r][a:b]) if live else 0 for a, b, live in p] for p in plans[r]],
             "stats": stats} for r in range(world)]


def train_on_batch(cfg, student, opt, batch, step, rank, world, device, pad_id):
    """One optimizer step per mini-batch on this rank's shard (plan_batch; a whole batch is split here);
    returns the step's metrics. Gradients accumulate over a mini-batch's micro-batches; every rank runs the
    same passes, as FSDP's collectives require."""
    shard = batch if "plan" in batch else plan_batch(cfg, batch, step, world)[rank]
    cache, m = shard["cache"], len(shard["plan"])
    micro = lambda a, b: to_device(teacher_cache.select_sequences(cache, list(range(a, b))), device)  # noqa: E731
    if cfg.loss.decoupled:  # proximal policy = the student before the first optimizer step of the batch
        prox, proximal = {}, estimators.needs(cfg.loss).proximal  # {id field: proximal field}
        with torch.no_grad():
            for plan in shard["plan"]:
                for a, b, live in plan:
                    s = student_logps(student, micro(a, b), cfg, pad_id, device)
                    for k, v in s.items() if live else ():
                        if k in proximal:
                            out = prox.setdefault(k, torch.empty(cache[k].shape, dtype=torch.float32))
                            out[int(cache["cu_seqlens"][a]):int(cache["cu_seqlens"][b])] = v.float().cpu()
        cache = dict(cache, **{proximal[k]: v for k, v in prox.items()})
    stats = {"loss": 0.0, "rkl_token": 0.0, "grad_norm": 0.0, "tokens": shard["stats"]["tokens"]}
    for i, plan in enumerate(shard["plan"]):
        logged = torch.zeros(3, dtype=torch.float64, device=device)  # loss, sum of (s - t) at y, unmasked tokens
        sums, own = {}, max(1, sum(shard["count"][i]))
        for (a, b, live), count in zip(plan, shard["count"][i], strict=True):
            mb = micro(a, b)
            s = student_logps(student, mb, cfg, pad_id, device)
            per_token, metrics = estimators.ESTIMATORS[cfg.loss.name](s, mb, cfg.loss)
            local = estimators.aggregate(per_token, mb["loss_mask"], mb["cu_seqlens"], cfg.loss.aggregation)
            if not torch.isfinite(local):
                raise RuntimeError(f"non-finite loss {float(local.detach())} at step {step}, mini-batch {i}: "
                                   "lower lr or check the teacher cache")
            # this pass's share of the mini-batch's loss; FSDP averages gradients over ranks, hence * world
            weight = count / max(1, shard["denom"][i]) if live else 0.0
            (local * (weight * world)).backward()
            if not live:
                continue
            logged[0] += float(local.detach()) * weight
            if "teacher_logp" in mb:  # sampled reverse-KL estimate at the generated tokens, current student
                mask = mb["loss_mask"]
                logged[1] += float(((s["token_ids"].detach() - mb["teacher_logp"]) * mask).sum())
                logged[2] += float(mask.sum())
            for k, v in metrics.items():  # this rank's estimator metrics, weighted by its passes' shares
                sums[k] = sums.get(k, 0.0) + float(v) * count / own
        if world > 1:
            torch.distributed.all_reduce(logged)
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats["loss"] += float(logged[0]) / m
        stats["rkl_token"] += float(logged[1]) / max(1.0, float(logged[2])) / m
        stats["grad_norm"] += float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm) / m
        for k, v in sums.items():
            stats[k] = stats.get(k, 0.0) + v / m
    stats.update({k: v for k, v in shard["stats"].items() if k != "tokens"})
    return stats


def get_shard(ch, cfg, rank):
    """Ranks >= 1: their shard of the next batch from rank 0, or None (rank 0's stop marker). After a stop,
    rank 0's marker (or last shard) still comes, within a step, so that all ranks checkpoint together;
    none within dist_timeout_s means rank 0 is gone."""
    stopped = None
    while True:
        try:
            beat(ch)
            return ch.shard_qs[rank].get(timeout=0.1)
        except queue.Empty:
            if ch.stop.is_set():
                stopped = stopped or time.time()
                if time.time() - stopped > cfg.dist_timeout_s:
                    why = f"no batch or stop marker from rank 0 within dist_timeout_s={cfg.dist_timeout_s} s of a stop"
                    raise RuntimeError(f"learner rank {rank}: {why}: see rank 0's error") from None


def publish_weights(ch, student, weights, version, rank):
    """Copy the learner's weights into the rollout's buffer in its dtype, one parameter at a time, then announce
    `version`. Every rank calls (each parameter is all-gathered on the learner's device); rank 0, which holds the
    lock, copies straight from the gathered tensor (no host round trip for a buffer on its device)."""
    locked = rank == 0 and acquire(ch, ch.lock)  # False once stopping: still gather (ranks stay in step)
    try:
        first_name = {}  # tied weights (embedding = lm_head) are one parameter: gather it once, copy it twice
        for name, value in student.model.state_dict(keep_vars=True).items():
            seen = first_name.setdefault(id(value), name)
            if seen != name:  # the same decision on every rank: no collective is skipped on one rank only
                if locked:
                    weights[name].copy_(weights[seen])
                continue
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            if locked:
                weights[name].copy_(full.detach())
        if locked:
            sync_devices(*{w.device for w in weights.values()}, next(student.parameters()).device)
            ch.version.value = version
    finally:
        if locked:
            ch.lock.release()


def weight_buffer(start_dir, dtype, device="cpu"):
    """The buffer the learner publishes weights into (HF names, one tensor per state-dict entry): in host shared
    memory for weight_transport=shared, on the learner's device for handoff (shared with the rollout on a queue)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(start_dir)).state_dict()
    buffer = {k: torch.zeros(v.shape, dtype=dtype, device=device) for k, v in shapes.items()}
    return {k: v.share_memory_() for k, v in buffer.items()} if torch.device(device).type == "cpu" else buffer


def hold_until_released(ch, workers, grace_s=10.0):
    """The buffer's owner stays alive until every rollout worker dropped its handle (CUDA IPC needs the producer
    alive while consumers hold it); once the run is stopping, a crashed worker is not waited for past grace_s."""
    deadline = None
    while ch.released.value < workers:
        beat(ch)
        if ch.stop.is_set():
            deadline = deadline or time.time() + grace_s
            if time.time() > deadline:
                return
        time.sleep(0.01)


def save_checkpoint(cfg, student, opt, step, start_dir, run_dir, rank):
    """All ranks call (collectives); rank 0 writes run_dir/ckpt_NNNNN into a temp folder, with a manifest.json
    (sha256 of every file) written last, then renames it: a crash never leaves a folder that looks finished."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    sd = full_state_dict(student)
    osd = get_optimizer_state_dict(student, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    path = os.path.join(run_dir, f"ckpt_{step:05d}")
    if cfg.resume and os.path.realpath(path) == os.path.realpath(cfg.resume):  # stopped at once, resumed in place
        return path  # never rewrite the checkpoint the run started from (the rollout may be reading it)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(start_dir):  # config, tokenizer, generation config
        if os.path.isfile(os.path.join(start_dir, name)) and not name.endswith((".safetensors", ".pt")) \
                and name not in ("trainer_state.json", "manifest.json"):
            shutil.copy(os.path.join(start_dir, name), tmp)
    if student.model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, "model.safetensors"),
              metadata={"format": "pt"})
    torch.save({"optimizer": osd, "rng": torch.get_rng_state()}, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump({"step": step, "version": step * cfg.mini_batches, "config": dataclasses.asdict(cfg)}, f, indent=1)
    write_manifest(tmp)
    if os.path.isdir(path):  # a folder of an earlier run under this run_name: swap it out, then delete it
        os.replace(path, f"{tmp}.old")
    os.replace(tmp, path)
    shutil.rmtree(f"{tmp}.old", ignore_errors=True)
    _fsync(run_dir)  # the rename itself is durable
    return path


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder):
    """folder/manifest.json = sha256 of every file in it, after fsyncing each (the manifest is written last)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        if name != "manifest.json":
            _fsync(os.path.join(folder, name))
            files[name] = _sha256(os.path.join(folder, name))
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def check_checkpoint(cfg):
    """resume=DIR, before any process starts: every file matches the manifest, and trainer_state.json fits this
    config (version = step * mini_batches, the same unit numbering, steps beyond the checkpoint). One-line errors."""
    if not cfg.resume:
        return
    try:
        with open(os.path.join(cfg.resume, "manifest.json")) as f:
            files = dict(json.load(f)["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"resume={cfg.resume}: no readable manifest.json ({type(e).__name__}), so the checkpoint is "
                         "unfinished or damaged: resume from another ckpt_* folder") from None
    for name in sorted(set(files) | {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"}):
        path = os.path.join(cfg.resume, name)  # hashing reads every byte: a few seconds per GB
        problem = "missing" if not os.path.isfile(path) else "not in manifest.json" if name not in files \
            else "damaged (sha256 differs from manifest.json)" if _sha256(path) != files[name] else None
        if problem:
            raise ValueError(f"resume: {path} is {problem}: resume from another ckpt_* folder")
    with open(os.path.join(cfg.resume, "trainer_state.json")) as f:
        state = json.load(f)
    state = state if isinstance(state, dict) else {}
    step, version, saved = state.get("step"), state.get("version"), state.get("config")
    saved = saved if isinstance(saved, dict) else {}
    where = f"resume: {cfg.resume}/trainer_state.json"
    if not isinstance(step, int) or not isinstance(version, int) or step < 0:
        raise ValueError(f"{where} has step={step!r} version={version!r}: not a checkpoint of asyncopd")
    for key in ("schedule", "mini_batches", "batch_size", "rollout_batch_size"):  # they decide unit and version numbers
        if saved.get(key) != getattr(cfg, key):
            raise ValueError(f"resume: the checkpoint ran {key}={saved.get(key)!r}, this run {key}="
                             f"{getattr(cfg, key)!r}: resume with {key}={saved.get(key)!r}, or start a new run from it "
                             f"with student={cfg.resume}")
    if version != step * cfg.mini_batches:
        raise ValueError(f"{where} has version {version} but step {step} * mini_batches {cfg.mini_batches} = "
                         f"{step * cfg.mini_batches}: the file was edited; resume from another ckpt_* folder")
    if cfg.steps <= step:
        raise ValueError(f"resume: steps={cfg.steps} is not above the checkpoint's step {step}: raise steps")


def load_optimizer(student, opt, resume, rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    state = torch.load(os.path.join(resume, "optimizer.pt"), weights_only=False) if rank == 0 else {"optimizer": {}}
    set_optimizer_state_dict(student, opt, optim_state_dict=state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if rank == 0:
        torch.set_rng_state(state["rng"])
