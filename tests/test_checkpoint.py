"""Durable checkpoints, in-process: written to a temp folder and renamed, a manifest (sha256 of every file) checked
on resume before any process starts, trainer_state.json checked against the resumed config."""
import dataclasses
import json
import os
import queue
import shutil
import threading
from types import SimpleNamespace

import pytest
import torch

import asyncopd
import config
import estimators
import learner
import rollout
from optional import offline
from runtime import checkpoint, coordinator, filesystem, preflight
from test_pipeline import scored_batch


@pytest.fixture()
def fsdp_student(tiny_models):
    """An in-process FSDP2 learner (gloo, world size 1) on the tiny student."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{coordinator.free_port()}", rank=0, world_size=1)
    cfg = config.Config(student=tiny_models[0], teacher=tiny_models[1], batch_size=4, rollout_batch_size=4, lr=0.01,
                        max_new_tokens=6, schedule="sync",
                        loss=estimators.LossOptions(name="reverse_kl_mc", samples=4))
    yield cfg, learner.build(cfg, cfg.student)
    dist.destroy_process_group()


def save(cfg, ln, step, run_dir):
    return checkpoint.save(dataclasses.replace(ln, cfg=cfg), step, cfg.student, str(run_dir))


def refused(cfg, **kw):
    with pytest.raises(ValueError) as e:
        checkpoint.check_resume(dataclasses.replace(cfg, **kw))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_checkpoint_is_renamed_into_place_and_damage_is_refused(fsdp_student, tmp_path, monkeypatch):
    cfg, ln = fsdp_student
    path = save(cfg, ln, 2, tmp_path)
    assert os.listdir(tmp_path) == ["ckpt_00002"]  # no temp folder left
    files = json.load(open(os.path.join(path, "manifest.json")))["files"]
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "config.json"} <= set(files)
    checkpoint.check_resume(dataclasses.replace(cfg, resume=path, steps=4))  # intact: accepted
    inode = os.stat(os.path.join(path, "model.safetensors")).st_ino
    # resumed into the same folder, stopped at once
    save(dataclasses.replace(cfg, resume=path), ln, 2, tmp_path)
    assert os.stat(os.path.join(path, "model.safetensors")).st_ino == inode  # the start checkpoint was not rewritten
    save(cfg, ln, 2, tmp_path)  # another run under this run_name: replaced whole, by a rename
    assert os.stat(os.path.join(path, "model.safetensors")).st_ino != inode and os.listdir(tmp_path) == ["ckpt_00002"]

    def crash(*a, **k):
        raise RuntimeError("unexpected pos 576 vs 534")  # what torch.save says when the disk fills up
    with monkeypatch.context() as m:  # a save cut short is removed: no folder of step 4 at all
        m.setattr(torch, "save", crash)
        with pytest.raises(RuntimeError, match="unexpected pos"):
            save(cfg, ln, 4, tmp_path)
        assert os.listdir(tmp_path) == ["ckpt_00002"]
        free = shutil.disk_usage(tmp_path).free
        usage = iter([free, 1000])  # room before the write, none after it: the cause is named
        m.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=next(usage, 1000), total=free))
        with pytest.raises(filesystem.DiskFull, match=r"no space left on .* to write .*ckpt_00004") as e:
            save(cfg, ln, 4, tmp_path)
        assert isinstance(e.value.__cause__, RuntimeError) and os.listdir(tmp_path) == ["ckpt_00002"]
        m.setattr(checkpoint.shutil, "disk_usage", lambda p: SimpleNamespace(free=1000, total=free))
        m.setattr(torch, "save", lambda *a, **k: pytest.fail("a save that cannot fit must not start"))
        with pytest.raises(filesystem.DiskFull, match=r"1000 B free of .*, 1.1 MiB needed"):
            save(cfg, ln, 4, tmp_path)
        assert os.listdir(tmp_path) == ["ckpt_00002"]
    unfinished = tmp_path / "ckpt_00004.tmp-1"  # a save killed mid-write (the coordinator removes these too)
    shutil.copytree(path, unfinished)
    os.remove(unfinished / "manifest.json")
    assert "no readable manifest.json" in refused(cfg, resume=str(unfinished), steps=8)
    shutil.rmtree(unfinished)

    def damaged(name, edit):
        bad = tmp_path / f"bad-{name}-{len(os.listdir(tmp_path))}"
        shutil.copytree(path, bad)
        edit(bad / name)
        return refused(cfg, resume=str(bad), steps=4)

    def flip(p):
        data = bytearray(p.read_bytes())
        data[-3] ^= 0x10  # a byte inside the last weight tensor
        p.write_bytes(bytes(data))
    assert "/model.safetensors is damaged (sha256" in damaged("model.safetensors", flip)
    assert "optimizer.pt is damaged" in damaged("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:100]))
    assert "config.json is missing" in damaged("config.json", os.remove)
    assert "no readable manifest.json" in damaged("manifest.json", os.remove)
    assert "config.json is not in manifest.json" in damaged("manifest.json", lambda p: p.write_text('{"files": {}}'))


def test_resume_state_must_fit_the_config(fsdp_student, tmp_path):
    """Another mini_batches or schedule, an edited version, or steps not beyond the checkpoint: refused in one line
    (each of these used to deadlock or run silently)."""
    cfg, ln = fsdp_student
    path = save(cfg, ln, 2, tmp_path)
    ok = dataclasses.replace(cfg, resume=path, steps=4)
    checkpoint.check_resume(ok)
    assert "differs from the checkpoint's in mini_batches 1 -> 2: drop" in refused(ok, mini_batches=2)
    assert "schedule 'sync' -> 'async'" in refused(ok, schedule="async")
    assert "rollout_batch_size 4 -> 2" in refused(ok, rollout_batch_size=2)
    assert "steps=2 is not above the checkpoint's step 2: raise steps" in refused(ok, steps=2)
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    json.dump(dict(state, version=0), open(os.path.join(path, "trainer_state.json"), "w"))
    assert "trainer_state.json is damaged" in refused(ok)  # the manifest sees the edit first
    checkpoint.write_manifest(path)  # an edit that also rewrote the manifest
    assert "has version 0 but step 2 * mini_batches 1 = 2" in refused(ok)


def changed(value):
    """Another value of the same type (a list one entry longer: learner_devices, one more rank)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return value + "x" if isinstance(value, str) else value + value[:1]


