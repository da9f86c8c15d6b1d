"""The learner: the current student under FSDP2 (`fully_shard`), the training step, and weight publishing.

One training step on a (mini-)batch is the same three calls in opd_reference (asyncopd.py) and in train_on_batch:
    s = current_logprobs(ln, batch)                    the current student's log-probs at the estimator's ids
    loss, metrics = estimators.compute_loss(s, batch, cfg.loss);  loss.backward()
    optimizer_step(ln)                                 clip the gradient norm, AdamW, zero the gradients
preceded, for decoupled PPO only, by proximal_logprobs (the student before the batch's first step).

Rank 0 receives whole batches and splits them (plan_batch); every rank trains its shard (train_on_batch), in
micro-batches whose weights reproduce the unsplit gradient exactly. The loss is computed inside StudentForLoss, so FSDP
unshards the output layer for it. Checkpoints are in runtime/checkpoint.py.
"""
from dataclasses import dataclass

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, get_wsd_schedule

import estimators
from batch_format import Batch, pad_batch, select_sequences, split_by_tokens, to_device
from config import Config, training_dtype
from schedule import staleness_bound


class StudentForLoss(torch.nn.Module):
    """Backbone + chunked log-prob gather inside one forward, so FSDP2 unshards the root
    parameters (embeddings, final norm, lm_head) for it and reduces their gradients."""

    def __init__(self, model: PreTrainedModel, cfg: Config):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                ids: dict) -> dict[str, torch.Tensor]:
        # use_cache=False: no KV cache to fill (a checkpointed layer's recompute would append to it a second time)
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
        out = estimators.gather_logprobs(hidden, self.model.get_output_embeddings().weight, ids,
                                         self.cfg.temperature, self.cfg.loss.chunk_size)
        return {k: v.clone() for k, v in out.items()}  # FSDP2 hooks want outputs that are not views


@dataclass
class Learner:
    """One learner rank: the student, its AdamW optimizer, where it runs and its place among the ranks."""
    cfg: Config
    student: StudentForLoss
    opt: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler  # steps with opt; its state is checkpointed with it
    device: torch.device
    rank: int = 0
    world: int = 1


