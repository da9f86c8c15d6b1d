"""tools/prepare_data.py (issue 21, item 4): tiny parquet and jsonl copies of every public data set, laid out as
`hf download --local-dir DIR/OWNER/NAME` lays them out, go through the real entry point with --from-dir; the files it
writes are the ones the configs name, hold the exact rows (DeepMath filtered to difficulty >= 6, GSM8K's answer after
'####') and are read by asyncopd itself. No network: --from-hub runs against a stand-in `datasets` module."""
import glob
import json
import os
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT
from optional.math_data import read_rows
from tools import prepare_data

GSM8K_TRAIN = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
                "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"},
               {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "12/60*50 = 10\n#### 10"},
               {"question": "Betty needs $100 and has half. How much more?", "answer": "100/2 = 50\n#### 5"}]
GSM8K_TEST = [{"question": "Janet's ducks lay 16 eggs a day. How many are left?", "answer": "16-3-4 = 9\n#### 9"},
              {"question": "A robe takes 2 bolts of blue fiber and half that white. How many?", "answer": "#### 3"}]
DEEPMATH = [  # two shards, as the data set is published; the R1 solutions are columns the tool never reads
    [{"question": "Evaluate the limit of (1+1/n)^n.", "final_answer": "e", "difficulty": 5.0, "topic": "calc"},
     {"question": "Find the number of subgroups of Z_12.", "final_answer": "6", "difficulty": 6.0, "topic": "alg"}],
    [{"question": "Compute the integral of x^2 from 0 to 3.", "final_answer": "9", "difficulty": 9.0, "topic": "calc"},
     {"question": "Is 2^31-1 prime?", "final_answer": "Yes", "difficulty": 5.5, "topic": "nt"},
     {"question": "Find \\lim_{x\\to0} \\sin x / x.", "final_answer": "1", "difficulty": 6.5, "topic": "calc"}]]
AIME24 = [{"id": 60, "problem": "Every morning Aya goes for a 9-kilometer-long walk. Find the minutes.",
           "solution": "... so 204.", "answer": "204", "url": "https://x", "year": "2024"},
          {"id": 61, "problem": "Let ABC be a triangle inscribed in circle omega. Find m+n.", "solution": "...",
           "answer": "113", "url": "https://y", "year": "2024"}]
AIME25 = {"aime2025-I.jsonl": [{"question": "Find the sum of all integer bases b>9 for which 17_b divides 97_b.",
                                "answer": 70}],
          "aime2025-II.jsonl": [{"question": "Six points lie in a straight line. Find the area.", "answer": "468"},
                                {"question": "Find the number of ordered pairs (x,y).", "answer": "117"}]}
AMC23 = [{"id": 0, "question": "Cities A and B are 45 miles apart. How many miles from City A?", "answer": 27.0,
          "url": "https://a"},
         {"id": 1, "question": "What is half of one? Put it in \\boxed{}.", "answer": 0.5, "url": "https://b"}]
COUNTS = {"gsm8k_train": 3, "gsm8k_test": 2, "deepmath_train": 3, "aime24": 2, "aime25": 3, "amc23": 2}


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_hub(root):
    """A download folder like the one the docs' `hf download` commands make (amc23 as DIR/NAME, the others as
    DIR/OWNER/NAME), with a socratic GSM8K config that must not be read."""
    write_parquet(root / "openai/gsm8k/main/train-00000-of-00001.parquet", GSM8K_TRAIN)
    write_parquet(root / "openai/gsm8k/main/test-00000-of-00001.parquet", GSM8K_TEST)
    write_parquet(root / "openai/gsm8k/socratic/train-00000-of-00001.parquet",
                  [{"question": "socratic", "answer": "#### 0"}])
    for n, shard in enumerate(DEEPMATH):
        write_parquet(root / f"zwhe99/DeepMath-103K/data/train-0000{n}-of-00002.parquet",
                      [dict(r, r1_solution_1="<think>...</think>") for r in shard])
    write_parquet(root / "HuggingFaceH4/aime_2024/data/train-00000-of-00001.parquet", AIME24)
    os.makedirs(root / "opencompass/AIME2025")
    for name, rows in AIME25.items():
        (root / "opencompass/AIME2025" / name).write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    write_parquet(root / "amc23/test-00000-of-00001.parquet", AMC23)
    return str(root)


