"""Real data sets: prompt files and the \\boxed{} grader.

task.read_prompts reads any data source other than "addition" here, and task.check grades a "math" row here. Rows from
GSM8K, MATH, DeepMath and the like get MATH_INSTRUCTION appended (unless they already ask for \\boxed{}) and are
graded by check_math.
"""
import json
import os
import re
from fractions import Fraction

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


# ----------------------------------------------------------------------------- prompt files

def read_rows(source: str, split: str = "train", limit: int | None = None) -> list[dict]:
    """Rows {"prompt", "answer", "checker": "math"} from
    - a .jsonl / .parquet path (fields prompt|question|problem and answer|final_answer|solution;
      "{split}" in the path is replaced by split),
    - "hf:NAME[:config]": a Hugging Face dataset split (needs `datasets` and network)."""
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{source} needs the datasets library: `pip install datasets` "
                             "(and network access), or pass a local .jsonl/.parquet file") from None
        name, _, config = source[3:].partition(":")
        records, where = list(datasets.load_dataset(name, config or None, split=split)), source
    else:
        where = source.replace("{split}", split)
        records = _read_file(where)
    if not records:
        raise ValueError(f"{where} has no rows; point it at a non-empty data set")
    rows = [_math_row(r, f"{where} row {n}") for n, r in enumerate(records, 1)]
    return rows if limit is None else rows[:limit]


def _read_file(where: str) -> list:
    if not os.path.isfile(where):
        raise ValueError(f"prompt file {where} not found; pass an existing .jsonl/.parquet "
                         "file, 'addition', or 'hf:NAME[:config]'")
    if where.endswith(".jsonl"):
        records = []
        with open(where, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    records += [json.loads(line)] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where} line {n}: not valid JSON ({e.msg}, column {e.colno}): "
                                     "fix or remove that line") from None
        return records
    if where.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.read_table(where).to_pylist()
        except Exception as e:  # pyarrow's own error types
            raise ValueError(f"{where}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    raise ValueError(f"prompt file {where} must end in .jsonl or .parquet")


def _math_row(record: dict, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not an object with prompt and answer fields")
    prompt = next((record[k] for k in ("prompt", "question", "problem") if k in record), None)
    answer = next((record[k] for k in ("answer", "final_answer", "solution") if k in record), None)
    if prompt is None or answer is None:
        raise ValueError(f"{where} has fields {sorted(record)}; it needs prompt|question|"
                         "problem and answer|final_answer|solution")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):  # chat-formatted: the last message's text
        prompt = prompt[-1].get("content")
    if not isinstance(prompt, str) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: the prompt must be text (or chat messages) and the answer text or a number, "
                         f"got {type(prompt).__name__} and {type(answer).__name__}")
    if "boxed" not in prompt:
        prompt = prompt + MATH_INSTRUCTION
    return {"prompt": prompt, "answer": str(answer), "checker": "math"}


# ----------------------------------------------------------------------------- the \boxed{} grader

def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, matching nested braces; None if there is none."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: the response was cut off inside the box


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
                     ("%", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    return s.replace(" ", "").rstrip(".")


def _as_number(s: str) -> Fraction | None:
    """Exact value of "42", "-3.50", "1,234", "3/4", "\\frac{3}{4}", "-\\frac34"; None otherwise."""
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # thousands separators only, never "1,2" (a tuple)
    m = re.fullmatch(r"(-?)\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        return Fraction(s) if re.fullmatch(r"-?\d*\.?\d+(e-?\d+)?", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def check_math(response: str, answer: str) -> bool:
    """Last \\boxed{} of the response vs the reference (text after '####' for GSM8K, its last
    \\boxed{} for MATH-style solutions): equal as exact numbers when both parse, else equal as
    normalised strings."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    elif "\\boxed" in answer:
        answer = last_boxed(answer) or answer
    got = last_boxed(response)
    if got is None:
        return False
    got, want = _normalise(got), _normalise(answer)
    x, y = _as_number(got), _as_number(want)
    if x is not None and y is not None:
        return x == y
    return got == want