def build(cfg: Config, start_dir: str, rank: int = 0, world: int = 1, *, dtype: torch.dtype = torch.float32,
          sharded: bool = True) -> Learner:
    """The student from start_dir and its AdamW, on this rank's device; dtype = master weights (float32; tests use
    float64). sharded=False: a plain module, no process group (opd_reference, the lab)."""
    device = torch.device(cfg.learner_devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = AutoModelForCausalLM.from_pretrained(start_dir, dtype=dtype).to(device)
    student = StudentForLoss(model, cfg)
    if sharded:
        mesh = init_device_mesh(device.type, (world,))
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.mixed_precision else MixedPrecisionPolicy()
        if cfg.activation_checkpointing:  # before fully_shard: FSDP's all-gather hooks stay outside the recompute
            for i, layer in enumerate(model.model.layers):  # state-dict hooks strip "_checkpoint_wrapped_module."
                model.model.layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        fully_shard(student, mesh=mesh, mp_policy=mp_policy)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    total, warmup = cfg.steps * cfg.mini_batches, cfg.warmup_steps  # in optimizer steps (policy versions)
    decay = 0 if cfg.lr_schedule == "constant" else total - warmup
    schedule = get_wsd_schedule(opt, warmup, decay, num_stable_steps=total - warmup - decay, min_lr_ratio=cfg.min_lr
                                / cfg.lr, decay_type="linear" if cfg.lr_schedule == "linear" else "cosine")
    return Learner(cfg, student, opt, schedule, device, rank, world)


# ----------------------------------------------------------------------------- the training step
def current_logprobs(ln: Learner, batch: Batch) -> dict[str, torch.Tensor]:
    """s: the current student's log-probs (with grad) at the ids the estimator reads, plus at the generated tokens
    ("token_ids": the logged reverse-KL estimate)."""
    input_ids, attention_mask, rows = pad_batch(batch)
    ids = estimators.student_ids(batch, ln.cfg.loss) | {"token_ids": batch["token_ids"]}
    return ln.student(input_ids.to(ln.device), attention_mask.to(ln.device), rows.to(ln.device),
                      to_device(ids, ln.device))


@torch.no_grad()
def proximal_logprobs(ln: Learner, batch: Batch) -> Batch:
    """Decoupled PPO's proximal policy, computed before the batch's first optimizer step: {proximal field: the
    student's log-probs at its id field} ({} unless loss.decoupled)."""
    proximal = estimators.needs(ln.cfg.loss).proximal  # {id field: proximal field}
    if not proximal:
        return {}
    s = current_logprobs(ln, batch)
    return {prox: s[ids].float() for ids, prox in proximal.items()}


def optimizer_step(ln: Learner) -> float:
    """Clip the gradient norm (grad_clip; 0 = off), one AdamW step, zero the gradients. Returns the norm before
    clipping."""
    norm = torch.nn.utils.clip_grad_norm_(ln.student.parameters(), ln.cfg.grad_clip or float("inf"))
    ln.opt.step()
    ln.lr_schedule.step()
    ln.opt.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def copy_weights(ln: Learner) -> dict[str, torch.Tensor]:
    """A copy of a plain (not sharded) student's weights, HF names: what a publish would send."""
    return {k: v.detach().clone() for k, v in ln.student.model.state_dict().items()}


# ----------------------------------------------------------------------------- batches over ranks and micro-batches
def plan_batch(cfg: Config, batch: Batch, step: int, world: int) -> list[dict]:
    """Rank 0 splits one batch into a shard per learner rank; returns [shard for rank 0, 1, ...].

    Mini-batch i holds sequences i, i+m, ...; rank r trains every world-th of them, in micro-batches of at most
    micro_batch_tokens padded prompt+response tokens (batch_format.split_by_tokens; a sequence longer than the
    budget runs alone, over it). FSDP's collectives need the same number of forward/backward passes on every
    rank: a rank with fewer micro-batches repeats its last sequence with weight 0. Each shard carries only its
    rank's sequences plus the few numbers every rank needs:
      batch   the rank's sequences, micro-batch after micro-batch
      plan    per mini-batch, [(first, end, live)]: one pass over sequences first..end-1 of batch (live=False: weight 0)
      denom   per mini-batch, the loss's denominator over ALL ranks: unmasked tokens (token_mean) or sequences
              with an unmasked token (seq_mean), so per-pass weights give exactly the unsplit gradient
      count   per mini-batch, each pass's own part of denom (0 for a filler): its weight is count / denom
      stats   batch-wide staleness and token counts (rank 0 logs them)
    Raises before anything is sent if a token is over the staleness bound."""
    m, bound, agg = cfg.mini_batches, staleness_bound(cfg), cfg.loss.aggregation
    n_seq = len(batch["cu_seqlens"]) - 1
    seq_of_row = torch.repeat_interleave(torch.arange(n_seq), batch["cu_seqlens"].diff())
    stale = m * step + seq_of_row % m - batch["policy_version"]  # row of mini-batch i is trained at version m*step + i
    if int(stale.min()) < 0 or int(stale.max()) > bound:
        raise RuntimeError(f"staleness bound violated at step {step}: token staleness in "
                           f"[{int(stale.min())}, {int(stale.max())}] but schedule {cfg.schedule} allows [0, {bound}]")
    tokens = torch.zeros(n_seq, dtype=torch.int64).index_add_(0, seq_of_row, batch["loss_mask"].long())  # per sequence
    count = (tokens if agg == "token_mean" else (tokens > 0).long()).tolist()
    orders, plans, denom = [[] for _ in range(world)], [[] for _ in range(world)], []
    for i in range(m):
        mini = list(range(i, n_seq, m))
        denom.append(sum(count[j] for j in mini))
        groups = [split_by_tokens(batch, cfg.micro_batch_tokens, mini[r::world]) for r in range(world)]
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
                 stale_hist=torch.bincount(stale.long()).tolist(), tokens=int(batch["loss_mask"].sum()),
                 truncated=float((~batch["finished"]).float().mean()))  # responses cut at max_new_tokens, no EOS
    return [{"batch": select_sequences(batch, orders[r]), "plan": plans[r], "denom": denom,
             "count": [[sum(count[j] for j in orders[r][a:b]) if live else 0 for a, b, live in p] for p in plans[r]],
             "stats": stats} for r in range(world)]


