"""Prompts, tokenizer, answer checkers and greedy evaluation.

The embedded task is multi-digit addition written out column by column. For
"0472+0386=" the response is

    2+6+0=08;7+8+0=15;4+3+1=08;0+0+0=00>858<eos>

Step i (least significant digit first) shows digit a_i, digit b_i, the carry-in
c_i and the two-digit column sum s_i = a_i + b_i + c_i; its first digit is the
carry-out c_{i+1}, its second the answer digit. After '>' comes the answer
without leading zeros. 43 tokens with DIGITS = 4, so generation dominates the
step time, as it does for real reasoning models.

Real data sets (GSM8K, MATH, DeepMath) come in through read_prompts and are graded by the "math" checker: both
live in optional/math_data.py. prepare_prompts() gives a run its train and eval prompts, tokenized.
"""
import hashlib
import random

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

import rollout
from config import Config
from optional import math_data

DIGITS = 4                      # operand width; operands are zero-padded to it
MAX_NEW_TOKENS = 48             # longest response is 4*8 + 3 + 1 + 5 + <eos> = 42 tokens
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
TASK_CHARS = list("0123456789+=;>")
SPLIT_SEEDS = {"train": 1234, "test": 5678}
DEFAULT_LIMIT = {"train": 20000, "test": 10000}  # problems per split; eval_size is at most the held-out one


# ----------------------------------------------------------------------------- addition task

def is_heldout(a: int, b: int) -> bool:
    """A problem belongs to the held-out split iff sha256("a+b") mod 10 == 0 (10% of all pairs),
    so the two splits never share a problem whatever the seed or size."""
    return int(hashlib.sha256(f"{a}+{b}".encode()).hexdigest()[:8], 16) % 10 == 0


def addition_prompt(a: int, b: int) -> str:
    """The prompt of a + b, e.g. 0472+0386=."""
    return f"{a:0{DIGITS}d}+{b:0{DIGITS}d}="


def addition_solution(a: int, b: int) -> str:
    """The written column addition (without <eos>); see the module docstring."""
    steps, carry = [], 0
    for i in range(DIGITS):
        da, db = (a // 10**i) % 10, (b // 10**i) % 10
        s = da + db + carry
        steps.append(f"{da}+{db}+{carry}={s:02d}")
        carry = s // 10
    return ";".join(steps) + ">" + str(a + b)


def addition_problems(split: str, n: int) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs of the split, drawn by a seeded RNG (same list every call)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_SEEDS)}")
    rng, seen, out = random.Random(SPLIT_SEEDS[split]), set(), []
    while len(out) < n:
        a, b = rng.randrange(10**DIGITS), rng.randrange(10**DIGITS)
        if is_heldout(a, b) == (split == "test") and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one WordLevel token per task character, plus <pad>, <eos>, <unk>. Pads on the left,
    as batched generation needs; save_pretrained(dir) makes it loadable by AutoTokenizer.from_pretrained(dir)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + TASK_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char a word
    tok.decoder = decoders.Fuse()                                              # join without spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- prompt data

def read_prompts(source: str, split: str = "train", limit: int | None = None, template: str = "{problem}"
                 ) -> list[dict]:
    """Rows {"prompt", "answer", "checker"}: "addition" is the built-in task (seeded; limit None ->
    DEFAULT_LIMIT[split]); any other source is a real data set, read by math_data.read_rows
    (a .jsonl / .parquet file or "hf:NAME[:config]"), its problems put in `template`, graded by the "math" checker."""
    if source != "addition":
        return math_data.read_rows(source, split, limit, template)
    pairs = addition_problems(split, limit if limit is not None else DEFAULT_LIMIT[split])
    return [{"prompt": addition_prompt(a, b), "answer": str(a + b), "checker": "addition"} for a, b in pairs]


def prepare_prompts(cfg: Config, tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase | None = None
                    ) -> tuple[list[dict], list[dict]]:
    """A run's train and eval prompts, each row with the student's token ids ("ids", student_template) and, given the
    teacher's tokenizer, the teacher's ("teacher_ids", teacher_template; the same list where they agree). Checked by
    runtime/preflight.py (lengths, text the tokenizer cannot spell)."""
    train = read_prompts(cfg.data, "train", None, cfg.prompt_template)
    evals = read_prompts(cfg.eval_data or cfg.data, "test", cfg.eval_size, cfg.prompt_template) if cfg.eval_size else []
    views = [("ids", tok, cfg.student_template)] + ([("teacher_ids", teacher_tok, cfg.teacher_template)]
                                                    if teacher_tok is not None else [])
    for rows in (train, evals):
        for field, tokenizer, template in views:
            texts = [render_prompt(tokenizer, r["prompt"], template) for r in rows]
            for row, ids in zip(rows, _encode_batch(tokenizer, texts) if rows else [], strict=True):
                row[field] = row["ids"] if ids == row.get("ids") else ids
    return train, evals


