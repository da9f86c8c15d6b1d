"""Prompts per model: the problem in prompt_template, then each model's own rendering (student_template,
teacher_template); what task.prepare_prompts gives each model and what preflight refuses. The tiny teacher's tokenizer
has a chat template (conftest.TEACHER_CHAT_TEMPLATE), the student's has none: they differ only in that. The teacher's
scores after its own rendering are checked against float64 in test_teacher_cache.py, and a pipeline run that uses it
against the reference loop in test_pipeline.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import config
import task
from conftest import ROOT, merged
from runtime import preflight


def inputs(tiny_models, tmp_path, *overrides):
    student, teacher = tiny_models
    base = [f"student={student}", f"teacher={teacher}", f"out_dir={tmp_path}", "eval_size=5"]
    return preflight.check_inputs(config.load_config(None, merged(base, overrides)))


def refused(tiny_models, tmp_path, *overrides):
    with pytest.raises(ValueError) as e:
        inputs(tiny_models, tmp_path, *overrides)
    return str(e.value)


def with_tokenizer(model_dir, tmp_path, name, tokenizer):
    """A copy of model_dir's weights with another tokenizer."""
    path = tmp_path / name
    shutil.copytree(model_dir, path)
    for f in os.listdir(path):
        if f.startswith(("tokenizer", "chat_template", "special_tokens")):
            os.remove(path / f)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("template,suffix", [("raw", None), ("chat", ">"), ("chat_think", ">"),
                                             ("chat_no_think", ">;")])
def test_each_model_reads_the_prompt_in_its_own_rendering(tiny_models, tmp_path, template, suffix):
    tok, train, evals = inputs(tiny_models, tmp_path, f"teacher_template={template}")
    for row in train[:50] + evals:
        assert tok.decode(row["ids"]) == row["prompt"]  # the student: raw
        if suffix is None:  # the same rendering: one list, nothing to rebuild per unit
            assert row["teacher_ids"] is row["ids"]
        else:
            assert tok.decode(row["teacher_ids"]) == row["prompt"] + suffix


