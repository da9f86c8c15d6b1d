"""The GPU code paths, forced on CPU where CPU can show what goes wrong: the learner's weight buffer handed to
several rollout workers, its owner outliving the readers, publish order (copy, device sync, then the version),
the training dtype of published weights, the CUDA_VISIBLE_DEVICES a child writes, and one teacher dtype for
online scoring and offline precompute."""
import json
import os
import threading
from types import SimpleNamespace

import pytest
import torch

import asyncopd
import config
import estimators
import learner
import rollout
import teacher_cache
from runtime import channels, checkpoint, coordinator, preflight
from test_pipeline import records, train


def test_handoff_buffer_reaches_every_rollout_worker_and_outlives_them(tmp_path, tiny_models):
    """weight_transport=handoff is the CUDA IPC path (learner rank 0 owns the buffer and sends each worker a
    handle); on CPU the same code shares host memory. Two workers must both get a handle (one put feeds one get:
    a single put left worker 1 waiting forever), and the learner must hold the buffer until both released it."""
    out = train(tmp_path, tiny_models, "schedule=async", "max_staleness=2", "rollout_batch_size=2", "steps=4",
                "weight_transport=handoff", "rollout_devices=[cpu,cpu]", "eval_size=0", "run_name=h", timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    run = os.path.join(tmp_path, "h")
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]
    events = json.load(open(os.path.join(run, "trace.json")))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    spans = [(names[e["pid"]], e["name"], e["ts"], e["ts"] + e["dur"]) for e in events if e["ph"] == "X"]
    loads = [s for s in spans if s[1].startswith("load v")]
    assert {s[0] for s in loads} == {"rollout0", "rollout1"}  # both workers read the published weights
    assert {s[0] for s in loads if s[1] == "load v4"} == {"rollout0", "rollout1"}  # ... the final version too
    hold = [s for s in spans if s[0] == "learner" and s[1] == "hold weights until released"]
    assert len(hold) == 1 and all(s[3] <= hold[0][3] for s in loads)  # the owner outlived every read


def test_visible_device_maps_through_the_parents_restriction():
    assert coordinator.visible_device("cuda:1", None) == "1"
    assert coordinator.visible_device("cuda:1", "4,5,6,7") == "5"  # logical 1 of the parent is physical 5
    assert coordinator.visible_device("cuda", "3") == "3"
    assert coordinator.visible_device("cuda:0", "GPU-aa, GPU-bb") == "GPU-aa"
    with pytest.raises(ValueError, match="shows 2 GPUs"):
        coordinator.visible_device("cuda:2", "0,1")


class _Recorder:
    """A lock and a version counter that log the order of events (stand-ins for the multiprocessing ones)."""

    def __init__(self, log):
        self.log, self._value = log, 0

    def acquire(self, timeout=None):
        self.log.append("acquire")
        return True

    def release(self):
        self.log.append("release")

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        self.log.append(f"version {v}")
        self._value = v


@pytest.fixture()
def fsdp_student(tiny_models):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{coordinator.free_port()}", rank=0, world_size=1)
    cfg = config.Config(student=tiny_models[0], teacher=tiny_models[1], batch_size=4,
                          loss=estimators.LossOptions(name="reverse_kl_pg"))
    yield cfg, learner.build(cfg, cfg.student)
    dist.destroy_process_group()


def test_publish_copies_in_the_buffer_dtype_then_syncs_then_announces(fsdp_student, monkeypatch):
    cfg, ln = fsdp_student
    with torch.no_grad():
        for p in ln.student.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # values that bf16 rounds
    log = []
    recorder = _Recorder(log)
    ch = SimpleNamespace(lock=recorder, version=recorder, stop=threading.Event())
    monkeypatch.setattr(asyncopd, "sync_devices", lambda *d: log.append("sync"))
    cfg.mixed_precision = True
    buffer = learner.weight_buffer(cfg.student, config.training_dtype(cfg))
    asyncopd.publish(ch, ln, buffer, 7)
    assert log == ["acquire", "sync", "version 7", "release"]
    full = checkpoint.full_state_dict(ln.student)
    assert set(buffer) == set(full)  # HF names, every entry
    for k, v in full.items():
        assert buffer[k].dtype == torch.bfloat16 and torch.equal(buffer[k], v.to(torch.bfloat16)), k


