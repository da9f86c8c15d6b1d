"""Tests for teacher_cache.py and batch_format.py: the shift, teacher scoring against float64 references,
validation, slicing, the disk format and the multiprocessing round-trip. CPU, tiny random Qwen2, no downloads."""
import copy
import json
import os
import shutil

import pytest
import torch

import batch_format as bf
import teacher_cache as tc
from optional import offline

V, KS, M = 40, 5, 6
PROMPT_LENS, RESP_LENS = [3, 1, 5, 2], [4, 6, 1, 3]  # ragged: right padding is exercised


def make_traj(prompt_lens=PROMPT_LENS, resp_lens=RESP_LENS, seed=0):
    """A rollout-side trajectory batch with random tokens (behaviour fields are placeholders)."""
    g = torch.Generator().manual_seed(seed)
    P, L = torch.tensor(prompt_lens), torch.tensor(resp_lens)
    N, B = int(L.sum()), len(L)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = L.cumsum(0)
    pcu = torch.zeros(B + 1, dtype=torch.int64)
    pcu[1:] = P.cumsum(0)
    token_ids = torch.randint(0, V, (N,), generator=g)
    mc_ids = torch.randint(0, V, (N, M), generator=g)
    mc_ids[:, 0] = token_ids
    return {
        "prompt_ids": torch.randint(0, V, (int(P.sum()),), generator=g), "prompt_cu_seqlens": pcu, "cu_seqlens": cu,
        "finished": torch.arange(B) % 2 == 0, "prompt_index": torch.arange(B) + 10,
        "token_ids": token_ids, "behavior_logp": -torch.rand(N, generator=g) * 3,
        "policy_version": torch.full((N,), 7), "loss_mask": torch.ones(N, dtype=torch.bool),
        "student_topk_ids": torch.rand(N, V, generator=g).argsort(1)[:, :KS],
        "student_topk_behavior_logp": -torch.rand(N, KS, generator=g) * 3,
        "mc_ids": mc_ids, "mc_behavior_logp": -torch.rand(N, M, generator=g) * 3,
    }


@pytest.fixture(scope="module")
def teacher():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the tiny init, so top-K and positions really differ
        model.lm_head.weight.mul_(20.0)
    return model


def reference_logp(model, traj, shift=0):
    """float64 log_softmax at position P + r - 1 + shift, one unpadded sequence at a time -> [N, V]."""
    m64 = copy.deepcopy(model).double()
    rows = []
    pcu, cu = traj["prompt_cu_seqlens"], traj["cu_seqlens"]
    with torch.no_grad():
        for i in range(len(cu) - 1):
            prompt, resp = traj["prompt_ids"][pcu[i]:pcu[i + 1]], traj["token_ids"][cu[i]:cu[i + 1]]
            logits = m64(input_ids=torch.cat([prompt, resp])[None]).logits[0]
            P, L = len(prompt), len(resp)
            rows.append(torch.log_softmax(logits, -1)[P - 1 + shift:P + L - 1 + shift])
    return torch.cat(rows)