def with_key(cfg, key, value):
    if key.startswith("loss."):
        return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **{key[5:]: value}))
    return dataclasses.replace(cfg, **{key: value})


def test_resume_never_changes_the_run_silently(fsdp_student, tmp_path, tiny_models):
    """Every key outside MAY_CHANGE defines the run: resuming with another value is refused in one line naming
    old -> new (all of them) and both ways out; every MAY_CHANGE key may change. The teacher is compared by its
    files, the learner by its world size; an older checkpoint's missing keys compare as their defaults."""
    cfg, ln = fsdp_student
    path = save(cfg, ln, 2, tmp_path)
    ok = dataclasses.replace(cfg, resume=path, steps=4)
    checkpoint.check_resume(ok)
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    assert state["teacher_fingerprint"] == offline.fingerprint(cfg.teacher)
    keys = [f.name for f in dataclasses.fields(config.Config) if f.name != "loss"]
    keys += [f"loss.{f.name}" for f in dataclasses.fields(estimators.LossOptions)]
    assert checkpoint.MAY_CHANGE < set(keys)  # no stale name in it
    for key in keys:
        old = getattr(cfg.loss, key[5:]) if key.startswith("loss.") else getattr(ok, key)
        if key in checkpoint.MAY_CHANGE:
            if key != "resume":
                checkpoint.check_resume(with_key(ok, key, changed(old)))
        elif key != "teacher":  # compared by fingerprint, below
            message = refused(with_key(ok, key, changed(old)))
            label = "learner ranks 1 -> 2" if key == "learner_devices" else f"{key} {old!r} -> {changed(old)!r}"
            assert label in message and f"start a new run from the checkpoint with student={path}" in message, key
    assert checkpoint.check_resume(dataclasses.replace(ok, learner_devices=["cuda:0"])) is None  # moved, 1 rank
    message = refused(ok, lr=0.5, loss=dataclasses.replace(cfg.loss, name="jsd"), student=cfg.teacher)
    assert "lr 0.01 -> 0.5" in message and "loss.name 'reverse_kl_mc' -> 'jsd'" in message, message
    assert f"student {cfg.student!r} -> {cfg.teacher!r}" in message and "drop those keys" in message
    # the teacher: the same files elsewhere are the same teacher; other weights are not
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    shutil.copytree(cfg.teacher, same)
    shutil.copytree(tiny_models[0], other)  # the student's weights: another model
    checkpoint.check_resume(dataclasses.replace(ok, teacher=same))
    assert f"teacher (fingerprint) {offline.fingerprint(cfg.teacher)!r} -> {offline.fingerprint(other)!r}" in \
        refused(ok, teacher=other)
    # an older checkpoint: no teacher fingerprint (the path compares), no lr (its default, 1e-3, compares)
    old_state = dict(state, config={k: v for k, v in state["config"].items() if k != "lr"})
    del old_state["teacher_fingerprint"]
    json.dump(old_state, open(os.path.join(path, "trainer_state.json"), "w"))
    checkpoint.write_manifest(path)
    assert "lr 0.001 -> 0.01" in refused(ok)
    checkpoint.check_resume(dataclasses.replace(ok, lr=1e-3))
    # steps sets the horizon of a decaying lr: it may change only under a constant one
    cosine = dataclasses.replace(cfg, lr_schedule="cosine", warmup_steps=2, steps=4)
    assert checkpoint.resume_diff(dataclasses.replace(cosine, steps=8), {"config": dataclasses.asdict(cosine)}) \
        == ["steps 4 -> 8"]
    assert checkpoint.resume_diff(dataclasses.replace(cfg, steps=8), {"config": dataclasses.asdict(cfg)}) == []
    # before student_template and teacher_template, one chat_template switch rendered both models' prompts
    older = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.endswith("_template")}
    assert checkpoint.resume_diff(cfg, {"config": dict(older, chat_template=True)}) == [
        "student_template 'chat' -> 'raw'", "teacher_template 'chat' -> 'raw'"]
    assert checkpoint.resume_diff(cfg, {"config": dict(older, chat_template=False)}) == []
    assert f"teacher {cfg.teacher!r} -> {same!r}" in refused(ok, lr=1e-3, teacher=same)