def test_handoff_owner_waits_for_every_release_but_not_forever_once_stopping():
    ch = SimpleNamespace(released=SimpleNamespace(value=0), stop=threading.Event())
    done = threading.Event()
    t = threading.Thread(target=lambda: (channels.hold_until_released(ch, 2), done.set()))
    t.start()
    ch.released.value = 1
    assert not done.wait(0.3)  # one of two workers still holds a handle
    ch.released.value = 2
    assert done.wait(2)
    ch.released.value, t0 = 0, __import__("time").time()
    ch.stop.set()  # a crashed worker never releases: the stopping owner gives up after its grace period
    channels.hold_until_released(ch, 2, grace_s=0.2)
    assert __import__("time").time() - t0 < 2


def test_transport_and_dtypes_are_resolved_before_start(tmp_path, tiny_models):
    cfg = config.Config()
    assert config.resolve_transport(cfg) == "shared" and config.training_dtype(cfg) == torch.float32
    cfg = config.Config(rollout_devices=["cuda:0"], learner_devices=["cuda:1"], mixed_precision=True)
    assert config.resolve_transport(cfg) == "handoff" and config.training_dtype(cfg) == torch.bfloat16
    cfg.engine = "vllm"  # a vLLM child sees only its own GPU: host shared memory
    assert config.resolve_transport(cfg) == "shared"
    assert teacher_cache.scoring_dtype(config.Config(teacher_device="cuda:4")) == torch.bfloat16
    assert teacher_cache.scoring_dtype(config.Config()) == torch.float32
    assert teacher_cache.scoring_dtype(config.Config(teacher_dtype="bfloat16")) == torch.bfloat16
    student, teacher = tiny_models
    base = [f"student={student}", f"teacher={teacher}", f"out_dir={tmp_path}"]
    for extra, msg in [(["teacher_dtype=fp16"], "teacher_dtype='fp16'"),
                       (["weight_transport=ipc"], "weight_transport='ipc'"),
                       (["engine=vllm", "weight_transport=handoff"], "handoff needs engine=hf")]:
        with pytest.raises(ValueError, match=msg):
            preflight.check_inputs(config.load_config(None, base + extra))


def test_gpu_check_plans_valid_runs_for_1_to_8_gpus(tiny_models):
    """`bash run.sh gpu-check` cannot run here; its plan can: every run it would make is a valid config that
    names only visible GPUs, covers every GPU path, and NCCL gets distinct GPUs; the vLLM teacher (TP 2 from 3 GPUs)
    and its HF twin run sync only. The CPU plan (what the tests run) has the same paths less CUDA IPC."""
    from tools import gpu_check
    for n in range(1, 9):
        runs = gpu_check.plan(n, with_vllm=True)
        names = {name for name, _, _ in runs}
        teacher = {gpu_check.TWIN, f"vllm teacher (TP {2 if n >= 3 else 1}), MC"}
        assert teacher <= names and [s for name, s, _ in runs if name in teacher] == ["sync", "sync"]
        assert len(runs) == 2 * len(names) - 2 and {s for _, s, _ in runs} == {"sync", "async"}
        assert len(names) == 8 + (n >= 4) + (n >= 5)  # 2 vLLM workers from 4 GPUs, 3 learner ranks from 5
        for name, _, over in runs:
            keys = [o.split("=")[0] for o in gpu_check.COMMON + over]
            assert len(set(keys)) == len(keys), (name, over)  # no key given twice
            cfg = config.load_config(None, gpu_check.COMMON + over)
            devices = config.role_devices(cfg)
            assert all(d.startswith("cuda:") and int(d.split(":")[1]) < n for d in devices), (n, name)
            assert len(config.teacher_devices(cfg)) == (2 if n >= 3 and name.startswith("vllm teacher") else 1)
            ranks = 3 if "x3" in name else min(n, 2)
            assert len(set(cfg.learner_devices)) == len(cfg.learner_devices) == ranks
            shared = "shared-memory" in name or cfg.engine == "vllm" or "CUDA IPC" not in name and \
                cfg.weight_transport == "shared"
            assert config.resolve_transport(cfg) == ("shared" if shared or cfg.engine == "vllm" else "handoff"), name
            assert (cfg.engine == "vllm") == ("vllm rollout" in name.lower()) and cfg.mixed_precision
            assert (cfg.teacher_engine == "vllm") == name.startswith("vllm teacher")
    cpu = gpu_check.plan(0, with_vllm=True, cpu=True)
    gpu_only = {"NCCL learner x2, fkl, bf16 mixed precision", "NCCL learner x3 (uneven token shards), fkl"}
    cpu_only = {"gloo learner x2, fkl", "gloo learner x3 (uneven token shards), fkl",
                "vllm rollout, T=0.7, forward KL top-K"}
    assert {name for name, _, _ in cpu} == {name for name, _, _ in gpu_check.plan(8, with_vllm=True)
                                            if "CUDA IPC" not in name and "MC" not in name.split(", ")[-1]} \
        - gpu_only | cpu_only | {"vllm teacher (TP 1), fkl"}
    for name, _, over in cpu:
        cfg = config.load_config(None, gpu_check.COMMON + over)
        assert set(config.role_devices(cfg)) == {"cpu"} and not cfg.mixed_precision, name
        preflight.check_values(cfg)


