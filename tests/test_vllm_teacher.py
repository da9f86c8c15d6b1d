"""The vLLM teacher's request and answer (optional/vllm_teacher.py) without vLLM: the fields it reads from vLLM's
answer (conftest.vllm_answer: what vLLM computes, per its source) equal teacher_cache.score's from an HF forward, field
by field, for every estimator it can serve; short answers are refused; the remote client retries and fails in one
line. The real engine and a real `vllm serve` run in tests/vllm_cpu/test_teacher.py."""
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import estimators as E
import teacher_cache
from conftest import ROOT, student_rollout, vllm_answer
from optional import vllm_teacher as vt

K, KS, M = 5, 4, 6


@pytest.fixture(scope="module")
def teacher():
    return teacher_cache.load_teacher(__import__("config").Config(teacher=f"{ROOT}/models/teacher"))


@pytest.fixture(scope="module")
def traj():
    return student_rollout(KS, M)


def answer(teacher, traj, fields):
    return [vllm_answer(teacher, ids, params) for ids, params in vt.requests_for(traj, fields, K)]


def served_field_sets():
    """Each estimator's teacher fields (every support of the finite-support ones), where vLLM can serve them."""
    out = []
    for name, e in E.ESTIMATORS.items():
        for support in (e.fields if isinstance(e.fields, dict) else {"": e.fields}):
            opts = E.LossOptions(name=name, support=support or "student_topk", teacher_topk=K, student_topk=KS,
                                 samples=M)
            out.append((f"{name}-{support}" if support else name, E.needs(opts).teacher | {"teacher_logp"}))
    return out


@pytest.mark.parametrize("fields", [f for _, f in served_field_sets()], ids=[n for n, _ in served_field_sets()])
def test_fields_from_vllms_answer_equal_the_hf_teachers(teacher, traj, fields):
    """Row r of every field is y_r's (the shift convention), at the same ids, to float32 rounding."""
    if fields - vt.SERVED:
        with pytest.raises(ValueError, match="draw none from the teacher; use teacher_engine=hf"):
            vt.requests_for(traj, fields, K)
        return
    got = vt.parse(traj, fields, K, teacher.config.vocab_size, answer(teacher, traj, fields))
    want = teacher_cache.score(teacher, traj, fields, K, M)
    for f in fields:
        assert got[f].dtype == want[f].dtype and got[f].shape == want[f].shape, f
        if f == "teacher_topk_ids":
            assert torch.equal(got[f], want[f])
        else:
            torch.testing.assert_close(got[f], want[f], atol=1e-5, rtol=0, msg=f)


def test_the_request_asks_for_exactly_the_rows_of_the_response(traj):
    """The prompt is prompt + response; id rows: one per response token, from the last prompt row (start = P - 1)."""
    (ids, params), pcu, cu = vt.requests_for(traj, {"teacher_logp", "mc_teacher_logp"}, K)[1], \
        traj["prompt_cu_seqlens"].tolist(), traj["cu_seqlens"].tolist()
    P, L = pcu[2] - pcu[1], cu[2] - cu[1]
    assert ids == traj["prompt_ids"][pcu[1]:pcu[2]].tolist() + traj["token_ids"][cu[1]:cu[2]].tolist()
    assert params["prompt_logprob_start"] == P - 1 and len(params["prompt_logprob_token_ids"]) == L
    assert params["prompt_logprob_token_ids"] == traj["mc_ids"][cu[1]:cu[2]].tolist() and params["prompt_logprobs"] == 0
    assert vt.requests_for(traj, {"teacher_logp", "teacher_dense_logp"}, K)[0][1]["prompt_logprobs"] == -1