def test_score_unit_reads_the_response_after_the_teachers_own_prompt(teacher):
    """Where the teacher renders a prompt its own way (rows' "teacher_ids", teacher_template), its t is the float64
    log-softmax over ITS prompt followed by the student's response tokens, whatever teacher_batch_tokens; the unit
    keeps the student's prompt, after which the learner reads s."""
    from config import Config
    from estimators import LossOptions
    traj, g = make_traj(), torch.Generator().manual_seed(3)
    own = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 2, 1, 7)]  # other lengths than the student's
    prompts = [{"ids": [0], "teacher_ids": [1, 2]} for _ in range(int(traj["prompt_index"].max()) + 1)]
    for i, ids in zip(traj["prompt_index"].tolist(), own, strict=True):
        prompts[i] = {"ids": [0], "teacher_ids": ids}
    seen = dict(traj, prompt_ids=torch.tensor([t for p in own for t in p]),
                prompt_cu_seqlens=torch.tensor([0, 5, 7, 8, 15]))
    ref = reference_logp(teacher, seen)
    for batch_tokens in (0, 9):  # one forward, or one per group of sequences
        cfg = Config(loss=LossOptions(name="forward_kl_topk", teacher_topk=4), teacher_batch_tokens=batch_tokens)
        got = tc.score_unit(cfg, teacher, traj, 0, prompts)
        assert torch.equal(got["prompt_ids"], traj["prompt_ids"])
        assert torch.equal(got["prompt_cu_seqlens"], traj["prompt_cu_seqlens"])
        torch.testing.assert_close(got["teacher_logp"].double(), ref.gather(1, traj["token_ids"][:, None])[:, 0],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(got["teacher_topk_logp"].double(), ref.topk(4).values, rtol=0, atol=1e-5)
    students_prompt = tc.score_unit(cfg, teacher, traj, 0)  # without the rows: after the student's prompt
    assert (students_prompt["teacher_logp"] - got["teacher_logp"]).abs().max() > 1e-2


ALL = {"teacher_logp", "teacher_topk_ids", "teacher_topk_logp", "student_topk_teacher_logp", "mc_teacher_logp",
       "teacher_mc_ids", "teacher_mc_logp", "teacher_dense_logp"}


# ----------------------------------------------------------------------------- the shift
def test_response_positions_hand_made():
    b, pos = bf.response_positions(torch.tensor([3, 1, 2]), torch.tensor([2, 3, 1]))
    assert b.tolist() == [0, 0, 1, 1, 1, 2]
    assert pos.tolist() == [2, 3, 0, 1, 2, 1]  # P_i + r - 1
    with pytest.raises(ValueError, match="prompt needs >= 1 token"):
        bf.response_positions(torch.tensor([0]), torch.tensor([2]))


def test_pad_batch_rows_point_at_the_scoring_position():
    EOS = 39
    traj = {"prompt_ids": torch.tensor([5, 6, 7, 8, 9, 11]), "prompt_cu_seqlens": torch.tensor([0, 3, 4, 6]),
            "cu_seqlens": torch.tensor([0, 2, 5, 6]), "token_ids": torch.tensor([20, EOS, 21, 22, EOS, 23])}
    input_ids, mask, rows = bf.pad_batch(traj)
    assert input_ids.tolist() == [[5, 6, 7, 20, EOS], [8, 21, 22, EOS, 0], [9, 11, 23, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    S = 5
    assert rows.tolist() == [0 * S + 2, 0 * S + 3, 1 * S + 0, 1 * S + 1, 1 * S + 2, 2 * S + 1]
    flat = input_ids.reshape(-1)
    assert torch.equal(flat[rows + 1], traj["token_ids"])  # row r is read one before y_r
    first = traj["cu_seqlens"][:-1]
    assert flat[rows[first]].tolist() == [7, 8, 11]  # y_0 is scored from the last prompt token
    last = traj["cu_seqlens"][1:] - 1
    assert flat[rows[last] + 1].tolist() == [EOS, EOS, 23]  # the last (EOS) row is present


# ----------------------------------------------------------------------------- scoring
def test_score_matches_float64_reference_per_sequence(teacher):
    traj = make_traj()
    out = tc.score(teacher, traj, ALL, teacher_topk=8, teacher_mc=M, generator=torch.Generator().manual_seed(1),
                   chunk_size=5)
    assert set(out) == set(traj) | ALL and all(out[k] is traj[k] for k in traj)  # new dict, inputs untouched
    ref = reference_logp(teacher, traj)
    tol = dict(atol=2e-5, rtol=0)
    assert torch.allclose(out["teacher_dense_logp"].double(), ref, **tol)
    assert torch.allclose(out["teacher_logp"].double(), ref.gather(1, traj["token_ids"][:, None])[:, 0], **tol)
    assert torch.allclose(out["student_topk_teacher_logp"].double(), ref.gather(1, traj["student_topk_ids"]), **tol)
    assert torch.allclose(out["mc_teacher_logp"].double(), ref.gather(1, traj["mc_ids"]), **tol)
    assert torch.allclose(out["teacher_mc_logp"].double(), ref.gather(1, out["teacher_mc_ids"]), **tol)
    top = torch.topk(ref, 8, dim=1)
    assert torch.equal(out["teacher_topk_ids"], top.indices)
    assert torch.allclose(out["teacher_topk_logp"].double(), top.values, **tol)
    assert (out["teacher_topk_logp"].diff(dim=1) <= 0).all()
    # chunking changes nothing: one chunk gives bitwise the same deterministic fields
    one = tc.score(teacher, traj, ALL - {"teacher_mc_ids", "teacher_mc_logp"}, teacher_topk=8, chunk_size=1024)
    for k in one.keys() - traj.keys():
        assert torch.equal(one[k], out[k]), k


def test_shifted_positions_give_different_values(teacher):
    """The check above can fail: reading positions P + r (one too late) disagrees with the reference."""
    traj = make_traj()
    out = tc.score(teacher, traj, {"teacher_dense_logp"})
    shifted = reference_logp(teacher, traj, shift=1)
    assert (out["teacher_dense_logp"].double() - shifted).abs().amax(1).min() > 1e-2  # every row is off
    input_ids, mask, rows = bf.pad_batch(traj)
    with torch.no_grad():
        h = teacher.model(input_ids=input_ids, attention_mask=mask)[0].reshape(-1, 32)
        wrong = torch.log_softmax(teacher.lm_head(h[rows + 1]).float(), -1)
    assert torch.allclose(wrong.double(), shifted, atol=2e-5)
    assert not torch.allclose(wrong, out["teacher_dense_logp"], atol=1e-2)


def test_teacher_mc_draws_follow_the_teacher_distribution(teacher):
    traj = make_traj(prompt_lens=[4], resp_lens=[2])
    n = 20000
    out = tc.score(teacher, traj, {"teacher_mc_ids", "teacher_mc_logp"}, teacher_mc=n,
                   generator=torch.Generator().manual_seed(3))
    p = reference_logp(teacher, traj)[1].exp()  # the row of the last (EOS) token
    freq = torch.bincount(out["teacher_mc_ids"][1], minlength=V).double() / n
    bound = 5 * (p * (1 - p) / n).sqrt() + 1e-4
    assert ((freq - p).abs() <= bound).all(), ((freq - p).abs() / bound).max()
    assert (p > 0.05).sum() >= 2  # not a degenerate one-hot distribution, so the test can fail
    again = tc.score(teacher, traj, {"teacher_mc_ids"}, teacher_mc=n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["teacher_mc_ids"], out["teacher_mc_ids"])  # reproducible with a fixed generator


def test_score_rejects_bad_requests(teacher):
    traj = make_traj()
    with pytest.raises(ValueError, match="not teacher fields"):
        tc.score(teacher, traj, {"behavior_logp"})
    with pytest.raises(ValueError, match="needs 'student_topk_ids'"):
        tc.score(teacher, {k: v for k, v in traj.items() if not k.startswith("student_topk")},
                 {"student_topk_teacher_logp"})
    with pytest.raises(ValueError, match="need teacher_topk in"):
        tc.score(teacher, traj, {"teacher_topk_ids"}, teacher_topk=V + 1)
    with pytest.raises(ValueError, match="need teacher_mc >= 1"):
        tc.score(teacher, traj, {"teacher_mc_logp"}, teacher_mc=0)
    teacher.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            tc.score(teacher, traj, {"teacher_logp"})
    finally:
        teacher.eval()


# ----------------------------------------------------------------------------- validation
def scored_like(traj, K=4, Mt=3):
    """Cheap valid teacher fields (no model): teacher_topk sorted, t <= 0."""
    N = traj["token_ids"].shape[0]
    g = torch.Generator().manual_seed(5)
    return dict(traj, teacher_logp=-torch.rand(N, generator=g),
                teacher_topk_ids=torch.rand(N, V, generator=g).argsort(1)[:, :K],
                teacher_topk_logp=-torch.rand(N, K, generator=g).sort(1).values,
                mc_teacher_logp=-torch.rand(N, M, generator=g),
                student_topk_teacher_logp=-torch.rand(N, KS, generator=g),
                teacher_mc_ids=torch.randint(0, V, (N, Mt), generator=g),
                teacher_mc_logp=-torch.rand(N, Mt, generator=g))


def test_validate_accepts_a_good_cache():
    bf.validate_batch(scored_like(make_traj()), vocab_size=V, where="x")


def _break(name, fn):
    c = scored_like(make_traj())
    c[name] = fn(c[name].clone())
    return c


def _set(idx, value):
    def f(t):
        t[idx] = value
        return t
    return f


@pytest.mark.parametrize("cache_fn, message", [
    (lambda: _break("cu_seqlens", _set(2, 3)),
     "field 'cu_seqlens' in here: must be 1-D, start at 0 and never decrease"),
    (lambda: _break("cu_seqlens", lambda t: t + 1), "field 'cu_seqlens' in here: must be 1-D, start at 0"),
    (lambda: _break("cu_seqlens", _set(-1, 13)), "field 'cu_seqlens' in here: ends at 13"),
    (lambda: _break("token_ids", _set(0, V)), r"field 'token_ids' in here: ids must lie in \[0, 40\)"),
    (lambda: _break("teacher_mc_ids", _set((0, 0), -1)), r"field 'teacher_mc_ids' in here: ids must lie"),
    (lambda: _break("teacher_logp", _set(3, float("nan"))),
     "field 'teacher_logp' in here: non-finite log-prob at row 3"),
    (lambda: _break("mc_teacher_logp", _set((2, 1), float("-inf"))), "field 'mc_teacher_logp' in here: non-finite"),
    (lambda: _break("behavior_logp", _set(0, 0.5)), "field 'behavior_logp' in here: log-prob 0.5 > 0"),
    (lambda: _break("mc_ids", lambda t: torch.cat([(t[:, :1] + 1) % V, t[:, 1:]], 1)),
     r"field 'mc_ids' in here: column 0 must equal token_ids"),
    (lambda: _break("behavior_logp", lambda t: t.double()),
     "field 'behavior_logp' in here: dtype torch.float64, expected a torch.float32 tensor"),
    (lambda: _break("token_ids", lambda t: t.int()), "field 'token_ids' in here: dtype torch.int32"),
    (lambda: _break("mc_teacher_logp", lambda t: t[:, :-1]),
     "field 'mc_teacher_logp' in here: width 5 disagrees with M = 6"),
    (lambda: _break("finished", lambda t: t[:-1]), "field 'finished' in here: shape"),
    (lambda: _break("teacher_topk_logp", lambda t: t.flip(1)), "field 'teacher_topk_logp' in here: must be sorted"),
    (lambda: _break("teacher_topk_ids", lambda t: torch.cat([t[:, :1], t[:, :1], t[:, 2:]], 1)),
     "field 'teacher_topk_ids' in here: top-K ids must be distinct"),
    (lambda: dict(make_traj(), teacher_lgp=torch.zeros(3)), "field 'teacher_lgp' in here: unknown field"),
    (lambda: {k: v for k, v in make_traj().items() if k != "prompt_ids"}, "field 'prompt_ids' in here: missing"),
], ids=["cu_decreasing", "cu_not_from_0", "cu_wrong_end", "id_too_big", "id_negative", "nan_logp", "neg_inf_logp",
        "positive_logp", "mc_col0", "float64", "int32", "width", "B_mismatch", "topk_unsorted", "topk_dup", "unknown",
        "missing"])
def test_validate_rejects(cache_fn, message):
    with pytest.raises(ValueError, match=message):
        bf.validate_batch(cache_fn(), vocab_size=V, where="here")


def test_validate_allows_neg_inf_only_for_topp_behaviour_on_student_support():
    c = make_traj()
    c["student_topk_behavior_logp"][0, -1] = float("-inf")  # outside the top-p nucleus
    bf.validate_batch(c, vocab_size=V)
    c["mc_behavior_logp"][0, -1] = float("-inf")  # but a sampled id can never have b = 0
    with pytest.raises(ValueError, match="mc_behavior_logp"):
        bf.validate_batch(c, vocab_size=V)


def test_bytes_per_token_formula():
    K, Mt = 4, 3
    c = scored_like(make_traj(), K=K, Mt=Mt)
    N, B, sum_P = sum(RESP_LENS), len(RESP_LENS), sum(PROMPT_LENS)
    per_token = 25 + 12 * K + 16 * KS + 16 * M + 12 * Mt
    assert bf.bytes_per_token(c) == pytest.approx(per_token + (8 * sum_P + 25 * B + 16) / N)


# ----------------------------------------------------------------------------- slicing
def assert_equal_cache(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_select_sequences_and_concat_round_trip():
    c = scored_like(make_traj())
    parts = [bf.select_sequences(c, [0, 1]), bf.select_sequences(c, [2]), bf.select_sequences(c, [3])]
    assert_equal_cache(bf.concat(parts), c)
    rev = bf.select_sequences(c, [3, 2, 1, 0])
    bf.validate_batch(rev, vocab_size=V)
    assert_equal_cache(bf.select_sequences(rev, [3, 2, 1, 0]), c)
    one = bf.select_sequences(c, [2])  # the content of one sequence, rebuilt from the packed layout
    assert torch.equal(one["token_ids"], c["token_ids"][c["cu_seqlens"][2]:c["cu_seqlens"][3]])
    assert torch.equal(one["prompt_ids"], c["prompt_ids"][c["prompt_cu_seqlens"][2]:c["prompt_cu_seqlens"][3]])
    assert one["cu_seqlens"].tolist() == [0, RESP_LENS[2]] and one["prompt_index"].tolist() == [12]
    empty = bf.select_sequences(c, [])
    bf.validate_batch(empty, vocab_size=V)
    assert_equal_cache(bf.concat([empty, c]), c)
    with pytest.raises(ValueError, match="indices must lie in"):
        bf.select_sequences(c, [4])
    with pytest.raises(ValueError, match="concat: batch 1 has fields"):
        bf.concat([c, make_traj()])
    with pytest.raises(ValueError, match="field 'mc_ids' of batch 1"):
        bf.concat([c, dict(c, mc_ids=c["mc_ids"][:, :2])])


# ----------------------------------------------------------------------------- disk format
META = {"teacher_fingerprint": "aaaa", "tokenizer_fingerprint": "bbbb", "vocab_size": V, "student_version": 3}


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip_is_bitwise(tmp_path, mmap):
    c = scored_like(make_traj())
    path = tmp_path / "cache.safetensors"
    offline.save(c, path, META)
    back, meta = offline.load(path, mmap=mmap)
    assert_equal_cache(back, c)
    assert {k: meta[k] for k in META} == META
    assert meta["format_version"] == offline.FORMAT_VERSION and meta["fields"] == sorted(c)
    assert meta["widths"] == {"K": 4, "Ks": KS, "M": M, "Mt": 3} and meta["num_tokens"] == sum(RESP_LENS)
    assert os.listdir(tmp_path) == ["cache.safetensors"]  # no tmp file left behind
    with pytest.raises(ValueError, match="meta lacks \\['student_version'\\]"):
        offline.save(c, tmp_path / "x.safetensors", {k: v for k, v in META.items() if k != "student_version"})


def test_truncated_or_corrupt_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "cache.safetensors"
    offline.save(scored_like(make_traj()), path, META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}: truncated, corrupt"):
        offline.load(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=f"{path}: truncated, corrupt"):
        offline.load(path)
    from safetensors.torch import save_file
    save_file({"token_ids": torch.zeros(2, dtype=torch.int64)}, path)  # safetensors, but no asyncopd meta
    with pytest.raises(ValueError, match=f"{path}: truncated, corrupt or not an asyncopd cache"):
        offline.load(path)


def test_chunk_dir_load_equals_concat_and_ignores_tmp_files(tmp_path):
    c = scored_like(make_traj())
    parts = [bf.select_sequences(c, [0]), bf.select_sequences(c, [1, 2]), bf.select_sequences(c, [3])]
    assert offline.finished_chunks(tmp_path / "none") == set()
    for i, (p, first) in enumerate(zip(parts, [0, 1, 3], strict=True)):
        offline.write_chunk(tmp_path, i, p, META, first)
    (tmp_path / "chunk_00003.safetensors.tmp-999").write_bytes(b"half a chunk")  # an interrupted write
    assert offline.finished_chunks(tmp_path) == {0, 1, 2}
    back, meta = offline.load_dir(tmp_path)
    assert_equal_cache(back, c)
    assert meta["num_chunks"] == 3 and meta["num_tokens"] == sum(RESP_LENS) and meta["num_sequences"] == 4
    assert meta["teacher_fingerprint"] == "aaaa" and "chunk_index" not in meta


def test_chunk_dir_refuses_mismatched_meta_and_gaps(tmp_path):
    c = scored_like(make_traj())
    offline.write_chunk(tmp_path, 0, bf.select_sequences(c, [0, 1]), META, 0)
    offline.write_chunk(tmp_path, 1, bf.select_sequences(c, [2, 3]), dict(META, teacher_fingerprint="cccc"), 2)
    with pytest.raises(ValueError, match="chunk_00001.safetensors: meta 'teacher_fingerprint' = 'cccc' "
                                         "but .*chunk_00000.safetensors has 'aaaa'"):
        offline.load_dir(tmp_path)
    offline.write_chunk(tmp_path, 1, bf.select_sequences(c, [2, 3]), META, 2)
    offline.load_dir(tmp_path)  # rewriting the chunk with the right meta fixes it
    offline.write_chunk(tmp_path, 3, bf.select_sequences(c, [0]), META, 4)
    with pytest.raises(ValueError, match=r"chunks \[2\] are missing"):
        offline.load_dir(tmp_path)
    with pytest.raises(ValueError, match="no chunk_"):
        offline.load_dir(tmp_path / "empty")


# ----------------------------------------------------------------------------- transport
def _echo_child(q_in, q_out):
    cache = q_in.get()
    q_out.put((cache, bf.bytes_per_token(cache)))
    q_in.get()  # stay alive until the parent has read the shared-memory tensors


def test_cache_crosses_a_spawn_multiprocessing_queue(tmp_path):
    import torch.multiprocessing as mp
    c = scored_like(make_traj())
    offline.save(c, tmp_path / "c.safetensors", META)
    mapped, _ = offline.load(tmp_path / "c.safetensors", mmap=True)
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_echo_child, args=(q_in, q_out))
    child.start()
    try:
        for sent in (c, mapped):
            q_in.put(sent)
            back, nbytes = q_out.get(timeout=60)
            back = {k: v.clone() for k, v in back.items()}
            q_in.put("done")
            assert_equal_cache(back, c)
            assert nbytes == bf.bytes_per_token(c)
            if sent is c:
                child.join(timeout=60)
                child = ctx.Process(target=_echo_child, args=(q_in, q_out))
                child.start()
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


# ----------------------------------------------------------------------------- identities
def test_fingerprint_tracks_weights_config_and_tokenizer(tmp_path, teacher):
    teacher.save_pretrained(tmp_path / "m")
    fp = offline.fingerprint(tmp_path / "m")
    assert len(fp) == 16 and int(fp, 16) >= 0 and fp == offline.fingerprint(tmp_path / "m")
    from transformers import Qwen2ForCausalLM
    other = Qwen2ForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    other.save_pretrained(tmp_path / "m2")
    assert offline.fingerprint(tmp_path / "m2") != fp
    with pytest.raises(ValueError, match="needs config.json and \\*.safetensors"):
        offline.fingerprint(tmp_path)


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_tokenizer_fingerprint_agrees_between_dir_and_object(tmp_path):
    from transformers import PreTrainedTokenizerFast
    raw = _word_tokenizer(["<unk>", "a", "b", "c"])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="c")
    hf.save_pretrained(tmp_path / "tok")
    fp = tc.tokenizer_fingerprint(tmp_path / "tok")
    assert fp == tc.tokenizer_fingerprint(hf) == tc.tokenizer_fingerprint(raw)
    assert fp == tc.tokenizer_fingerprint(tmp_path / "tok" / "tokenizer.json")
    assert tc.tokenizer_fingerprint(_word_tokenizer(["<unk>", "a", "c", "b"])) != fp
    with pytest.raises(ValueError, match="no tokenizer.json"):
        tc.tokenizer_fingerprint(tmp_path)


def _flip_bit(path, tensor, row, byte, bit):
    """Flip one bit of element `row` of a 1-D float32 tensor inside a safetensors file (byte 3 = sign/exponent)."""
    import json as _json
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = 8 + n + _json.loads(data[8:8 + n])[tensor]["data_offsets"][0]
    data[start + 4 * row + byte] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_flipped_logprob_exponent_is_refused_with_its_path(tmp_path):
    """A flipped exponent bit leaves a finite, negative log-prob that validate_batch() accepts: the checksum sees it."""
    from safetensors.torch import load_file
    c = scored_like(make_traj())
    path = tmp_path / "cache.safetensors"
    offline.save(c, path, META)
    _flip_bit(path, "teacher_logp", 2, 3, 0)  # exponent bit 1: t times 4 or 1/4
    raw = load_file(path)
    assert raw["teacher_logp"][2] != c["teacher_logp"][2]
    bf.validate_batch(raw, vocab_size=V)  # still a plausible cache
    with pytest.raises(ValueError, match=f"{path}: sha256 mismatch"):
        offline.load(path)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in c.items()}, path,
              metadata={"asyncopd": json.dumps(dict(META, format_version=1))})
    with pytest.raises(ValueError, match="format_version 1, this code reads 2: "
                                         "delete the cache and rerun `python asyncopd.py precompute`"):
        offline.load(path)


