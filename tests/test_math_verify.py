"""The "math" checker graded by math-verify (issue #21): equivalent and non-equivalent answers through the real
task.check, the last-\\boxed{} rule, the time limit, grading off the main thread, and a missing package refused in
one line (by preflight before any process starts, and by the checker itself, never a fallback)."""
import importlib.util
import sys
import threading
import time

import pytest

import config
import task
from optional import math_data
from runtime import preflight

GSM8K = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### "
MATH = "Rationalising, the answer is $\\boxed{{{}}}$."  # a MATH-style solution: the reference is its last box

CASES = [
    # equivalent forms: what the old regex/Fraction checker got wrong (issue #21)
    ("\\boxed{1/\\sqrt{2}}", "\\sqrt{2}/2", True),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),
    ("\\boxed{x=3}", "3", True),                                    # an assignment vs its value
    ("\\boxed{3}", "x = 3", True),
    ("\\boxed{e^{2}}", "e^2", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{1+x^{2}}", "x^2+1", True),
    ("\\boxed{x^2-1}", "(x-1)(x+1)", True),
    # fractions and decimals
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("\\boxed{42.0}", "42", True),
    # sets and intervals
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", True),                     # a set's order does not matter
    ("\\boxed{\\left[0, 1\\right)}", "[0,1)", True),
    ("\\boxed{x \\in [0, 1)}", "[0,1)", True),
    # units and text around the number, as math-verify decides: a unit after the number is dropped, a number inside
    # \text{} is not read
    ("\\boxed{3\\text{ cm}}", "3", True),
    ("\\boxed{\\text{3 cm}}", "3", False),
    ("\\boxed{\\$18}", "18", True),
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{\\text{(B)}}", "(B)", True),
    ("\\boxed{\\text{Monday}}", "Monday", True),
    # which box: the last one not inside another; a box nested in it is decoration
    ("The answer is \\boxed{\\frac{1}{\\boxed{2}}}.", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{\\boxed{3}}}", "3", False),
    ("first \\boxed{1}, then \\boxed{2}", "2", True),
    ("first \\boxed{1}, then \\boxed{2}", "1", False),
    # GSM8K references ('#### N', thousands separators) and MATH-style references (their last \boxed{})
    ("so she sold \\boxed{72} clips", GSM8K + "72", True),
    ("\\boxed{1234}", GSM8K + "1,234", True),
    ("\\boxed{1,234}", "#### 1234", True),
    ("\\boxed{1235}", GSM8K + "1,234", False),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", MATH.format("\\frac{1}{\\sqrt{3}}"), True),
    ("\\boxed{10000}", MATH.format("10,\\!000"), True),
    ("\\boxed{1{,}234}", "1234", True),
    ("\\boxed{1\\,234}", "1234", True),  # a thin-space thousands separator (math-verify alone: 1 + 234)
    ("\\boxed{1\\ 234\\,567}", "1234567", True),
    ("\\boxed{1\\,234}", "235", False),
    ("\\boxed{1\\,23}", "123", False),  # not a group of three digits: left to math-verify
    # not equivalent
    ("\\boxed{2}", "3", False),
    ("\\boxed{\\sqrt{2}}", "2", False),
    ("\\boxed{x=3}", "4", False),
    ("\\boxed{y=3}", "x=3", False),
    ("\\boxed{\\frac{1}{2}}", "2", False),
    ("\\boxed{2x}", "2y", False),
    ("\\boxed{0.33}", "\\frac{1}{3}", False),                       # rounded, not equal
    ("\\boxed{[0,1]}", "[0,1)", False),
    ("\\boxed{(2,1)}", "(1,2)", False),
    ("\\boxed{1,2}", "12", False),                                  # a pair, not a thousands separator
    ("\\boxed{(A)}", "(B)", False),
    # no answer: no box (no fallback to the last number), an empty box, a cut-off box, an unreadable reference
    ("so the answer is 42", "42", False),
    ("\\boxed{}", "42", False),
    ("\\boxed{ }", "0", False),
    ("\\boxed{42", "42", False),
    ("\\boxed{42} ... \\boxed 43", "42", False),                    # the last \boxed has no brace: no answer
    ("\\boxed{42}", "", False),
    # from the earlier regex checker's table (tests/test_task.py), still true under math-verify
    ("so the answer is \\boxed{42}.", "42", True),
    ("\\boxed{42.0}", "Natalia sold 48/2 = 24 clips ... #### 42", True),
    ("\\boxed{43}", "#### 42", False),
    ("#### 42", "#### 42", False),                                 # no \boxed in the response
    ("\\boxed{1,234}", "1234", True),
    ("\\boxed{1,234,567.5}", "1234567.50", True),
    ("\\boxed{\\frac{3}{4}}", "3/4", True),
    ("\\boxed{0.75}", "\\dfrac{3}{4}", True),
    ("\\boxed{3/4}", "0.74", False),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}", True),  # nested braces, string compare
    ("\\boxed{\\frac{1}{\\sqrt{3}}}", "\\frac{1}{\\sqrt{2}}", False),
    ("first \\boxed{1}, finally \\boxed{2}", "2", True),             # the last box counts
    ("\\boxed{x^{2} + 1}", "x^{2}+1", True),
    ("\\boxed{5}", "hence the total is $\\boxed{5}$.", True),        # MATH-style reference solution
]