def _encode_batch(tok, texts):
    """Token ids of many texts in one call: 0.2 s for the 20k addition prompts, against 1.2 s row by row (the
    fast tokenizer's Rust backend directly; transformers' own batched call spends 0.5 s converting its output)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # a tokenizer without a Rust backend
        return tok(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


TEMPLATES = {"raw": None, "chat": {}, "chat_think": {"enable_thinking": True},
             "chat_no_think": {"enable_thinking": False}}  # student_/teacher_template -> the chat template's kwargs


def render_prompt(tokenizer: PreTrainedTokenizerBase, text: str, template: str = "raw") -> str:
    """The text a model is given: the prompt as is ("raw"), or one user turn in the tokenizer's chat template followed
    by the assistant's generation prompt (see TEMPLATES)."""
    if TEMPLATES[template] is None:
        return text
    if tokenizer.chat_template is None:
        raise ValueError(f"{template} needs a chat template but the tokenizer has none: use raw for base models")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False, **TEMPLATES[template])


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, template: str = "raw") -> list[int]:
    """Prompt token ids of render_prompt(tokenizer, text, template) (no special tokens added)."""
    return tokenizer(render_prompt(tokenizer, text, template), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- checkers

def check_addition(response: str, answer: str) -> bool:
    """Correct iff the text after the last '>' is exactly the sum."""
    return ">" in response and response.rsplit(">", 1)[1].strip() == answer.strip()


CHECKERS = ("addition", "math")


def check(checker: str, response_text: str, answer: str) -> bool:
    """Is response_text a correct answer, by `checker` (\"addition\" or \"math\")?"""
    if checker == "addition":
        return check_addition(response_text, answer)
    if checker == "math":
        return math_data.check_math(response_text, answer)
    raise ValueError(f"unknown checker {checker!r}; use one of {sorted(CHECKERS)}")


# ----------------------------------------------------------------------------- evaluation

def pass_rates(model: rollout.Engine | PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[dict], *,
               samples: int = 1, greedy: bool = True, temperature: float = 1.0, batch_size: int = 250,
               max_new_tokens: int = MAX_NEW_TOKENS, ids_field: str = "ids") -> list[float]:
    """Per prompt, the fraction of its `samples` responses graded correct: greedy decoding, or samples drawn at the
    engine's temperature (Avg@k, the AsyncOPD paper's evaluation: k = 32 at T = 1). `model` is a rollout engine
    (rollout.make_engine: transformers or vLLM) or a transformers model, wrapped in one (at `temperature`). Each row's
    prompt is its ids_field ("teacher_ids": the teacher's rendering), else its raw text."""
    engine = model if hasattr(model, "policy_version") else rollout.make_engine(
        model, device=next(model.parameters()).device, max_new_tokens=max_new_tokens, temperature=temperature,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    generator, rates = torch.Generator(engine.device).manual_seed(0), []  # the same draws at every evaluation
    for i in range(0, len(prompts), max(1, batch_size // samples)):
        rows = [r for r in prompts[i:i + max(1, batch_size // samples)] for _ in range(samples)]
        ids = [r.get(ids_field) or encode_prompt(tokenizer, r["prompt"]) for r in rows]
        traj = engine.generate(ids, list(range(len(rows))), engine.policy_version, greedy=greedy, generator=generator)
        cu = traj["cu_seqlens"].tolist()
        texts = tokenizer.batch_decode([traj["token_ids"][cu[j]:cu[j + 1]].tolist() for j in range(len(rows))],
                                       skip_special_tokens=True)
        correct = [check(r["checker"], t, r["answer"]) for r, t in zip(rows, texts, strict=True)]
        rates += [sum(correct[j:j + samples]) / samples for j in range(0, len(rows), samples)]
    return rates


def avg_at_k(rates: list[float]) -> dict:
    """{"accuracy": mean pass rate (Avg@k), "accuracy_se": its standard error over the prompts}."""
    n, mean = len(rates), sum(rates) / max(1, len(rates))
    se = (sum((r - mean) ** 2 for r in rates) / (n - 1) / n) ** 0.5 if n > 1 else 0.0
    return {"accuracy": mean, "accuracy_se": se}


def evaluate(model: rollout.Engine | PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[dict],
             **kwargs) -> float:
    """Mean pass rate over the prompts (pass_rates' keywords; greedy by default)."""
    return avg_at_k(pass_rates(model, tokenizer, prompts, **kwargs))["accuracy"]
