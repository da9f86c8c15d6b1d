"""The held-out evaluation: greedy accuracy, and the AsyncOPD paper's Avg@k (k samples per problem at the rollout's
temperature, their mean pass rate) with its standard error."""
import os
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import task
from conftest import ROOT

STUDENT = os.path.join(ROOT, "models", "student")


def test_avg_at_k_and_its_standard_error_against_statistics():
    rates = [1.0, 0.0, 0.5, 0.75, 0.25, 1.0]
    out = task.avg_at_k(rates)
    assert out["accuracy"] == pytest.approx(statistics.mean(rates))
    assert out["accuracy_se"] == pytest.approx(statistics.stdev(rates) / len(rates) ** 0.5)
    assert task.avg_at_k([0.5]) == {"accuracy": 0.5, "accuracy_se": 0.0}


def test_avg_at_k_on_the_shipped_student_next_to_greedy(report):
    """Per problem, k samples at T = 1: rates are multiples of 1/k, the same draws at every evaluation (a fixed
    generator), and on 200 problems the mean is the mean of the per-sample grades. Greedy: 0 or 1 per problem."""
    torch.set_num_threads(1)
    model, tok = AutoModelForCausalLM.from_pretrained(STUDENT), AutoTokenizer.from_pretrained(STUDENT)
    prompts = task.read_prompts("addition", "test", 200)
    greedy = task.pass_rates(model, tok, prompts)
    k = 8
    sampled = task.pass_rates(model, tok, prompts, samples=k, greedy=False, temperature=1.0, batch_size=800)
    assert set(greedy) <= {0.0, 1.0} and len(greedy) == len(sampled) == 200
    assert all(abs(r * k - round(r * k)) < 1e-9 for r in sampled)
    assert task.pass_rates(model, tok, prompts, samples=k, greedy=False, batch_size=800) == sampled  # same draws
    avg, greedy_acc = task.avg_at_k(sampled), task.evaluate(model, tok, prompts)
    assert greedy_acc == pytest.approx(sum(greedy) / 200) and 0 < avg["accuracy_se"] < 0.05
    report(f"toy task, shipped student, 200 held-out problems: greedy {100 * greedy_acc:.1f}%, "
           f"Avg@{k} at T=1 {100 * avg['accuracy']:.1f}% +- {100 * avg['accuracy_se']:.1f}")