def test_prompt_template_puts_the_problem_in_the_users_turn(tiny_models, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": "4"}\n')
    data = [f"data={tmp_path / 'd.jsonl'}", "batch_size=2", "eval_size=2"]
    tok, train, evals = inputs(tiny_models, tmp_path, *data, "prompt_template=0{problem}=", "teacher_template=chat")
    assert [(tok.decode(r["ids"]), tok.decode(r["teacher_ids"])) for r in train] == [("01+1=", "01+1=>"),
                                                                                   ("02+2=", "02+2=>")]
    msg = refused(tiny_models, tmp_path, *data)  # the paper's template, in English: the addition alphabet lacks it
    assert msg.startswith(f"{tmp_path / 'd.jsonl'} row 1: prompt '1+1\\nPlease reason step by step, and put ' has "
                          "characters ',.P\\\\abdefhilnoprstuwxy{}' outside the tokenizer's vocabulary")


def test_templates_a_model_cannot_render_are_refused_before_start(tiny_models, tmp_path):
    student, teacher = tiny_models
    assert refused(tiny_models, tmp_path, "student_template=chat") == (
        f"student_template=chat: the tokenizer of {student} has no chat template: use student_template=raw (base "
        "models), or a tokenizer with one")
    assert refused(tiny_models, tmp_path, "teacher_template=chatml") == (
        "teacher_template='chatml': use one of raw, chat, chat_think, chat_no_think")
    deaf = AutoTokenizer.from_pretrained(teacher)  # a chat template without the enable_thinking switch
    deaf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}>"
    deaf_dir = with_tokenizer(teacher, tmp_path, "deaf", deaf)
    assert refused(tiny_models, tmp_path, f"teacher={deaf_dir}", "teacher_template=chat_no_think") == (
        f"teacher_template=chat_no_think: the chat template of {deaf_dir} ignores enable_thinking: use "
        "teacher_template=chat")
    inputs(tiny_models, tmp_path, f"teacher={deaf_dir}", "teacher_template=chat")  # plain chat is fine
    assert refused(tiny_models, tmp_path, "teacher_template=chat", "max_prompt_len=10").startswith(
        "addition row 1 (as the teacher renders it): prompt ")  # 10 tokens for the student, 11 for the teacher
    assert "has 11 tokens > max_prompt_len=10" in refused(tiny_models, tmp_path, "teacher_template=chat",
                                                          "max_prompt_len=10")
    chatty = AutoTokenizer.from_pretrained(student)  # a student whose template closes a turn with ';', not <eos>
    chatty.chat_template = ("{% for m in messages %}{{ m['content'] }};{% endfor %}"
                            "{% if add_generation_prompt %}>{% endif %}")
    chatty_dir = with_tokenizer(student, tmp_path, "chatty", chatty)
    assert refused(tiny_models, tmp_path, f"student={chatty_dir}", "student_template=chat") == (
        f"student_template=chat: the chat template of {chatty_dir} ends the assistant's turn with ';' but its "
        "eos_token, the only token the rollout stops on, is '<eos>': set eos_token to ';' in its "
        "tokenizer_config.json, or use student_template=raw")
    chatty.chat_template = chatty.chat_template.replace(";", "<eos>")  # a turn ends with EOS: the rollout stops there
    tok, train, _ = inputs(tiny_models, tmp_path, f"student={with_tokenizer(student, tmp_path, 'ok', chatty)}",
                           "student_template=chat")
    assert tok.decode(train[0]["ids"]) == train[0]["prompt"] + "<eos>>"
    assert refused(tiny_models, tmp_path, "prompt_template='Q: {question}'") == (
        "prompt_template='Q: {question}' has no {problem}: write where it goes")
    assert refused(tiny_models, tmp_path, "prompt_template='{problem}?'") == (
        "prompt_template is read for real data sets only; the addition task has its own prompts: drop "
        "prompt_template, or set data to a .jsonl/.parquet file")


def test_a_teacher_whose_token_ids_differ_is_refused(tiny_models, tmp_path):
    """The teacher scores the student's response token ids: a tokenizer that spells them differently is refused, even
    with the same size (here '0' and '1' swap ids)."""
    vocab = {t: i for i, t in enumerate(task.SPECIAL_TOKENS + task.TASK_CHARS)}
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.Split(Regex("."), behavior="isolated"), decoders.Fuse()
    swapped = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    other = with_tokenizer(tiny_models[1], tmp_path, "swapped", swapped)
    assert refused(tiny_models, tmp_path, f"teacher={other}").startswith(
        f"tokenizer mismatch: student {tiny_models[0]} (17 tokens) vs teacher {other} (17 tokens)")


def test_the_teacher_is_evaluated_on_its_own_rendering(tmp_path):
    """The run's teacher evaluation reads "teacher_ids": the shipped teacher (>= 90% on the raw prompts) given a chat
    template that writes the prompt backwards fails nearly every problem."""
    student, teacher = os.path.join(ROOT, "models", "student"), os.path.join(ROOT, "models", "teacher")
    backwards = AutoTokenizer.from_pretrained(teacher)
    backwards.chat_template = "{% for m in messages %}{{ m['content'][::-1] }}{% endfor %}"
    other = with_tokenizer(teacher, tmp_path, "backwards", backwards)
    accuracy = {}
    for template in ("raw", "chat"):
        cmd = [sys.executable, os.path.join(ROOT, "asyncopd.py"), "train", f"student={student}", f"teacher={other}",
               f"out_dir={tmp_path}", f"run_name={template}", f"teacher_template={template}", "steps=1",
               "batch_size=4", "eval_size=40", "progress=false", "threads=1"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        with open(os.path.join(tmp_path, template, "metrics.jsonl")) as f:
            accuracy[template] = next(r["accuracy"] for r in map(json.loads, f) if r["kind"] == "teacher_eval")
    assert accuracy["raw"] >= 0.9 and accuracy["chat"] <= 0.1, accuracy
