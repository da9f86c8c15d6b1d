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
from runtime import checkpoint, coordinator, preflight
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
        raise OSError("disk full")
    with monkeypatch.context() as m:  # a save cut short leaves only a temp folder, with no manifest
        m.setattr(torch, "save", crash)
        with pytest.raises(OSError):
            save(cfg, ln, 4, tmp_path)
    tmp = [d for d in os.listdir(tmp_path) if d != "ckpt_00002"]
    assert len(tmp) == 1 and tmp[0].startswith("ckpt_00004.tmp-") and not os.path.exists(tmp_path / "ckpt_00004")
    assert "no readable manifest.json" in refused(cfg, resume=str(tmp_path / tmp[0]), steps=8)

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
    assert "ran mini_batches=1, this run mini_batches=2: resume with mini_batches=1" in refused(ok, mini_batches=2)
    assert "ran schedule='sync', this run schedule='async'" in refused(ok, schedule="async")
    assert "ran rollout_batch_size=4, this run rollout_batch_size=2" in refused(ok, rollout_batch_size=2)
    assert "steps=2 is not above the checkpoint's step 2: raise steps" in refused(ok, steps=2)
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    json.dump(dict(state, version=0), open(os.path.join(path, "trainer_state.json"), "w"))
    assert "trainer_state.json is damaged" in refused(ok)  # the manifest sees the edit first
    checkpoint.write_manifest(path)  # an edit that also rewrote the manifest
    assert "has version 0 but step 2 * mini_batches 1 = 2" in refused(ok)


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
