"""tools/lab.py: the controlled-staleness loop generates every batch with exactly the intended weights, and the
--quick report (shipped models) is complete, finite, and its cache statistics behave as the theory says."""
import os
import re
import subprocess
import sys

import pytest
import torch

import learner
import task
import teacher_cache
from conftest import ROOT
from tools import lab


def test_batch_j_is_generated_by_exactly_version_max0_j_minus_S(tiny_models, monkeypatch):
    """Every token of batch j carries policy_version max(0, j - S), and its behaviour log-prob is the log-prob
    under the state dict the learner published at that version (recomputed from scratch here)."""
    import argparse

    from transformers import AutoModelForCausalLM
    student_dir, teacher_dir = tiny_models
    tok = task.build_tokenizer()
    train = task.read_prompts("addition", "train", 64)
    for r in train:
        r["ids"] = task.encode_prompt(tok, r["prompt"])
    args = argparse.Namespace(student=student_dir, teacher=teacher_dir, out="")
    state = dict(p=dict(lab.QUICK, batch=4, lr=0.05), tok=tok, args=args, train=train,
                 evals=train[:4], teacher=AutoModelForCausalLM.from_pretrained(teacher_dir).eval())
    published, batches = [], []
    copy_weights, score_unit = learner.copy_weights, teacher_cache.score_unit
    monkeypatch.setattr(learner, "copy_weights", lambda ln: published.append(copy_weights(ln)) or published[-1])
    monkeypatch.setattr(teacher_cache, "score_unit", lambda cfg, t, traj, j, prompts: batches.append((j, traj)) or
                        score_unit(cfg, t, traj, j, prompts))
    S, steps = 2, 6
    lab.train_student(state, lab.LossOptions(name="reverse_kl_mc", samples=3), S, 0, steps)
    assert [j for j, _ in batches] == list(range(steps)) and len(published) >= steps + 1
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    for j, batch in batches:
        v = max(0, j - S)
        assert (batch["policy_version"] == v).all(), (j, batch["policy_version"].unique())
        model.load_state_dict(published[v])
        b = lab.forward(model, batch)[1].gather(1, batch["token_ids"][:, None])[:, 0]
        torch.testing.assert_close(b.float(), batch["behavior_logp"], atol=1e-5, rtol=0)
        if v != j:  # the current weights would give other log-probs: the check can tell versions apart
            model.load_state_dict(published[j])
            other = lab.forward(model, batch)[1].gather(1, batch["token_ids"][:, None])[:, 0]
            assert (other.float() - batch["behavior_logp"]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab")
    run = subprocess.run([sys.executable, "-m", "tools.lab", "all", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return out


def table(text):
    """Rows (lists of cells) of the markdown tables in text, header and separator rows dropped."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= set("-") and r[0] not in ("estimator", "k", "schedule")]


def test_quick_report_complete_and_finite(quick_report):
    report = open(quick_report / "REPORT.md").read()
    for name, title in lab.PARTS.items():
        assert f"## {title}" in report and "Command: `python -m tools.lab all --quick" in report
        assert os.path.getsize(quick_report / f"{name}.png") > 1000, name
        rows = table(open(quick_report / f"{name}.md").read())
        assert rows, f"{name} has no table rows"
        for row in rows:
            numbers = re.findall(r"(?<![\w.])[-+]?(?:\d+\.\d+|\d+|nan|inf)(?![\w.])", " ".join(row[1:]), re.IGNORECASE)
            assert numbers and all(abs(float(x)) < float("inf") for x in numbers), (name, row)  # nan fails < too
    for row in table(open(quick_report / "direction.md").read()) + table(open(quick_report / "surrogates.md").read()):
        assert row[2] == "1" and 0 <= float(row[3]) <= 1 and float(row[4]) >= 0  # 1 seed in --quick; accuracy; KL >= 0


def test_quick_cache_statistics(quick_report):
    """MC is unbiased (its bias is at its standard-error floor) at every staleness level; at k = 0 (b = p_theta, IS
    ratio 1) the M = 64 local variance is 1/64 of the 1-sample one; the top-K_s support is biased far beyond MC-64's
    noise. (Under staleness the IS weights are heavy-tailed, so the variance ratio is only checked on-policy.)"""
    rows = {(int(r[0]), r[2]): r for r in table(open(quick_report / "cache.md").read())}
    levels = sorted({k for k, _ in rows})
    assert levels[0] == 0 and len(levels) >= 2
    for k in levels:
        for M in lab.MS:
            bias, floor = float(rows[k, f"MC, M = {M}"][3]), float(rows[k, f"MC, M = {M}"][4])
            assert 0 < bias <= 3 * floor, (k, M, bias, floor)
        top = rows[k, f"stale top-{lab.KS} support"]
        assert float(top[3]) > 3 * float(rows[k, "MC, M = 64"][4]) and float(top[4]) == 0, (k, top)
        assert float(rows[k, "exact dense (no sampling)"][3]) == 0
    local64 = float(rows[0, "MC, M = 64"][6].split()[0])
    assert 0.5 / 64 <= local64 <= 2 / 64, local64
