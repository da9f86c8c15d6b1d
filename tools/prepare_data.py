r"""Prompt files for the real configs: the public data sets as {"prompt", "answer", "id"} lines, the paper's filters.

    .venv/bin/python -m tools.prepare_data --from-hub --out data             # networked machine (pip install datasets)
    .venv/bin/python -m tools.prepare_data --from-dir data/hub --out data    # the same from files already downloaded
    .venv/bin/python -m tools.prepare_data --from-hub --out runs/data --only aime24,amc23 --limit 5   # a quick trial

file (under --out)    data set  config:split  (prompt, answer fields)               read by (config: key)
gsm8k_train.jsonl     openai/gsm8k  main:train  (question, answer)                  gpu1_smoke, qwen2.5_gsm8k_4gpu: data
gsm8k_test.jsonl      openai/gsm8k  main:test  (question, answer)                   the same: eval_data
deepmath_train.jsonl  zwhe99/DeepMath-103K  train  (question, final_answer),
                      difficulty >= 6 only (the paper's filter)                     qwen3_deepmath_8gpu*: data
aime24.jsonl          HuggingFaceH4/aime_2024  train  (problem, answer)             qwen3_deepmath_8gpu*: eval_data
aime25.jsonl          opencompass/AIME2025  AIME2025-I:test + AIME2025-II:test
                      (question, answer)                                            eval_data=data/aime25.jsonl
amc23.jsonl           math-ai/amc23  test  (question, answer)                       eval_data=data/amc23.jsonl

The prompt is the problem text as published: a run puts it in the config's prompt_template (the paper's asks for
\boxed{}) and each model's chat template (student_template, teacher_template). The answer is what the grader
compares: GSM8K's number after "####" (not the worked solution), the others' final answer as text (a whole float such
as 27.0 as "27"). The id is NAME/N, N the row's index in the published split(s).

--from-dir DIR reads the files as `hf download` lays them out, one folder per data set, DIR/OWNER/NAME (or
DIR/NAME). On a networked machine (data/ is git-ignored):

    .venv/bin/hf download openai/gsm8k --repo-type dataset --include "main/*" --local-dir data/hub/openai/gsm8k
    .venv/bin/hf download zwhe99/DeepMath-103K --repo-type dataset --local-dir data/hub/zwhe99/DeepMath-103K
    (and HuggingFaceH4/aime_2024, opencompass/AIME2025, math-ai/amc23 the same way)

Offline cluster: run --from-hub on a networked machine and copy the written folder (data/) to the node, or copy the
downloaded data/hub/ folder and run --from-dir there; the configs name data/*.jsonl, relative to the repository root
(data=/path/x.jsonl eval_data=... override them). Every file is written to a temporary name and renamed, so a
stopped run leaves no half file; an existing file is kept unless --force.
"""
import argparse
import glob
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq


@dataclass(frozen=True)
class Source:
    """One output file: a Hugging Face data set's split(s), the two fields it keeps and the rows it keeps."""
    repo: str
    parts: tuple[tuple[str | None, str, str], ...]  # (hub config, split, file glob in the downloaded repo folder)
    prompt: str
    answer: str
    keep: Callable[[dict], bool] | None = None
    keep_text: str = ""


def _hard(row: dict) -> bool:
    """DeepMath-103K's difficulty >= 6: the AsyncOPD paper's training set."""
    return row.get("difficulty") is not None and float(row["difficulty"]) >= 6


SOURCES = {
    "gsm8k_train": Source("openai/gsm8k", (("main", "train", "main/train-*.parquet"),), "question", "answer"),
    "gsm8k_test": Source("openai/gsm8k", (("main", "test", "main/test-*.parquet"),), "question", "answer"),
    "deepmath_train": Source("zwhe99/DeepMath-103K", ((None, "train", "data/train-*.parquet"),), "question",
                             "final_answer", _hard, "difficulty >= 6"),
    "aime24": Source("HuggingFaceH4/aime_2024", ((None, "train", "data/train-*.parquet"),), "problem", "answer"),
    "aime25": Source("opencompass/AIME2025", (("AIME2025-I", "test", "aime2025-I.jsonl"),
                                              ("AIME2025-II", "test", "aime2025-II.jsonl")), "question", "answer"),
    "amc23": Source("math-ai/amc23", ((None, "test", "test-*.parquet"),), "question", "answer"),
}
GROUPS = {"gsm8k": ["gsm8k_train", "gsm8k_test"], "deepmath": ["deepmath_train"]}  # --only shorthands


# ----------------------------------------------------------------------------- reading the published rows