def train_on_batch(ln: Learner, batch: Batch | dict, step: int) -> dict:
    """One optimizer step per mini-batch on this rank's shard (plan_batch's; a whole batch is split here); returns
    the step's metrics. Gradients accumulate over a mini-batch's micro-batches; every rank runs the same passes, as
    FSDP's collectives require."""
    cfg = ln.cfg
    shard = batch if "plan" in batch else plan_batch(cfg, batch, step, ln.world)[ln.rank]
    data, m = shard["batch"], len(shard["plan"])
    micro = lambda a, b: to_device(select_sequences(data, list(range(a, b))), ln.device)  # noqa: E731
    if cfg.loss.decoupled:  # the student before the batch's first step, every pass (FSDP: every rank runs them all)
        prox, cu = {}, data["cu_seqlens"]
        for a, b, live in (p for plan in shard["plan"] for p in plan):
            for k, v in proximal_logprobs(ln, micro(a, b)).items():
                if live:
                    out = prox.setdefault(k, torch.empty((int(cu[-1]), *v.shape[1:]), dtype=torch.float32))
                    out[int(cu[a]):int(cu[b])] = v.cpu()
        data = dict(data, **prox)
    stats = {"loss": 0.0, "rkl_token": 0.0, "grad_norm": 0.0, "tokens": shard["stats"]["tokens"],
             "lr": ln.opt.param_groups[0]["lr"]}  # (the first mini-batch's)
    for i, plan in enumerate(shard["plan"]):
        # sums over the mini-batch's unmasked tokens: loss; (s - t) at y; count; |s - b| at y; count; (s - b) over
        # the MC columns; count. And max |s - b| at y.
        logged = torch.zeros(7, dtype=torch.float64, device=ln.device)
        gap_max = torch.zeros(1, dtype=torch.float64, device=ln.device)
        sums, own = {}, max(1, sum(shard["count"][i]))
        for (a, b, live), count in zip(plan, shard["count"][i], strict=True):
            mb = micro(a, b)
            s = current_logprobs(ln, mb)
            local, metrics = estimators.compute_loss(s, mb, cfg.loss)
            if not torch.isfinite(local):
                raise RuntimeError(f"non-finite loss {float(local.detach())} at step {step}, mini-batch {i}: "
                                   "lower lr or check the teacher cache")
            # this pass's share of the mini-batch's loss; FSDP averages gradients over ranks, hence * world
            weight = count / max(1, shard["denom"][i]) if live else 0.0
            (local * (weight * ln.world)).backward()
            if not live:
                continue
            logged[0] += float(local.detach()) * weight
            mask = mb["loss_mask"].bool()
            if "teacher_logp" in mb:  # sampled reverse-KL estimate at the generated tokens, current student
                logged[1] += float((s["token_ids"].detach() - mb["teacher_logp"])[mask].sum())
                logged[2] += float(mask.sum())
            gap_sums, largest = behaviour_gap(s, mb, mask)
            logged[3:] += gap_sums
            gap_max[0] = max(float(gap_max[0]), largest)
            for k, v in metrics.items():  # this rank's estimator metrics, weighted by its passes' shares
                sums[k] = sums.get(k, 0.0) + float(v) * count / own
        if ln.world > 1:
            torch.distributed.all_reduce(logged)
            torch.distributed.all_reduce(gap_max, op=torch.distributed.ReduceOp.MAX)
        stats["grad_norm"] += optimizer_step(ln) / m
        stats["loss"] += float(logged[0]) / m
        stats["rkl_token"] += float(logged[1]) / max(1.0, float(logged[2])) / m
        gap_mean = float(logged[3] / logged[4].clamp(min=1))
        stats["s_minus_b_abs_mean"] = stats.get("s_minus_b_abs_mean", 0.0) + gap_mean / m
        stats["s_minus_b_abs_max"] = max(stats.get("s_minus_b_abs_max", 0.0), float(gap_max[0]))
        if logged[6] > 0:
            stats["mc_s_minus_b_mean"] = stats.get("mc_s_minus_b_mean", 0.0) + float(logged[5] / logged[6]) / m
        for k, v in sums.items():
            stats[k] = stats.get(k, 0.0) + v / m
    stats.update({k: v for k, v in shard["stats"].items() if k != "tokens"})
    return stats