def test_a_short_or_missing_answer_is_refused(teacher, traj):
    fields = {"teacher_logp", "student_topk_teacher_logp", "teacher_topk_ids", "teacher_topk_logp"}
    V = teacher.config.vocab_size
    good = answer(teacher, traj, fields)
    for broken, says in [(good[:-1], "5 answers for 6 sequences"),
                         ([(good[0][0][:-1], good[0][1])] + good[1:], "sequence 0 came back with"),
                         ([(good[0][0], None)] + good[1:], "prompt_token_id_logprobs of shape None"),
                         ([(good[0][0], good[0][1][:-1])] + good[1:], "prompt_token_id_logprobs of shape"),
                         ([([None] + [{}] * (len(good[0][0]) - 1), good[0][1])] + good[1:], "no log-prob")]:
        with pytest.raises(RuntimeError, match=says):
            vt.parse(traj, fields, K, V, broken)
    topk_short = [([d if d is None else dict(list(d.items())[:2]) for d in lp], s) for lp, s in good]
    with pytest.raises(RuntimeError, match="fewer than teacher_topk=5"):
        vt.parse(traj, fields, K, V, topk_short)


class StandIn(BaseHTTPRequestHandler):
    """/inference/v1/generate as `vllm serve` answers it (JSON, -inf as -9999.0, base64 .npy), after `fail` 503s."""
    model, fail, calls = None, 0, []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.calls.append(tuple(body["token_ids"]))
        if StandIn.fail:
            StandIn.fail -= 1
            return self.reply(503, {"error": {"message": "busy"}})
        if body["sampling_params"].get("prompt_logprobs", 0) > 50:
            return self.reply(400, {"error": {"message": "Requested prompt logprobs of 99, which is greater than "
                                              "max allowed: 50"}})
        logprobs, scores = vllm_answer(self.model, body["token_ids"], body["sampling_params"])
        out = {"prompt_logprobs": [None if d is None else {str(k): {"logprob": max(v, -9999.0), "rank": r}
                                                          for k, (v, r) in d.items()} for d in logprobs]}
        if scores is not None:
            buffer = io.BytesIO()
            np.save(buffer, scores, allow_pickle=False)
            out["prompt_token_id_logprobs"] = base64.b64encode(buffer.getvalue()).decode()
        self.reply(200, out)

    def reply(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in(teacher):
    StandIn.model, StandIn.fail, StandIn.calls = teacher, 0, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_teacher_retries_a_busy_server_and_reads_its_json(teacher, traj, stand_in):
    fields = {"teacher_logp", "mc_teacher_logp", "teacher_topk_ids", "teacher_topk_logp"}
    remote = vt.RemoteTeacher(stand_in, teacher.config.vocab_size, retries=2, concurrency=2)
    StandIn.fail = 2  # the first two requests get 503: retried after 1 s (and 2 s)
    got = remote.score(traj, fields, K)
    assert len(StandIn.calls) == 6 + 2
    want = teacher_cache.score(teacher, traj, fields, K, M)
    for f in fields:
        torch.testing.assert_close(got[f], want[f], atol=1e-5, rtol=0, msg=f)


def test_remote_teacher_fails_in_one_line(teacher, traj, stand_in):
    remote = vt.RemoteTeacher(stand_in, teacher.config.vocab_size, retries=1, concurrency=1)
    with pytest.raises(RuntimeError, match=r"answered 400: Requested prompt logprobs of 99") as e:
        remote.score(traj, {"teacher_logp", "teacher_topk_ids"}, 99)  # a refusal is not retried
    assert len(set(StandIn.calls)) == len(StandIn.calls) < 6 and "\n" not in str(e.value)  # not retried, then stopped
    StandIn.fail = 5
    with pytest.raises(RuntimeError, match="answered 503: busy"):
        remote.score(traj, {"teacher_logp"}, K)
    dead = vt.RemoteTeacher("http://127.0.0.1:9", teacher.config.vocab_size, retries=0)
    with pytest.raises(RuntimeError, match=r"teacher_url http://127.0.0.1:9/inference/v1/generate unreachable after "
                                           r"1 tries .*Connection refused"):
        dead.score(traj, {"teacher_logp"}, K)