def hub_records(source: Source) -> Iterator[dict]:
    """The published rows from the Hugging Face Hub (needs `datasets` and network; refused here, before any
    download, without it)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit("prepare_data: error: --from-hub needs the datasets library: `.venv/bin/python -m pip "
                         "install datasets` (and network), or download the files and pass --from-dir DIR") from None
    return itertools.chain.from_iterable(datasets.load_dataset(source.repo, config, split=split)
                                         for config, split, _ in source.parts)


def dir_records(source: Source, root: str) -> Iterator[dict]:
    """The published rows from files downloaded with `hf download REPO --repo-type dataset --local-dir
    ROOT/REPO`: parquet shards read column by column (DeepMath's three R1 solutions stay on disk), or jsonl."""
    folders = [os.path.join(root, source.repo), os.path.join(root, source.repo.split("/")[1])]
    folder = next((f for f in folders if os.path.isdir(f)), None)
    if folder is None:
        raise SystemExit(f"prepare_data: error: no folder {folders[0]} (or {folders[1]}): download it with "
                         f"`hf download {source.repo} --repo-type dataset --local-dir {folders[0]}`")
    for _, _, pattern in source.parts:
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if not files:
            raise SystemExit(f"prepare_data: error: no {pattern} in {folder}: is it a full download of "
                             f"{source.repo}?")
        for path in files:
            if path.endswith(".parquet"):
                columns = [source.prompt, source.answer] + (["difficulty"] if source.keep else [])
                try:
                    yield from pq.read_table(path, columns=columns).to_pylist()
                except Exception as e:  # pyarrow's own error types: a missing column, a broken file
                    raise SystemExit(f"prepare_data: error: {path}: {str(e).splitlines()[0]}") from None
            else:
                with open(path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        try:
                            yield from [json.loads(line)] if line.strip() else []
                        except json.JSONDecodeError as e:
                            raise SystemExit(f"prepare_data: error: {path} line {n}: not JSON ({e.msg})") from None


# ----------------------------------------------------------------------------- one output row

def answer_text(value: object) -> str:
    """The graded answer as text: GSM8K's number after '####', 27.0 as '27', anything else as written."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text.rsplit("####", 1)[1].strip() if "####" in text else text


def rows(name: str, source: Source, records: Iterator[dict], limit: int | None) -> tuple[list[dict], int]:
    """({"prompt", "answer", "id"} of every kept record, up to limit; the number of records read)."""
    out, n = [], 0
    for n, record in enumerate(records, 1):
        if source.keep and not source.keep(record):
            continue
        prompt, answer = record.get(source.prompt), record.get(source.answer)
        if not isinstance(prompt, str) or not prompt.strip() or answer is None or not answer_text(answer):
            raise SystemExit(f"prepare_data: error: {source.repo} row {n} has no {source.prompt!r} text or no "
                             f"{source.answer!r} (fields {sorted(record)}): has the data set changed?")
        out.append({"prompt": prompt, "answer": answer_text(answer), "id": f"{name}/{n - 1}"})
        if limit is not None and len(out) >= limit:
            break
    return out, n


def write_jsonl(path: str, items: list[dict]) -> None:
    """All lines to a temporary file beside path, then one rename: never a half-written file at path."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- command line

def selected(only: str | None) -> list[str]:
    if not only:
        return list(SOURCES)
    names = []
    for name in only.split(","):
        name = name.strip()
        if name not in SOURCES and name not in GROUPS:
            raise SystemExit(f"prepare_data: error: --only {name}: choose from {', '.join([*SOURCES, *GROUPS])}")
        names += [n for n in GROUPS.get(name, [name]) if n not in names]
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--from-hub", action="store_true", help="load from the Hugging Face Hub (datasets, network)")
    where.add_argument("--from-dir", metavar="DIR", help="read files downloaded with `hf download` into DIR/OWNER/NAME")
    p.add_argument("--out", required=True, help="output folder: data (the configs' paths) or e.g. runs/data")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"some files only: {', '.join([*SOURCES, *GROUPS])}")
    p.add_argument("--limit", type=int, metavar="N", help="at most N rows per file (quick trials)")
    p.add_argument("--force", action="store_true", help="overwrite files that exist")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"prepare_data: error: --limit {args.limit}: give at least 1")
    names = selected(args.only)
    paths = {name: os.path.join(args.out, f"{name}.jsonl") for name in names}
    exist = [path for path in paths.values() if os.path.exists(path)]
    if exist and not args.force:  # checked before any download
        raise SystemExit(f"prepare_data: error: {', '.join(exist)} already there: pass --force to overwrite them, "
                         "or another --out")
    for name in names:
        source = SOURCES[name]
        records = hub_records(source) if args.from_hub else dir_records(source, args.from_dir)
        items, read = rows(name, source, records, args.limit)
        if not items:
            raise SystemExit(f"prepare_data: error: {source.repo} gave no rows for {name}")
        os.makedirs(args.out, exist_ok=True)
        write_jsonl(paths[name], items)
        kept = f", {source.keep_text}: {len(items)} of {read} read" if source.keep else ""
        parts = " + ".join(f"{c}:{s}" if c else s for c, s, _ in source.parts)
        print(f"{paths[name]}: {len(items)} rows ({source.repo} {parts}{kept})", flush=True)


if __name__ == "__main__":
    main()