def behaviour_gap(s: dict, mb: Batch, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """s - b over the unmasked rows (s the current student's log-probs, b the rollout's): ([sum |s - b| at the
    generated tokens, their count, sum (s - b) over the MC columns, their count], max |s - b| at the generated
    tokens). While the learner holds the weights that generated the batch (sync, one mini-batch), s - b is rounding
    only; a reload that did not take, a temperature applied twice or draws from another distribution show here
    (tools/gpu_check.py asserts it at every step)."""
    gap = (s["token_ids"].detach().double() - mb["behavior_logp"].to(s["token_ids"].device).double())[mask]
    sums = [gap.abs().sum(), gap.new_tensor(float(gap.numel())), gap.new_zeros(()), gap.new_zeros(())]
    if "mc_ids" in s:
        mc = (s["mc_ids"].detach().double() - mb["mc_behavior_logp"].to(s["mc_ids"].device).double())[mask]
        sums[2:] = [mc.sum(), mc.new_tensor(float(mc.numel()))]
    return torch.stack(sums), float(gap.abs().max()) if gap.numel() else 0.0


# ----------------------------------------------------------------------------- weights to the rollout
def publish_weights(ln: Learner, weights: dict[str, torch.Tensor] | None) -> None:
    """Every rank calls (each parameter is all-gathered on the learner's device, one at a time); the rank that writes
    (rank 0, holding the buffer's lock) passes the rollout's buffer (in the training dtype) and gets the weights
    copied into it, straight from the gathered tensor. Others pass None. Each shard is cast to the training dtype
    before the gather; fp32 -> bf16 rounds each element alone, so casting before or after gives the same bits."""
    first_name = {}  # tied weights (embedding = lm_head) are one parameter: gather it once, copy it twice
    for name, value in ln.student.model.state_dict(keep_vars=True).items():
        seen = first_name.setdefault(id(value), name)
        if seen != name:  # the same decision on every rank: no collective is skipped on one rank only
            if weights is not None:
                weights[name].copy_(weights[seen])
            continue
        # cast the local shard before gathering: half the bytes and the peak of an fp32 gather in bf16 training
        value = value.detach().to(training_dtype(ln.cfg))
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if weights is not None:
            weights[name].copy_(full)


def weight_buffer(start_dir: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The buffer the learner publishes weights into (HF names, one tensor per state-dict entry): in host shared
    memory for weight_transport=shared, on the learner's device for handoff (shared with the rollout on a queue)."""
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(start_dir)).state_dict()
    buffer = {k: torch.zeros(v.shape, dtype=dtype, device=device) for k, v in shapes.items()}
    return {k: v.share_memory_() for k, v in buffer.items()} if torch.device(device).type == "cpu" else buffer