def test_validate_checks_the_checkpoint_before_start(fsdp_student, tmp_path):
    cfg, ln = fsdp_student
    path = save(cfg, ln, 2, tmp_path)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="model.safetensors is damaged"):
        preflight.check_inputs(dataclasses.replace(cfg, resume=path, steps=4, eval_size=0))


def test_final_save_at_a_saved_step_keeps_that_checkpoint(fsdp_student, tmp_path, monkeypatch):
    """A stop right after the periodic save at step 2: the learner does not write ckpt_00002 a second time."""
    cfg, ln = fsdp_student
    cfg = dataclasses.replace(cfg, schedule="offline", steps=4, save_every=2)
    engine = rollout.make_engine(cfg.student, eos_token_id=1, pad_token_id=0, max_new_tokens=6)
    from transformers import AutoModelForCausalLM
    batch = scored_batch(cfg, engine, AutoModelForCausalLM.from_pretrained(cfg.teacher), 0)
    ch = SimpleNamespace(stop=threading.Event(), metrics_q=queue.Queue(), weights=None, roles=[])
    monkeypatch.setattr(offline, "offline_batches", lambda cfg, start: (({"unit": u}, batch) for u in range(start, 4)))
    calls, real = [], checkpoint.save

    def save_then_stop(ln, step, *args):
        calls.append(step)
        path = real(ln, step, *args)
        ch.stop.set()  # e.g. SIGINT, or a failed role
        return path
    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    run = asyncopd.Run(cfg, str(tmp_path), cfg.student, 0, 0, None, [], [])
    asyncopd.learn(ch, run, dataclasses.replace(ln, cfg=cfg))
    assert calls == [2] and os.listdir(tmp_path) == ["ckpt_00002"]
    items = [ch.metrics_q.get() for _ in range(ch.metrics_q.qsize())]
    assert ("checkpoint", {"path": str(tmp_path / "ckpt_00002"), "step": 2}) in items