def test_copied_swapped_or_duplicated_chunks_are_refused_with_the_path(tmp_path):
    c = scored_like(make_traj())
    for i, seqs in enumerate([[0], [1, 2], [3]]):
        offline.write_chunk(tmp_path / "good", i, bf.select_sequences(c, seqs), META, seqs[0])
    chunk = [tmp_path / "good" / f"chunk_{i:05d}.safetensors" for i in range(3)]

    def refused(edit):
        d = tmp_path / edit.__name__
        shutil.copytree(tmp_path / "good", d)
        edit(d)
        with pytest.raises(ValueError) as e:
            offline.load_dir(d)
        return str(e.value)

    def copied(d):  # chunk 2 copied over chunk 1
        shutil.copy(chunk[2], d / chunk[1].name)

    def swapped(d):
        os.replace(d / chunk[0].name, d / "x")
        os.replace(d / chunk[1].name, d / chunk[0].name)
        os.replace(d / "x", d / chunk[1].name)

    def duplicated(d):  # chunk 1 again, as chunk 3
        shutil.copy(chunk[1], d / "chunk_00003.safetensors")

    def first_sequence_edited(d):  # the index lives in the checksummed meta: editing it breaks the sha256
        cache, meta = offline.load(chunk[1])
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in cache.items()}, d / chunk[1].name,
                  metadata={"asyncopd": json.dumps(dict(meta, first_sequence=7))})

    assert (f"{tmp_path}/copied/chunk_00001.safetensors: holds chunk 2 (sequences from 3) "
            "where chunk 1 (sequences from 1)") in refused(copied)
    assert f"{tmp_path}/swapped/chunk_00000.safetensors: holds chunk 1" in refused(swapped)
    assert f"{tmp_path}/duplicated/chunk_00003.safetensors: holds chunk 1" in refused(duplicated)
    assert f"{tmp_path}/first_sequence_edited/chunk_00001.safetensors: sha256 mismatch" \
        in refused(first_sequence_edited)
    offline.load_dir(tmp_path / "good")