@pytest.fixture
def hub(tmp_path):
    return make_hub(tmp_path / "hub")


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_writes_the_files_the_configs_name_with_exact_rows_that_asyncopd_reads(hub, tmp_path, capsys):
    out = str(tmp_path / "data")
    prepare_data.main(["--from-dir", hub, "--out", out])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in printed] == [f"{out}/{name}.jsonl: {n} rows" for name, n in COUNTS.items()]
    assert "difficulty >= 6: 3 of 5 read" in printed[2] and "AIME2025-I:test + AIME2025-II:test" in printed[4]
    assert sorted(os.listdir(out)) == sorted(f"{name}.jsonl" for name in COUNTS)  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(f"{out}/aime24.jsonl").st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, readable by others

    answers = ["72", "10", "5"]  # the number after '####', not the worked solution
    assert lines(f"{out}/gsm8k_train.jsonl") == [
        {"prompt": r["question"], "answer": answers[i], "id": f"gsm8k_train/{i}"} for i, r in enumerate(GSM8K_TRAIN)]
    assert [r["answer"] for r in lines(f"{out}/gsm8k_test.jsonl")] == ["9", "3"]
    assert lines(f"{out}/deepmath_train.jsonl") == [  # difficulty 5 and 5.5 dropped, 6, 9, 6.5 kept
        {"prompt": "Find the number of subgroups of Z_12.", "answer": "6", "id": "deepmath_train/1"},
        {"prompt": "Compute the integral of x^2 from 0 to 3.", "answer": "9", "id": "deepmath_train/2"},
        {"prompt": "Find \\lim_{x\\to0} \\sin x / x.", "answer": "1", "id": "deepmath_train/4"}]
    assert lines(f"{out}/aime24.jsonl") == [{"prompt": r["problem"], "answer": r["answer"], "id": f"aime24/{i}"}
                                            for i, r in enumerate(AIME24)]
    assert [(r["prompt"][:13], r["answer"], r["id"]) for r in lines(f"{out}/aime25.jsonl")] == [
        ("Find the sum ", "70", "aime25/0"), ("Six points li", "468", "aime25/1"), ("Find the numb", "117", "aime25/2")]
    assert [r["answer"] for r in lines(f"{out}/amc23.jsonl")] == ["27", "0.5"]

    for name, n in COUNTS.items():  # asyncopd's own reader takes every file
        written, read = lines(f"{out}/{name}.jsonl"), read_rows(f"{out}/{name}.jsonl")
        assert len(read) == n
        assert read == [{"prompt": w["prompt"], "answer": w["answer"], "checker": "math"} for w in written]
    assert read_rows(f"{out}/gsm8k_{{split}}.jsonl", "test") == read_rows(f"{out}/gsm8k_test.jsonl")

    named = set()  # every data file a shipped config names is one this tool writes
    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        cfg = yaml.safe_load(open(path))
        named |= {cfg[k] for k in ("data", "eval_data") if str(cfg.get(k, "")).startswith("data/")}
    assert named and {os.path.basename(p) for p in named} <= {f"{name}.jsonl" for name in COUNTS}, named


def test_refuses_to_overwrite_without_force(hub, tmp_path):
    out = str(tmp_path / "data")
    prepare_data.main(["--from-dir", hub, "--out", out, "--only", "aime24"])
    path = f"{out}/aime24.jsonl"
    with open(path, "w") as f:
        f.write('{"prompt": "mine", "answer": "1"}\n')
    with pytest.raises(SystemExit, match=r"aime24\.jsonl already there: pass --force"):
        prepare_data.main(["--from-dir", hub, "--out", out, "--only", "aime24,amc23"])
    assert open(path).read() == '{"prompt": "mine", "answer": "1"}\n' and os.listdir(out) == ["aime24.jsonl"]
    prepare_data.main(["--from-dir", hub, "--out", out, "--only", "aime24", "--force"])
    assert len(lines(path)) == 2 and os.listdir(out) == ["aime24.jsonl"]


