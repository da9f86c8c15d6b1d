"""Task, tokenizer, checkers, prompt loading and the shipped embedded models."""
import importlib.util
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import config
import task
from optional import math_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER, STUDENT = os.path.join(ROOT, "models", "teacher"), os.path.join(ROOT, "models", "student")


def test_solution_format_and_arithmetic():
    assert task.addition_solution(472, 386) == "2+6+0=08;7+8+0=15;4+3+1=08;0+0+0=00>858"
    assert task.addition_solution(9999, 1).endswith("9+0+1=10>10000")
    for a, b in task.addition_problems("train", 200):
        text = task.addition_solution(a, b)
        steps, answer = text.split(">")
        # every column: a_i + b_i + c_i = s_i, and c_{i+1} is the tens digit of s_i
        carry = 0
        for step in steps.split(";"):
            lhs, s = step.split("=")
            da, db, c = map(int, lhs.split("+"))
            assert c == carry and da + db + c == int(s)
            carry = int(s) // 10
        assert int(answer) == a + b and answer == str(int(answer))
        assert len(text) + 1 <= task.MAX_NEW_TOKENS


def test_tokenizer_round_trip_and_autotokenizer(tmp_path):
    tok = task.build_tokenizer()
    text = task.addition_prompt(472, 386) + task.addition_solution(472, 386)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids   # one token per character
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert (loaded.pad_token, loaded.eos_token, loaded.padding_side) == ("<pad>", "<eos>", "left")
    assert loaded.pad_token_id != loaded.eos_token_id
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.get_vocab() == tok.get_vocab()


def test_encode_prompt_renders_raw_or_chat():
    tok = task.build_tokenizer()
    assert tok.decode(task.encode_prompt(tok, "0012+0003=")) == "0012+0003="
    with pytest.raises(ValueError, match="chat needs a chat template but the tokenizer has none: use raw"):
        task.encode_prompt(tok, "0012+0003=", "chat")
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}={% if enable_thinking is false %};{% endif %}{% endif %}")
    assert tok.decode(task.encode_prompt(tok, "0012+0003", "chat")) == "0012+0003="
    assert tok.decode(task.encode_prompt(tok, "0012+0003", "chat_think")) == "0012+0003="
    assert tok.decode(task.encode_prompt(tok, "0012+0003", "chat_no_think")) == "0012+0003=;"
    assert task.encode_prompt(tok, "0012+0003=", "raw") == task.encode_prompt(tok, "0012+0003=")


def test_addition_checker():
    for a, b in [(472, 386), (9999, 9999), (0, 0), (5000, 5000)]:
        truth = task.addition_solution(a, b)
        assert task.check("addition", truth, str(a + b))
        assert not task.check("addition", truth[:-1] + str((int(truth[-1]) + 1) % 10), str(a + b))
        assert not task.check("addition", truth.split(">")[0], str(a + b))   # no final answer
    with pytest.raises(ValueError, match="unknown checker"):
        task.check("nope", "1", "1")


def test_splits_disjoint_and_deterministic():
    train = task.read_prompts("addition", "train", 5000)
    test = task.read_prompts("addition", "test", 1000)
    assert len({r["prompt"] for r in train}) == 5000 and len({r["prompt"] for r in test}) == 1000
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert task.read_prompts("addition", "test", 1000) == test
    assert task.read_prompts("addition", "test", 10) == test[:10]   # a smaller limit is a prefix
    assert all(r["checker"] == "addition" and int(r["answer"]) == sum(map(int, r["prompt"][:-1].split("+")))
               for r in train[:100])
    # the held-out share is about 10% of all problems (binomial, 10k draws: sd 0.003)
    share = sum(task.is_heldout(a, b) for a in range(100) for b in range(100)) / 10000
    assert 0.085 < share < 0.115
    with pytest.raises(ValueError, match="unknown split"):
        task.read_prompts("addition", "validation", 5)


