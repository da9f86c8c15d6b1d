"""The learner at scale, on tiny float64 models in-process: activation checkpointing and token-budget
micro-batches give the plain gradient, rank shards travel only to their rank over queues, the stop marker
ends the other ranks, and the teacher's token-budget sub-batches give one forward's scores."""
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batch_format
import config
import estimators
import learner
import teacher_cache
from runtime import channels, checkpoint, coordinator

# (prompt, response) lengths; with mini_batches=2 mini-batch 0 is sequences 0, 2, 4, 6 and 1 is 1, 3, 5, 7
LENGTHS = [(3, 9), (5, 2), (2, 7), (6, 6), (4, 1), (2, 10), (3, 3), (5, 8)]
MASKED = {1: "all", 5: "some"}  # sequence 1 has no unmasked row (seq_mean skips it), 5 a few masked rows


def synthetic_batch(vocab, lengths=LENGTHS, samples=4, seed=0, masked=MASKED):
    """A scored batch for reverse_kl_mc with the fields the learner reads (no rollout or teacher needed)."""
    g = torch.Generator().manual_seed(seed)
    P, L = torch.tensor([p for p, _ in lengths]), torch.tensor([r for _, r in lengths])
    N = int(L.sum())
    logp = lambda *shape: -torch.rand(*shape, generator=g) * 4 - 0.05  # noqa: E731
    mc_ids = torch.randint(0, vocab, (N, samples), generator=g)
    cache = {"prompt_ids": torch.randint(2, vocab, (int(P.sum()),), generator=g),
             "prompt_cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int64), P.cumsum(0)]),
             "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int64), L.cumsum(0)]),
             "finished": torch.ones(len(lengths), dtype=torch.bool), "prompt_index": torch.arange(len(lengths)),
             "token_ids": mc_ids[:, 0].clone(), "behavior_logp": logp(N), "teacher_logp": logp(N),
             "policy_version": torch.zeros(N, dtype=torch.int64), "loss_mask": torch.ones(N, dtype=torch.bool),
             "mc_ids": mc_ids, "mc_behavior_logp": logp(N, samples), "mc_teacher_logp": logp(N, samples)}
    cu = cache["cu_seqlens"]
    for seq, how in masked.items():
        rows = slice(int(cu[seq]), int(cu[seq + 1])) if how == "all" else slice(int(cu[seq]) + 1, int(cu[seq]) + 3)
        cache["loss_mask"][rows] = False
    return cache


def make_cfg(student_dir, **kw):
    loss = estimators.LossOptions(name="reverse_kl_mc", samples=4, aggregation=kw.pop("aggregation", "token_mean"),
                                  chunk_size=kw.pop("chunk_size", 7))
    return config.Config(student=student_dir, batch_size=8, mini_batches=2, lr=1e-3, grad_clip=0.0, loss=loss,
                           schedule="sync", max_staleness=1, **kw)


def step_grads(ln, batch):
    """Full gradients of every mini-batch of one train_on_batch call, captured just before each opt.step."""
    grads, step = [], ln.opt.step

    def capture(*args, **kwargs):
        grads.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                      for p in ln.student.parameters()])
        return step(*args, **kwargs)

    ln.opt.step = capture
    try:
        stats = learner.train_on_batch(ln, batch, 0)
    finally:
        del ln.opt.step
    return grads, stats


def fresh_grads(cfg, batch):
    return step_grads(learner.build(cfg, cfg.student, dtype=torch.float64), batch)


def assert_same(a, b, atol, bitwise=False):
    assert len(a) == len(b) == 2  # one list per mini-batch
    for ga, gb in zip(a, b, strict=True):
        assert len(ga) == len(gb) and any(float(g.abs().max()) > 0 for g in ga)
        for x, y in zip(ga, gb, strict=True):
            if bitwise:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.fixture()