def test_only_and_limit(hub, tmp_path, capsys):
    out = str(tmp_path / "trial")
    prepare_data.main(["--from-dir", hub, "--out", out, "--only", "gsm8k,deepmath_train,gsm8k_test", "--limit", "1"])
    assert sorted(os.listdir(out)) == ["deepmath_train.jsonl", "gsm8k_test.jsonl", "gsm8k_train.jsonl"]
    assert [r["id"] for r in lines(f"{out}/deepmath_train.jsonl")] == ["deepmath_train/1"]  # the first kept row
    assert all(len(lines(f"{out}/{n}")) == 1 for n in os.listdir(out)) and len(capsys.readouterr().out.split("\n")) == 4
    with pytest.raises(SystemExit, match="--only aime: choose from gsm8k_train"):
        prepare_data.main(["--from-dir", hub, "--out", out, "--only", "aime"])
    with pytest.raises(SystemExit, match="--limit 0"):
        prepare_data.main(["--from-dir", hub, "--out", out, "--limit", "0"])


def test_from_hub_asks_datasets_for_each_split_and_names_the_install_without_it(tmp_path, monkeypatch):
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        if repo == "zwhe99/DeepMath-103K":
            return [r for shard in DEEPMATH for r in shard]
        if repo == "opencompass/AIME2025":
            return AIME25[f"aime2025-{config.split('-')[1]}.jsonl"]
        return {"openai/gsm8k": {"train": GSM8K_TRAIN, "test": GSM8K_TEST}[split],
                "HuggingFaceH4/aime_2024": AIME24, "math-ai/amc23": AMC23}[repo]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prepare_data.main(["--from-hub", "--out", str(tmp_path / "hub_out")])
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test"),
                     ("zwhe99/DeepMath-103K", None, "train"), ("HuggingFaceH4/aime_2024", None, "train"),
                     ("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test"),
                     ("math-ai/amc23", None, "test")]
    assert {n: len(lines(tmp_path / "hub_out" / f"{n}.jsonl")) for n in COUNTS} == COUNTS

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(SystemExit, match=r"--from-hub needs the datasets library: .*pip install datasets"):
        prepare_data.main(["--from-hub", "--out", str(tmp_path / "none")])
    assert not os.path.exists(tmp_path / "none")


def test_errors_name_the_fix_and_a_failed_write_leaves_nothing(hub, tmp_path):
    with pytest.raises(SystemExit, match=r"no folder .*/math-ai/amc23 .*hf download math-ai/amc23 --repo-type dataset"):
        prepare_data.main(["--from-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--only", "amc23"])
    os.remove(os.path.join(hub, "opencompass/AIME2025/aime2025-II.jsonl"))
    with pytest.raises(SystemExit, match=r"no aime2025-II\.jsonl in .*AIME2025: is it a full download"):
        prepare_data.main(["--from-dir", hub, "--out", str(tmp_path / "o"), "--only", "aime25"])
    write_parquet(os.path.join(hub, "math-ai/amc23/test-00000-of-00001.parquet"), [{"problem": "x", "answer": 1}])
    with pytest.raises(SystemExit, match=r"test-00000-of-00001\.parquet: .*question"):  # a changed schema
        prepare_data.main(["--from-dir", hub, "--out", str(tmp_path / "o"), "--only", "amc23"])
    assert not os.path.exists(tmp_path / "o")

    os.makedirs(tmp_path / "w")
    with pytest.raises(TypeError):  # not JSON: nothing at the path, no temporary file
        prepare_data.write_jsonl(str(tmp_path / "w" / "x.jsonl"), [{"prompt": "p", "answer": "1"}, {"x": object()}])
    assert os.listdir(tmp_path / "w") == []


def test_command_line_and_house_rules(tmp_path):
    """Runs as `python -m tools.prepare_data`, refuses in one line, and takes no output folder by default (the
    house rule: never a committed folder; the configs' data/ is git-ignored)."""
    cmd = [sys.executable, "-m", "tools.prepare_data", "--from-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "hf download openai/gsm8k" in done.stderr
    out = next(a for a in prepare_data.parser()._actions if a.dest == "out")
    assert out.default is None and out.required
    with pytest.raises(SystemExit) as e:
        prepare_data.parser().parse_args(["--out", "data"])  # neither --from-hub nor --from-dir
    assert e.value.code == 2
    assert "data/\n" in open(os.path.join(ROOT, ".gitignore")).read()