@pytest.mark.parametrize("response, reference, ok", CASES)
def test_math_checker(response, reference, ok):
    assert task.check("math", response, reference) is ok


def test_a_pathological_answer_times_out_as_wrong(monkeypatch):
    """sympy never finishes comparing 9^{9^{9}} with 3: the signal-based limit stops it and the answer is wrong."""
    monkeypatch.setattr(math_data, "TIMEOUT_S", 1)
    t0 = time.time()
    assert task.check("math", "\\boxed{9^{9^{9}}}", "3") is False
    assert time.time() - t0 < 10


def test_grading_off_the_main_thread():
    """math-verify's limit is a SIGALRM, main thread only: off it the checker grades without one (no error)."""
    got = []
    thread = threading.Thread(target=lambda: got.extend(task.check("math", r, a) for r, a, _ in CASES[:6]))
    thread.start()
    thread.join(timeout=60)
    assert got == [ok for _, _, ok in CASES[:6]]


def test_missing_package_is_one_clear_error(monkeypatch):
    """Without math-verify the checker raises (never falls back to another comparison), naming the install command."""
    math_data._math_verify.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` raises ImportError
    try:
        with pytest.raises(ModuleNotFoundError, match=r"needs math-verify: `pip install math-verify==0\.9\.0`"):
            task.check("math", "\\boxed{2}", "2")
    finally:
        math_data._math_verify.cache_clear()


@pytest.mark.parametrize("data", [["data=<jsonl>"], ["eval_data=<jsonl>"], []])
def test_preflight_refuses_a_real_data_set_without_math_verify(monkeypatch, tmp_path, tiny_models, data):
    """data or eval_data naming a real data set needs math-verify; the addition task ([]: the default) does not."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "math_verify" else find_spec(name, *a, **k))
    (tmp_path / "gsm.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    student, teacher = tiny_models
    args = [f"student={student}", f"teacher={teacher}", f"out_dir={tmp_path / 'runs'}", "eval_size=1",
            "batch_size=4", "max_new_tokens=12", "max_prompt_len=100", "progress=false"]
    cfg = config.load_config(None, args + [a.replace("<jsonl>", str(tmp_path / "gsm.jsonl")) for a in data])
    if not data:
        preflight.check_inputs(cfg)
        return
    with pytest.raises(ValueError) as e:
        preflight.check_inputs(cfg)
    assert "needs math-verify" in str(e.value) and "pip install math-verify==0.9.0" in str(e.value)
    assert "\n" not in str(e.value) and not list(tmp_path.glob("runs/*"))
