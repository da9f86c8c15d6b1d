"""Offline OPD (Lightning OPD): `asyncopd.py precompute` writes a chunked disk teacher cache once,
`train schedule=offline` learns from it with no rollout or teacher process. Tiny random models."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import asyncopd
import batch_format
import config
import estimators
import rollout
import schedule
import task
import teacher_cache
from conftest import ROOT, TEACHER_CHAT_TEMPLATE, make_model_dir, merged
from optional import offline
from runtime import preflight

# 16 prompts in 4 chunks of 4; batch_size=4 and steps=4 make one epoch over the cache
PRE = ["precompute_prompts=16", "chunk_prompts=4", "max_new_tokens=12", "eval_size=0", "threads=1", "progress=false",
       "loss.name=reverse_kl_pg", "loss.ratio=false", "batch_size=4", "seed=3"]
TRAIN = ["schedule=offline", "steps=4", "lr=0.01", "max_new_tokens=12", "eval_size=0", "threads=1", "progress=false",
         "batch_size=4", "seed=3", "loss.name=reverse_kl_pg", "loss.advantage=theta"]


def cli(cmd, student, teacher, *args, timeout=180):
    argv = [sys.executable, os.path.join(ROOT, "asyncopd.py"), cmd, f"student={student}", f"teacher={teacher}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def sft_student(src, dst, teacher_fp):
    """Copy of a student whose asyncopd_sft.json names `teacher_fp` as its SFT teacher (as tools/sft.py writes)."""
    shutil.copytree(src, dst)
    if teacher_fp is not None:
        with open(os.path.join(dst, "asyncopd_sft.json"), "w") as f:
            json.dump({"teacher_fingerprint": teacher_fp}, f)
    return str(dst)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """(student SFT'd on the tiny teacher, teacher, work folder)."""
    student, teacher = tiny_models
    root = tmp_path_factory.mktemp("offline")
    return sft_student(student, root / "student", offline.fingerprint(teacher)), teacher, root


@pytest.fixture(scope="module")
def cache_dir(models):
    """An uninterrupted precompute through the real command line."""
    student, teacher, root = models
    out = cli("precompute", student, teacher, *PRE, f"cache_dir={root}/cache")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "16 sequences" in out.stdout and "4 chunks computed" in out.stdout and "0 reused" in out.stdout
    return str(root / "cache")


def precompute(cfg):
    """`asyncopd.py precompute` in-process: the inputs checked, then the cache written."""
    tok, train, _ = preflight.check_inputs(cfg, precompute=True)
    return asyncopd.precompute(cfg, tok, train)


def make_config(student, teacher, args, **kw):
    return config.load_config(None, merged([f"student={student}", f"teacher={teacher}", *args],
                                           [f"{k}={v}" for k, v in kw.items()]))


def records(run_dir, kind="step"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def logp_at_tokens(model_dir, cache):
    """log softmax(model) at the cached response tokens, float64, by a plain padded forward."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    input_ids, attention_mask, rows = batch_format.pad_batch(cache)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[rows], dim=-1)
    return logp.gather(1, cache["token_ids"][:, None])[:, 0]


# ----------------------------------------------------------------------------- (a) end to end
@pytest.mark.parametrize("ratio", [False, True])
def test_precompute_then_offline_training(models, cache_dir, ratio):
    """Lightning OPD on fixed rollouts: A_theta = t - s with no ratio is exact gradient descent on
    1/2 sum (s - t)^2 over the cached tokens, so the squared gap must shrink; with the ratio, the
    cached b makes r = exp(s - b) exactly 1 at the first step (student = rollout student) only."""
    student, teacher, root = models
    name = f"ratio_{ratio}"
    out = cli("train", student, teacher, *merged(TRAIN, [f"loss.ratio={str(ratio).lower()}", f"cache_dir={cache_dir}",
              f"out_dir={root}/runs", f"run_name={name}", f"eval_size={8 if ratio else 0}"]))
    assert out.returncode == 0, out.stderr[-3000:]
    run = os.path.join(root, "runs", name)
    steps = records(run)
    cache, meta = offline.load_dir(cache_dir)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert sum(r["tokens"] for r in steps) == meta["num_tokens"]  # one epoch: every cached token once
    assert [(r["stale_min"], r["stale_max"]) for r in steps] == [(k, k) for k in range(4)]  # all made by version 0
    trace = json.load(open(os.path.join(run, "trace.json")))["traceEvents"]
    roles = {e["args"]["name"] for e in trace if e["ph"] == "M"}
    assert roles == {"learner"}  # no rollout, no teacher
    s0, s4 = logp_at_tokens(student, cache), logp_at_tokens(os.path.join(run, "ckpt_00004"), cache)
    torch.testing.assert_close(s0.float(), cache["behavior_logp"], atol=1e-5, rtol=1e-5)  # b = the SFT student
    t = cache["teacher_logp"].double()
    gap0, gap4 = ((s0 - t) ** 2).mean(), ((s4 - t) ** 2).mean()
    assert gap4 < 0.9 * gap0, (float(gap0), float(gap4))
    if ratio:  # no rollout role evaluates: the coordinator grades the start and the end
        from transformers import AutoModelForCausalLM, AutoTokenizer
        final = task.evaluate(AutoModelForCausalLM.from_pretrained(os.path.join(run, "ckpt_00004")),
                              AutoTokenizer.from_pretrained(student), task.read_prompts("addition", "test", 8),
                              max_new_tokens=12)
        assert [(r["step"], r["accuracy"]) for r in records(run, "eval")][1:] == [(4, final)]
        assert records(run, "eval")[0]["step"] == 0 and "student accuracy after" in out.stdout
        assert abs(steps[0]["ratio_mean"] - 1) < 1e-5 and abs(steps[-1]["ratio_mean"] - 1) > 1e-3
    else:
        assert all(r["ratio_mean"] == 1.0 for r in steps)
        first = schedule.unit_prompt_indices(config.Config(batch_size=4, rollout_batch_size=4, seed=3), 16, 0)
        gap = batch_format.select_sequences(dict(cache, teacher_logp=(s0 - t).float()), first)["teacher_logp"]
        assert abs(steps[0]["loss"] - float(gap.mean())) < 1e-5  # value s - t on step 1's sequences


# ----------------------------------------------------------------------------- (b) exact round trip
def online_scores(cfg, chunk_prompts, n_chunks):
    """What the rollout and teacher roles produce for unit c (same per-unit generators), unit = chunk."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg.student)
    prompts = task.read_prompts("addition", "train", chunk_prompts * n_chunks)
    engine = rollout.make_engine(cfg.student, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    teacher = teacher_cache.load_teacher(cfg)  # as the teacher role loads it
    need = estimators.needs(cfg.loss)
    out = []
    for c in range(n_chunks):
        idx = list(range(c * chunk_prompts, (c + 1) * chunk_prompts))
        traj = engine.generate([task.encode_prompt(tok, prompts[i]["prompt"]) for i in idx], idx, 0,
                               student_topk=need.student_topk, mc_samples=need.mc_samples,
                               generator=schedule.unit_generator(cfg, c, 1))
        teacher_fields = need.teacher | {"teacher_logp"}  # as teacher_role
        out.append(teacher_cache.score(teacher, traj, teacher_fields, cfg.loss.teacher_topk,
                                       cfg.loss.samples, generator=schedule.unit_generator(cfg, c, 2)))
    return out


@pytest.mark.parametrize("loss,dtype", [("reverse_kl_pg", "auto"), ("reverse_kl_mc", "auto"), ("forward_kl_mc", "auto"),
                                        ("forward_kl_topk", "auto"), ("reverse_kl_mc", "bfloat16")])
def test_cache_round_trips_exactly(models, cache_dir, tmp_path, loss, dtype):
    """Every field of every chunk on disk is bitwise what online rollout + teacher scoring give, in the
    teacher dtype of the online run (bfloat16: what a GPU teacher role scores in)."""
    student, teacher, _ = models
    args = merged(PRE, [f"loss.name={loss}", "loss.ratio=true", "loss.samples=3", "loss.teacher_topk=5",
                        f"teacher_dtype={dtype}"])
    if loss == "reverse_kl_pg":  # the command-line cache of the fixture
        directory, args = cache_dir, PRE + ["teacher_dtype=auto"]
    else:
        directory = str(tmp_path / "cache")
        precompute(make_config(student, teacher, args, cache_dir=directory))
    cfg = make_config(student, teacher, args)
    online = online_scores(cfg, 4, 4)
    needed = estimators.required_fields(cfg.loss) - {"cu_seqlens"}
    for c, want in enumerate(online):
        got, meta = offline.load(os.path.join(directory, f"chunk_{c:05d}.safetensors"))
        assert needed <= set(got) and set(got) == set(want), (sorted(got), sorted(want))
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (c, k)
        assert meta["teacher_fingerprint"] == offline.fingerprint(teacher) and meta["chunk_index"] == c
        assert meta["teacher_dtype"] == str(teacher_cache.scoring_dtype(cfg))
    whole, meta = offline.load_dir(directory)
    for k, v in batch_format.concat(online).items():
        assert torch.equal(whole[k], v), k
    assert meta["num_chunks"] == 4 and whole["prompt_index"].tolist() == list(range(16))


# ----------------------------------------------------------------------------- (c) resumption
def test_interrupted_precompute_resumes_without_recomputing(models, cache_dir, tmp_path, monkeypatch, capsys):
    """Crash while writing chunk 2 (a half-written tmp file is left behind), rerun: chunks 0-1 are
    untouched (same mtime), 2-3 are computed, and every file equals the uninterrupted run's."""
    student, teacher, _ = models
    directory = str(tmp_path / "cache")
    cfg = lambda: make_config(student, teacher, PRE, cache_dir=directory)  # noqa: E731 - checks fill in cfg
    real_save, calls = offline.save_file, []

    def crash_on_third(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"half a chunk")
            raise KeyboardInterrupt
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(offline, "save_file", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        precompute(cfg())
    monkeypatch.setattr(offline, "save_file", real_save)
    assert offline.finished_chunks(directory) == {0, 1}
    assert any(".tmp-" in n for n in os.listdir(directory))
    assert "holds 8 of the 16 sequences" in refused(student, teacher, directory)  # unfinished: not trainable
    mtimes = {n: os.stat(os.path.join(directory, n)).st_mtime_ns
              for n in os.listdir(directory) if n.startswith("chunk_0000")}
    message = precompute(cfg())
    assert "2 chunks computed" in message and "2 reused" in message
    for n, t in mtimes.items():
        if ".tmp-" not in n:
            assert os.stat(os.path.join(directory, n)).st_mtime_ns == t, f"{n} was rewritten"
    names = sorted(os.listdir(directory))
    assert names == sorted(os.listdir(cache_dir)) == [f"chunk_{c:05d}.safetensors" for c in range(4)]  # tmp cleaned
    for n in names:
        with open(os.path.join(directory, n), "rb") as a, open(os.path.join(cache_dir, n), "rb") as b:
            assert a.read() == b.read(), n
    assert "0 chunks computed" in precompute(cfg())  # finished: nothing to do
    with pytest.raises(ValueError, match="holds chunks of another precompute .seed 3 there, 4 now"):
        precompute(make_config(student, teacher, PRE, cache_dir=directory, seed=4))


# ----------------------------------------------------------------------------- (d) guards
def refused(student, teacher, cache, **kw):
    with pytest.raises(ValueError) as e:
        preflight.check_inputs(make_config(student, teacher, TRAIN, cache_dir=cache, **kw))
    return str(e.value)


def test_teacher_consistency_guard(models, cache_dir, tiny_models, tmp_path):
    student, teacher, root = models
    fp = offline.fingerprint(teacher)
    other = sft_student(student, tmp_path / "other", "0123456789abcdef")
    msg = refused(other, teacher, cache_dir)
    assert "teacher consistency" in msg and fp in msg and "0123456789abcdef" in msg and "allow_teacher_mismatch" in msg
    # the ablation
    preflight.check_inputs(make_config(other, teacher, TRAIN, cache_dir=cache_dir, allow_teacher_mismatch="true"))
    assert "no asyncopd_sft.json" in refused(tiny_models[0], teacher, cache_dir)  # a student tools/sft.py did not make
    preflight.check_inputs(make_config(student, teacher, TRAIN, cache_dir=cache_dir))  # the consistent pair passes
    # and on the command line: one line, exit code 2, no run started
    out = cli("train", other, teacher, *TRAIN, f"cache_dir={cache_dir}", f"out_dir={tmp_path}/runs")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-2000:]
    assert fp in out.stderr and "0123456789abcdef" in out.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_cache_vocabulary_and_fields_guards(models, cache_dir, tmp_path):
    student, teacher, _ = models
    fp = offline.fingerprint(teacher)
    tok = task.build_tokenizer()
    tok.add_tokens(["@"])  # one more token: another vocabulary
    other_tok = make_model_dir(tmp_path / "tok", tok, 32, 1)
    with open(os.path.join(other_tok, "asyncopd_sft.json"), "w") as f:
        json.dump({"teacher_fingerprint": fp}, f)
    assert "was built with tokenizer" in refused(other_tok, teacher, cache_dir)
    bigger = sft_student(student, tmp_path / "big", fp)
    conf = json.load(open(f"{bigger}/config.json"))
    conf["vocab_size"] += 7
    json.dump(conf, open(f"{bigger}/config.json", "w"))
    assert f"vocabulary size {conf['vocab_size'] - 7}" in refused(bigger, teacher, cache_dir)
    msg = refused(student, teacher, cache_dir, **{"loss.name": "forward_kl_topk"})
    assert "lacks ['teacher_topk_ids', 'teacher_topk_logp'] needed by forward_kl_topk" in msg
    assert "lacks ['mc_behavior_logp', 'mc_ids', 'mc_teacher_logp']" in refused(student, teacher, cache_dir,
                                                                               **{"loss.name": "reverse_kl_mc"})
    assert "needs cache_dir" in refused(student, teacher, "")


def test_a_cache_remembers_how_its_prompts_were_rendered(models, cache_dir, tmp_path):
    """The cache records prompt_template, student_template and teacher_template: a precompute resumed with another
    rendering, or an offline run whose student would see its prompts another way, is refused."""
    from transformers import AutoTokenizer
    student, teacher, _ = models
    with pytest.raises(ValueError, match="another precompute .teacher_template 'raw' there, 'chat' now"):
        precompute(make_config(student, teacher, PRE, cache_dir=cache_dir, teacher_template="chat"))
    chatty = sft_student(student, tmp_path / "chatty", offline.fingerprint(teacher))
    tok = AutoTokenizer.from_pretrained(chatty)
    tok.chat_template = TEACHER_CHAT_TEMPLATE
    tok.save_pretrained(chatty)
    msg = refused(chatty, teacher, cache_dir, student_template="chat")
    assert msg == f"cache {cache_dir} was rolled out with student_template='raw', this run has 'chat': set it as the " \
                  "cache has it"
    preflight.check_inputs(make_config(chatty, teacher, TRAIN, cache_dir=cache_dir))  # rendered as the cache was


def test_damaged_cache_is_refused_with_its_path(models, cache_dir, tmp_path):
    student, teacher, _ = models
    broken = str(tmp_path / "broken")
    shutil.copytree(cache_dir, broken)
    path = os.path.join(broken, "chunk_00001.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    msg = refused(student, teacher, broken)
    assert path in msg and "truncated, corrupt" in msg
    with open(path, "wb") as f:
        f.write(b"\x00" * 64)  # garbage header
    assert path in refused(student, teacher, broken)
    os.remove(path)
    assert "chunks [1] are missing" in refused(student, teacher, broken)
    assert "no chunk_*.safetensors" in refused(student, teacher, str(tmp_path / "empty"))