def test_last_boxed_nested():
    assert math_data.last_boxed("a \\boxed{\\{1, \\frac{2}{3}\\}} b") == "\\{1, \\frac{2}{3}\\}"
    assert math_data.last_boxed("no box") is None


def test_addition_never_loads_the_data_set_readers():
    """The default run reads no files: the readers of real data sets (datasets, pyarrow) and their grader
    (math_verify) load only on use."""
    code = "\n".join(["import sys", "import task", "rows = task.read_prompts('addition', 'test', 5)",
                      "assert all(task.check(r['checker'], '>' + r['answer'], r['answer']) for r in rows)",
                      "assert not {'datasets', 'pyarrow', 'math_verify'} & set(sys.modules), 'loaded on import'"])
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_load_prompts_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match="nope.jsonl not found"):
        task.read_prompts(str(missing), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl has no rows"):
        task.read_prompts(str(empty), "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match="needs prompt"):
        task.read_prompts(str(bad), "train")
    with pytest.raises(ValueError, match=".jsonl or .parquet"):
        (tmp_path / "x.csv").write_text("a,b\n")
        task.read_prompts(str(tmp_path / "x.csv"), "train")

    rows = [{"question": "What is 6*7?", "answer": "6*7 = 42\n#### 42"},
            {"question": "Half of 3? Put it in \\boxed{}.", "answer": "#### 1.5"}]
    (tmp_path / "gsm_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = task.read_prompts(str(tmp_path / "gsm_{split}.jsonl"), "test", template=config.Config.prompt_template)
    assert [r["checker"] for r in got] == ["math", "math"]
    assert got[0]["prompt"] == "What is 6*7?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert got[1]["prompt"] == config.Config.prompt_template.replace("{problem}", rows[1]["question"])  # as written
    braces = task.read_prompts(str(tmp_path / "gsm_{split}.jsonl"), "test", template="Q {problem} \\boxed{} {x}")
    assert braces[0]["prompt"] == "Q What is 6*7? \\boxed{} {x}"  # LaTeX braces stay (no str.format)
    assert task.read_prompts(str(tmp_path / "gsm_{split}.jsonl"), "test")[0]["prompt"] == "What is 6*7?"
    assert task.check("math", "\\boxed{42}", got[0]["answer"]) and task.check("math", "\\boxed{3/2}", got[1]["answer"])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm.parquet")
    assert task.read_prompts(str(tmp_path / "gsm.parquet"), "train", 1, config.Config.prompt_template) == got[:1]
    pq.write_table(pa.Table.from_pylist(rows).slice(0, 0), tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="none.parquet has no rows"):
        task.read_prompts(str(tmp_path / "none.parquet"), "train")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets():
    with pytest.raises(ValueError, match="pip install datasets"):
        task.read_prompts("hf:openai/gsm8k:main", "test")


def test_shipped_models():
    from optional.offline import fingerprint  # the same hash the pipeline's teacher guard uses
    models = {}
    for d in (TEACHER, STUDENT):
        assert os.path.getsize(os.path.join(d, "model.safetensors")) <= 10 * 2**20
        models[d] = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.get_vocab() == task.build_tokenizer().get_vocab()
        assert models[d].config.vocab_size == len(tok)
        assert models[d].generation_config.eos_token_id == tok.eos_token_id
    count = {d: sum(p.numel() for p in m.parameters()) for d, m in models.items()}
    assert count[STUDENT] < count[TEACHER]
    with open(os.path.join(STUDENT, "asyncopd_sft.json")) as f:
        info = json.load(f)
    assert info["teacher_fingerprint"] == fingerprint(TEACHER)
    assert info["accuracy"] <= 0.5
    # the teacher really solves held-out problems greedily (it scored >= 0.95 on 500)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TEACHER)
    assert task.evaluate(models[TEACHER], tok, task.read_prompts("addition", "test", 40)) >= 0.9