def group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{coordinator.free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def vocab(tiny_models):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(tiny_models[0]).vocab_size


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_checkpointing_and_micro_batches_give_the_plain_gradient(group, tiny_models, vocab, aggregation):
    batch = synthetic_batch(vocab)
    plain, plain_stats = fresh_grads(make_cfg(tiny_models[0], aggregation=aggregation), batch)
    ckpt, _ = fresh_grads(make_cfg(tiny_models[0], aggregation=aggregation, activation_checkpointing=True), batch)
    assert_same(ckpt, plain, 0, bitwise=True)  # the same float64 ops, recomputed
    for budget in (1, 13, 25):  # 1: every sequence alone (over the budget); 13, 25: several per micro-batch
        cfg = make_cfg(tiny_models[0], aggregation=aggregation, micro_batch_tokens=budget,
                       activation_checkpointing=budget == 13)
        passes = [len(p) for p in learner.plan_batch(cfg, batch, 0, 1)[0]["plan"]]
        assert min(passes) >= 2 and (budget != 1 or passes == [4, 4])
        grads, stats = fresh_grads(cfg, batch)
        assert_same(grads, plain, 1e-12)
        assert stats["loss"] == pytest.approx(plain_stats["loss"], abs=1e-12)
        assert stats["rkl_token"] == pytest.approx(plain_stats["rkl_token"], abs=1e-12)
    # the unweighted sum of micro-batch means is not the mean: the weights matter (this test can fail)
    cfg = make_cfg(tiny_models[0], aggregation=aggregation, micro_batch_tokens=13)
    shard = learner.plan_batch(cfg, batch, 0, 1)[0]
    shard["count"] = [[c + 1 for c in counts] for counts in shard["count"]]
    wrong, _ = step_grads(learner.build(cfg, cfg.student, dtype=torch.float64), shard)
    assert max(float((x - y).abs().max()) for x, y in zip(wrong[0], plain[0], strict=True)) > 1e-6


def test_filler_pass_adds_exactly_nothing(group, tiny_models, vocab):
    """A zero-weight pass (a rank with fewer micro-batches) leaves every gradient bit unchanged."""
    batch = synthetic_batch(vocab)
    cfg = make_cfg(tiny_models[0], micro_batch_tokens=13)
    shard = learner.plan_batch(cfg, batch, 0, 1)[0]
    padded = dict(shard, plan=[p + [(p[-1][1] - 1, p[-1][1], False)] * 2 for p in shard["plan"]],
                  count=[c + [0, 0] for c in shard["count"]])
    base, _ = fresh_grads(cfg, shard)
    grads, _ = fresh_grads(cfg, padded)
    assert_same(grads, base, 0, bitwise=True)


def test_plan_batch_shards_counts_and_fillers(vocab):
    """Every sequence goes to exactly one rank, in its mini-batch; the ranks' counts add up to the
    mini-batch's denominator; all ranks get the same number of passes, fillers have weight 0."""
    lengths = [(8, 8), (2, 2), (2, 2), (2, 2), (8, 8), (2, 1), (2, 2), (1, 1)]  # rank 0 of mini-batch 0: both long
    batch = synthetic_batch(vocab, lengths, masked={})
    cfg = config.Config(batch_size=8, mini_batches=2, micro_batch_tokens=20, schedule="sync", max_staleness=1)
    shards = learner.plan_batch(cfg, batch, 0, 2)
    seen = []
    for r, shard in enumerate(shards):
        index = shard["batch"]["prompt_index"].tolist()
        assert index == sorted(index, key=lambda i: (i % 2, -sum(lengths[i]), i))  # mini-batch 0 first, longest first
        # mini-batch i = i, i+2, ...; every 2nd to a rank
        assert set(index) == {i for i in range(8) if (i // 2) % 2 == r}
        seen += index
        assert int(shard["batch"]["cu_seqlens"][-1]) == sum(lengths[i][1] for i in index)  # only its rows
    assert sorted(seen) == list(range(8))
    for i in range(2):
        assert len(shards[0]["plan"][i]) == len(shards[1]["plan"][i])
        denom = sum(lengths[j][1] for j in range(i, 8, 2))
        assert sum(sum(s["count"][i]) for s in shards) == shards[0]["denom"][i] == denom
    assert [live for _, _, live in shards[0]["plan"][0]] == [True, True]  # 2 x 16 tokens > 20
    assert [live for _, _, live in shards[1]["plan"][0]] == [True, False]  # 2 x 4 tokens: one pass + a filler
    assert shards[1]["count"][0][1] == 0
    assert shards[0]["stats"]["truncated"] == 0.0  # every response ended with EOS
    cut = dict(batch, finished=torch.tensor([True, False, True, True, False, True, True, True]))
    assert learner.plan_batch(cfg, cut, 0, 2)[1]["stats"]["truncated"] == 0.25  # the whole batch's, on every rank
    bad = dict(batch, policy_version=batch["policy_version"] + 5)
    with pytest.raises(RuntimeError, match="staleness bound violated at step 0"):
        learner.plan_batch(cfg, bad, 0, 2)


def test_state_dict_names_stay_hf_with_checkpointing(group, tiny_models, tmp_path):
    """Weights and checkpoints leave the learner under the Hugging Face names, loadable as is."""
    from transformers import AutoModelForCausalLM
    cfg = make_cfg(tiny_models[0], activation_checkpointing=True)
    ln = learner.build(cfg, cfg.student)
    assert any("_checkpoint_wrapped_module" in n for n, _ in ln.student.named_parameters())  # really wrapped
    hf = AutoModelForCausalLM.from_pretrained(cfg.student).state_dict()
    sd = checkpoint.full_state_dict(ln.student)
    assert set(sd) == set(hf)
    assert all(torch.equal(sd[k], hf[k]) for k in hf)
    path = checkpoint.save(ln, 1, cfg.student, str(tmp_path))
    from safetensors.torch import load_file
    assert set(load_file(os.path.join(path, "model.safetensors"))) <= set(hf)
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    osd = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)["optimizer"]
    assert not [k for k in osd["state"] if "_checkpoint_wrapped_module" in k]
    checkpoint.load_optimizer(ln, path)  # and resumes into the wrapped model


def test_get_shard_stop_marker_and_timeout():
    """Ranks >= 1 take what rank 0 sent (even after a stop), end on the marker, and give up with a
    named error if after a stop nothing comes within dist_timeout_s."""
    spawn = mp.get_context("spawn")
    ch = SimpleNamespace(stop=spawn.Event(), shard_qs=[None, spawn.Queue(2)])
    ch.shard_qs[1].put({"plan": "x"})
    ch.shard_qs[1].put(None)
    ch.stop.set()
    assert channels.get_shard(ch, 1, 1) == {"plan": "x"}
    assert channels.get_shard(ch, 1, 1) is None
    t0 = time.time()
    with pytest.raises(RuntimeError,
                       match="learner rank 1: no batch or stop marker from rank 0 within dist_timeout_s=1"):
        channels.get_shard(ch, 1, 1)
    assert time.time() - t0 < 5


def _rank(rank, port, cfg, batch, q, stop, out):
    """One of two gloo ranks: rank 0 plans and sends rank 1 its shard, both train, rank 0 sends the stop marker."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ln = learner.build(cfg, cfg.student, rank, 2, dtype=torch.float64)
        ch = SimpleNamespace(stop=stop, shard_qs=[None, q])
        if rank == 0:
            shards = learner.plan_batch(cfg, batch, 0, 2)
            q.put(shards[1])
            shard = shards[0]
        else:
            shard = channels.get_shard(ch, 1, cfg.dist_timeout_s)
        grads, stats = step_grads(ln, shard)
        if rank == 0:
            stop.set()  # as on Ctrl-C: rank 1 is polling, not in a collective, and ends on the marker
            q.put(None)
            ended = True
        else:
            ended = channels.get_shard(ch, 1, cfg.dist_timeout_s) is None
        torch.save({"grads": grads, "stats": stats, "index": shard["batch"]["prompt_index"].tolist(),
                    "plan": shard["plan"], "ended": ended}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("error", [EOFError(), ConnectionRefusedError(), ConnectionResetError()])
def test_get_treats_a_vanished_sender_as_the_stop_only_once_stopping(error):
    """Rebuilding a shared-memory tensor connects to its sender; one that exited on the stop fails that handshake
    (refused, reset, or closed mid-handshake: EOFError). While stopping, channels.get returns None; otherwise the
    error is raised."""

    class Vanished:
        def get(self, timeout):
            raise error

    stop = mp.get_context("spawn").Event()
    ch = SimpleNamespace(stop=stop, beats=None)
    with pytest.raises(type(error)):
        channels.get(ch, Vanished())

    class VanishedOnStop:
        def get(self, timeout):
            stop.set()
            raise error

    assert channels.get(ch, VanishedOnStop()) is None


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_world_size_2_micro_batches_match_world_size_1(group, tiny_models, vocab, tmp_path, aggregation):
    batch = synthetic_batch(vocab)
    plain, plain_stats = fresh_grads(make_cfg(tiny_models[0], aggregation=aggregation), batch)
    cfg = make_cfg(tiny_models[0], aggregation=aggregation, micro_batch_tokens=25, activation_checkpointing=True,
                   dist_timeout_s=60, learner_devices=["cpu", "cpu"])
    shards = learner.plan_batch(cfg, batch, 0, 2)
    assert shards[0]["plan"][1][-1][2] is False  # rank 0 runs a filler in mini-batch 1 (rank 1 needs 2 passes)
    assert all(len(p) >= 2 for p in shards[1]["plan"][1:])
    spawn = mp.get_context("spawn")
    q, stop = spawn.Queue(2), spawn.Event()
    mp.start_processes(_rank, args=(coordinator.free_port(), cfg, batch, q, stop, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r1["ended"]
    assert r1["index"] == shards[1]["batch"]["prompt_index"].tolist() and r1["plan"] == shards[1]["plan"]
    assert not set(r1["index"]) & set(r0["index"])  # rank 1 never saw rank 0's sequences
    assert_same(r0["grads"], plain, 1e-12)
    assert_same(r1["grads"], plain, 1e-12)
    assert r0["stats"]["loss"] == pytest.approx(plain_stats["loss"], abs=1e-12)
    assert r0["stats"]["rkl_token"] == pytest.approx(plain_stats["rkl_token"], abs=1e-12)


def test_teacher_sub_batches_equal_one_forward(tiny_models):
    from transformers import AutoModelForCausalLM
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models[1], dtype=torch.float32).eval()
    traj = synthetic_batch(teacher.config.vocab_size)
    traj = {k: v for k, v in traj.items() if not k.startswith("mc_") or k == "mc_ids"}
    fields = {"teacher_logp", "teacher_topk_ids", "teacher_topk_logp", "mc_teacher_logp", "teacher_mc_ids",
              "teacher_mc_logp"}
    run = lambda budget: teacher_cache.score(teacher, traj, fields, 4, 3, generator=torch.Generator().manual_seed(3),  # noqa: E731
                                             chunk_size=5, batch_tokens=budget)
    one = run(0)
    for budget in (1, 13, 25):
        assert len(batch_format.split_by_tokens(traj, budget)) > 1
        sub = run(budget)
        assert set(sub) == set(one)
        for k in one:
            if k.endswith("_ids"):
                assert torch.equal(sub[k], one[k]), k
            else:
                torch.testing.assert_close(sub[k], one[k], atol=1e-6, rtol=0)


def test_split_by_tokens(vocab):
    batch = synthetic_batch(vocab, [(2, 3), (1, 1), (4, 6), (2, 2)], masked={})  # lengths 5, 2, 10, 4
    assert batch_format.split_by_tokens(batch, 0) == [[0, 1, 2, 3]]
    assert batch_format.split_by_tokens(batch, 9) == [[2], [0], [3, 1]]  # 10 alone (over budget), 2x5 > 9, 2x4 <= 9
    assert batch_format.split_by_tokens(batch, 20) == [[2, 0], [3, 1]]
    assert batch_format.split_by_tokens(batch, 100, [3, 1]) == [[3, 1]]


def test_bad_budgets_are_refused(tiny_models, tmp_path):
    from test_pipeline import bad
    assert "micro_batch_tokens=-1 is negative" in bad(tiny_models, tmp_path, micro_batch_tokens=-1)
    assert "teacher_batch_tokens=-5 is negative" in bad(tiny_models, tmp_path, teacher_batch_tokens=-5)
    assert "dist_timeout_s=0" in bad(tiny_models, tmp_path, dist_timeout_s=0)
    assert "gpu_memory_utilization=1.5" in bad(tiny_models, tmp_path, gpu_memory_utilization=1.5)
