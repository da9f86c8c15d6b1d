"""The prompts as each model sees them, checked before any process starts (runtime/preflight.py calls these): a chat
template the model can render as the config asks, and prompts that keep every character and fit max_prompt_len."""
from transformers import PreTrainedTokenizerBase

import task
from config import Config


def check_template(tokenizer: PreTrainedTokenizerBase, template: str, key: str, where: str) -> None:
    """The model's tokenizer can render `template` (task.TEMPLATES): a chat template, one that reads enable_thinking
    for chat_think / chat_no_think (else the setting would change nothing, without a word), and for the student one
    whose assistant turn ends with the tokenizer's eos_token, the only token the rollout stops on (a Qwen3-Base
    tokenizer names <|endoftext|> while its template closes a turn with <|im_end|>: responses would run on)."""
    if template == "raw":
        return
    if tokenizer.chat_template is None:
        raise ValueError(f"{key}={template}: the tokenizer of {where} has no chat template: use {key}=raw "
                         "(base models), or a tokenizer with one")
    if template in ("chat_think", "chat_no_think"):
        on, off = (task.render_prompt(tokenizer, "1+1?", t) for t in ("chat_think", "chat_no_think"))
        if on == off:
            raise ValueError(f"{key}={template}: the chat template of {where} ignores enable_thinking: use {key}=chat")
    if key == "student_template":
        turn = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content":
                                              "\u00a7"}], tokenize=False, **task.TEMPLATES[template])
        after = tokenizer(turn[turn.rindex("\u00a7") + 1:], add_special_tokens=False)["input_ids"]
        if after and after[0] != tokenizer.eos_token_id:
            end = tokenizer.convert_ids_to_tokens(after[0])
            raise ValueError(f"{key}={template}: the chat template of {where} ends the assistant's turn with {end!r} "
                             f"but its eos_token, the only token the rollout stops on, is {tokenizer.eos_token!r}: set "
                             f"eos_token to {end!r} in its tokenizer_config.json, or use {key}=raw")


def check_prompts(cfg: Config, rows: list[dict], where: str, tokenizers: dict) -> None:
    """Every prompt as each model sees it (tokenizers: {row field: its tokenizer}, task.prepare_prompts' "ids" and
    "teacher_ids") has a token, fits max_prompt_len and keeps every character: a tokenizer without <unk> silently skips
    what it cannot spell ('１２+３４=' -> '+='), so text it cannot represent is refused, not dropped."""
    for field, tok in tokenizers.items():
        known = set()  # characters found representable
        for i, row in enumerate(rows):
            if field not in row or (field != "ids" and row[field] is row["ids"]):  # checked as the student's
                continue
            ids, text = row[field], row["prompt"]
            at = f"{where} row {i + 1}{'' if field == 'ids' else ' (as the teacher renders it)'}: prompt {text[:40]!r}"
            if not ids:
                raise ValueError(f"{at} encodes to no tokens: give it some text")
            if len(ids) > cfg.max_prompt_len:
                raise ValueError(f"{at} has {len(ids)} tokens > max_prompt_len={cfg.max_prompt_len}: raise "
                                 "max_prompt_len or filter the data set")
            lost = []
            for ch in sorted(set(text) - known):  # each new character alone: whitespace may vanish, nothing else may
                one = tok(ch, add_special_tokens=False)["input_ids"]
                if ch.isspace() or (one and tok.unk_token_id not in one):
                    known.add(ch)
                else:
                    lost.append(ch)
            if lost or (tok.unk_token_id is not None and tok.unk_token_id in ids):
                chars = f" {''.join(lost)!r}" if lost else ""  # none alone: only in context (the chat template's)
                raise ValueError(f"{at} has characters{chars} outside the tokenizer's vocabulary: remove them, or use "
                                 "a tokenizer that covers this data set")