def test_vllm_settings_refused_before_any_process_starts(tmp_path, tiny_models):
    """What vLLM would reject (or silently change) inside the rollout child is refused by preflight.check_inputs(), in
    the parent, in one line: a cpu device, a temperature outside [0.01, 2], MC draws under top-p truncation."""
    import subprocess
    import sys

    from conftest import ROOT
    student, teacher = tiny_models
    base = [f"student={student}", f"teacher={teacher}", f"out_dir={tmp_path}", "engine=vllm"]
    with pytest.raises(ValueError, match="runs on cuda"):  # the CUDA build (.venv's) on a cpu device
        preflight.check_inputs(config.load_config(None, base))
    for kw, msg in [(dict(temperature=3.0), "0.01 <= temperature <= 2"),
                    (dict(temperature=0.005), "0.01 <= temperature"),
                    (dict(top_p=0.9), "top_p=0.9")]:
        with pytest.raises(ValueError, match=msg):
            rollout.check_engine("vllm", {"mc_ids"}, **{"mc_samples": 8, "devices": ["cuda:0"], **kw})
    out = subprocess.run([sys.executable, "asyncopd.py", "train", *base, "progress=false"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "engine 'vllm' with the installed vllm runs on cuda" in out.stderr
    assert not os.listdir(tmp_path)  # no run folder: nothing started


def test_publish_gathers_a_tied_embedding_once_and_fills_both_names(tmp_path, monkeypatch):
    """Qwen3-1.7B ties lm_head to the embedding: one parameter, two state-dict names. It is all-gathered once
    (the largest tensor of the model) and both buffer entries get it."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = __import__("task").build_tokenizer()
    conf = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                       tie_word_embeddings=True)
    Qwen2ForCausalLM(conf).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{coordinator.free_port()}", rank=0, world_size=1)
    try:
        cfg = config.Config(student=str(tmp_path), batch_size=4)
        ln = learner.build(cfg, cfg.student)
        gathers = []
        real = DTensor.full_tensor
        monkeypatch.setattr(DTensor, "full_tensor", lambda self, **kw: gathers.append(self.shape) or real(self, **kw))
        buffer = learner.weight_buffer(cfg.student, torch.float32)
        learner.publish_weights(ln, buffer)
        full = checkpoint.full_state_dict(ln.student)
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(buffer) and set(buffer) == set(full)
        assert all(torch.equal(buffer[k], v) for k, v in full.items())
        assert len(gathers) == len(buffer) - 1  # the tied pair: one all-gather
    finally:
        dist.destroy_process_group()
