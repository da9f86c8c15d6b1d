"""tools/bench_gpu.py at tiny budgets: the memory model's measured layer against known facts, its verdict on the shipped
GPU configs and on one that cannot fit; the loss path's chunked gather against the naive log-softmax."""
import functools
import re

import pytest

from tools import bench_gpu


@pytest.fixture(scope="module")
def measured():
    """measure_model computed once per model for the module (each builds a real-size decoder layer)."""
    return functools.cache(bench_gpu.measure_model)


def test_measured_layer_matches_known_sizes(measured):
    m = measured("Qwen2.5-0.5B-Instruct", 32)
    assert m["params"] == 494_032_768  # Qwen2.5-0.5B (tied embeddings), the model card's count
    assert m["act"]["ckpt"] == 2 * m["hidden"]  # checkpointing keeps only the layer's bf16 input per token
    assert m["act"]["plain"] > 20 * m["act"]["ckpt"]


def test_memory_verdicts(measured, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_gpu, "measure_model", measured)
    with pytest.raises(SystemExit) as shipped:
        bench_gpu.main(["memory", "--tokens", "32"])
    out = capsys.readouterr().out
    assert shipped.value.code == 0 and "all configs fit" in out
    assert all(path in out for path in bench_gpu.GPU_CONFIGS) and "DOES NOT FIT" not in out
    # the single-GPU smoke config without activation checkpointing or micro-batches, 4x its batch
    text = open("configs/gpu1_smoke.yaml").read()
    text = re.sub(r"activation_checkpointing: true", "activation_checkpointing: false", text)
    big = tmp_path / "big.yaml"
    text = re.sub(r"micro_batch_tokens: \d+", "micro_batch_tokens: 0", text)
    big.write_text(re.sub(r"^batch_size: 16$", "batch_size: 64", text, flags=re.M))  # 64 x 1024 tokens a pass
    with pytest.raises(SystemExit) as unfit:
        bench_gpu.main(["memory", str(big), "--tokens", "32"])
    out = capsys.readouterr().out
    assert unfit.value.code == 1 and "cuda:0" in out and "DOES NOT FIT" in out and "lower micro_batch_tokens" in out


def test_loss_path_chunked_stays_below_one_full_log_softmax(capsys):
    V, mb = 32000, 2**20
    bench_gpu.main(["loss", "--tokens", "2048,4096", "--vocab", str(V), "--hidden", "64"])  # a fresh process per point
    out = capsys.readouterr().out
    peak = {(v, int(n)): float(x) for v, n, x in re.findall(r"^(chunked|naive)\s+(\d+)\s+([\d.]+)", out, re.M)}
    assert set(peak) == {("chunked", 2048), ("chunked", 4096), ("naive", 2048)}  # naive stops at NAIVE_MAX_TOKENS
    assert peak["naive", 2048] >= 4 * 2048 * V / mb  # it holds the float32 [N, V] log-softmax for backward
    assert peak["chunked", 4096] < 0.5 * 4 * 4096 * V / mb  # one [chunk, V] at a time, whatever N
    slope = float(re.search(r"chunked\s+a =.*b = ([\d.]+) MB/token", out).group(1))
    assert slope < 0.01  # ids, draws and rows per token: kilobytes, not a vocabulary row (0.12 MB)
