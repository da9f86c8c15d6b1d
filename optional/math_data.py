"""Real data sets: prompt files and the \\boxed{} grader.

task.read_prompts reads any data source other than "addition" here, and task.check grades a "math" row here. Rows from
GSM8K, MATH, DeepMath and the like become the user turn of the config's prompt_template (the AsyncOPD paper's asks for
the answer in \\boxed{}) and are graded by check_math: the response's last \\boxed{} against the reference, compared
by math-verify (HuggingFace's answer verifier, on sympy), so that 1/\\sqrt{2} = \\sqrt{2}/2, \\pi/2 = \\frac{\\pi}{2},
x=3 = 3 and 0.5 = \\frac{1}{2}. math-verify is an optional package (requirements-test.txt, requirements-gpu.txt; not
requirements.txt): the addition task never imports it, and preflight refuses a run on a real data set without it
(check_grader).
"""
import functools
import importlib.util
import json
import os
import re
import threading

DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)\\[,;: ](?=\d{3}(?!\d))")  # 1\,234 and 1\ 234: a thousands separator


# ----------------------------------------------------------------------------- prompt files

def read_rows(source: str, split: str = "train", limit: int | None = None, template: str = "{problem}"
              ) -> list[dict]:
    """Rows {"prompt", "answer", "checker": "math"}, the prompt being `template` with {problem} replaced by the row's
    problem text (str.format would trip over LaTeX braces), from
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
    rows = [_math_row(r, f"{where} row {n}", template) for n, r in enumerate(records, 1)]
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


def _math_row(record: dict, where: str, template: str) -> dict:
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
    return {"prompt": template.replace("{problem}", prompt), "answer": str(answer), "checker": "math"}


# ----------------------------------------------------------------------------- the \boxed{} grader

GRADER = "math-verify"  # HuggingFace's answer verifier (sympy underneath): requirements-test.txt / -gpu.txt pin it
INSTALL = "pip install math-verify==0.9.0"
# Seconds math-verify may spend parsing one answer, and comparing two parsed answers, before the response counts as
# wrong. Its limit is a SIGALRM, which interrupts sympy (comparing 9^{9^{9}} with 3 never finishes otherwise) but works
# only in a main thread: where this project grades (task.evaluate, in the main thread of the rollout or teacher child
# or of the command). Ordinary answers take milliseconds; 2 s (its default is 5) bounds an evaluation in which a model
# boxes huge expressions: a check makes 2 parses and 1 sympy comparison that can run long.
TIMEOUT_S = 2


def check_grader() -> None:
    """A run on a real data set grades with math-verify: refuse it before any process starts if that is missing."""
    if importlib.util.find_spec("math_verify") is None:
        raise ValueError(f"the math checker of real data sets (data, eval_data) needs {GRADER}, not installed here: "
                         f"`{INSTALL}`, or run the addition task")


@functools.cache
def _math_verify():
    """The math_verify module and its \\boxed{} extraction config, imported on first use: the addition task never
    loads it."""
    try:
        import math_verify
    except ImportError:
        raise ModuleNotFoundError(f"the math checker needs {GRADER}: `{INSTALL}`") from None
    # the answer comes as one \boxed{...} (see _parse): read just that, not an unboxed "answer: 5" or $5$ elsewhere
    return math_verify, [math_verify.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} not inside another one (braces matched); None if there is none, if the last
    \\boxed has no brace, or if it is cut off (unbalanced)."""
    content, i = None, 0
    while (start := text.find("\\boxed", i)) >= 0:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            content = None  # "\boxed 5": not a box we read; an earlier box does not stand in for it
            continue
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
        else:
            return None  # the response was cut off inside the box
        content, i = text[i + 1:j], j + 1  # a box nested in this one is skipped: the outer one is the answer
    return content


def _parse(answer: str, timeout: int | None) -> list:
    """math-verify's reading of one answer (sympy objects, then the normalised string): given as a single \\boxed{}, the
    form it extracts best, so it applies its normalisation (\\text, units, \\left/\\right, \\dfrac, thousands commas,
    percent, degrees) and its LaTeX parser. A box nested inside is decoration: its braces stay, the command goes."""
    mv, config = _math_verify()
    answer = DIGIT_GROUP_SPACE.sub("", answer.replace("\\boxed", ""))  # math-verify 0.9.0 reads 1\,234 as 1 + 234
    return mv.parse("\\boxed{" + answer + "}", config, parsing_timeout=timeout)


def check_math(response: str, answer: str) -> bool:
    """Is the response's last \\boxed{} equivalent to the reference (the text after '####' of a GSM8K solution, the
    last \\boxed{} of a MATH-style solution, or a bare answer), as math-verify decides (numbers, fractions, surds, pi,
    equations x=3 vs 3, sets, intervals)?

    A response without a \\boxed{} is wrong, with no fallback to its last number: the prompt asks for the box, and a
    fallback would grade an intermediate number the model never gave as its answer (and reward ignoring the format)."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    elif "\\boxed" in answer:
        answer = last_boxed(answer) or answer
    got = last_boxed(response)
    if got is None or not got.strip() or not answer.strip():
        return False
    # the signal-based limit raises off the main thread; there math-verify runs without one (a pathological answer
    # could then hang that thread): nothing in this project grades there
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    mv, _ = _math_verify()
    return mv.verify(_parse(answer, timeout), _parse(got, timeout), timeout_seconds=timeout)  # gold first
