"""Hostile input (issue #11): every case is refused before any process starts, in one line naming the key or
file and the fix. Most cases go through preflight.check_inputs(load_config(...)) in-process; a few through the real
command line (exit code 2, one stderr line, no traceback, no run folder)."""
import errno
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys

import pytest

import asyncopd
import config
import task
from conftest import ROOT, make_model_dir
from optional import offline
from runtime import coordinator, preflight, prompt_checks

VALID = ["eval_size=8", "max_new_tokens=12", "max_prompt_len=100", "batch_size=4", "progress=false", "run_name=r"]


def ascii_tokenizer():
    """Printable ASCII and newline, one token per character: math prompts fit, '１２' does not."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(task.SPECIAL_TOKENS + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(task.SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    """Files the cases point at: <name> in a case is replaced by its path."""
    d = tmp_path_factory.mktemp("inputs")
    tok = ascii_tokenizer()
    files = {
        "list.yaml": "- steps: 3\n- lr: 0.1\n", "scalar.yaml": "just words\n", "empty.yaml": "",
        "comments.yaml": "# only a comment\n", "syntax.yaml": "steps: 3\nbetas: [0.9,\n  lr: 2\n",
        "dup.yaml": "steps: 3\nlr: 0.1\nsteps: 5\n", "dupsub.yaml": "loss:\n  name: jsd\n  name: reverse_kl_mc\n",
        "tab.yaml": "steps:\t\t3\n\tlr: 1\n", "intkey.yaml": "1: 2\n", "section.yaml": "loss: jsd\n",
        "typo.yaml": "stpes: 3\n", "badtype.yaml": "batch_size: [4]\n",
        "deep.yaml": "steps: 3\na: " + "[" * 5000 + "\n", "okfile.yaml": "steps: 3\nlr: 0.01\n",
        "fullwidth.jsonl": json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n"
                           + json.dumps({"prompt": "１２+３４=", "answer": "46"}) + "\n",
        "control.jsonl": json.dumps({"prompt": "a\x00b", "answer": "1"}) + "\n",
        "malformed.jsonl": json.dumps({"prompt": "1+2=", "answer": "3"}) + "\n\n{\"prompt\": \"1+3=\", \"answer\": \n",
        "notobject.jsonl": "[1, 2]\n", "numberprompt.jsonl": json.dumps({"prompt": 12, "answer": "3"}) + "\n",
        "nullanswer.jsonl": json.dumps({"prompt": "1+2=", "answer": {"a": 1}}) + "\n",
        "fields.jsonl": json.dumps({"text": "1+2="}) + "\n", "blank.jsonl": "\n\n",
        "long.jsonl": json.dumps({"prompt": "1" * 300, "answer": "1"}) + "\n",
        "ok.jsonl": "".join(json.dumps({"prompt": f"What is 1+{k}?", "answer": str(1 + k)}) + "\n" for k in range(4)),
        "broken.parquet": "not parquet at all", "data.csv": "a,b\n", "afile": "x",
    }
    for name, text in files.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    files["binary.jsonl"] = ""
    (d / "runs" / "taken").mkdir(parents=True)
    paths = {name: str(d / name) for name in files}
    student, teacher = tiny_models
    paths.update(d=str(d), student=student, teacher=teacher, runs=str(d / "runs"),
                 astudent=make_model_dir(d / "astudent", tok, 32, 1, 0),
                 ateacher=make_model_dir(d / "ateacher", tok, 32, 1, 1))
    for name, file in (("badconfig", "config.json"), ("badtokenizer", "tokenizer.json")):  # corrupt model files
        shutil.copytree(student, d / name)
        (d / name / file).write_text("{not json")
        paths[name] = str(d / name)
    shutil.copytree(student, d / "notcausal")  # a valid config of a model that is no causal LM (an image encoder)
    conf = json.loads((d / "notcausal" / "config.json").read_text())
    (d / "notcausal" / "config.json").write_text(json.dumps(dict(conf, model_type="vit", architectures=["ViTModel"])))
    paths["notcausal"] = str(d / "notcausal")
    paths.update(model_folder_defects(d, student))
    # a read-only place: root writes through chmod, so it needs a path no one can create
    paths["readonly"] = "/proc/asyncopd-runs" if os.geteuid() == 0 else str(d / "ro" / "runs")
    if os.geteuid() != 0:
        (d / "ro").mkdir(mode=0o555)
    return paths


def model_folder_defects(d, student):
    """Copies of a model folder with one defect each (and a whole sharded one): {name: path}."""
    from transformers import AutoModelForCausalLM
    out = {}

    def copy(name, edit):
        shutil.copytree(student, d / name)
        edit(d / name)
        out[name] = str(d / name)

    def truncate(folder):
        with open(folder / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(folder / "model.safetensors") - 100)

    def garbage_header(folder):
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[8:20] = b"not json {{{"  # same size: only the header is unreadable
        (folder / "model.safetensors").write_bytes(bytes(data))

    copy("noweights", lambda f: os.remove(f / "model.safetensors"))
    copy("truncated", truncate)
    copy("garbageheader", garbage_header)
    copy("notokenizer", lambda f: [os.remove(f / n) for n in os.listdir(f) if n.startswith("tokenizer")])
    for name in ("sharded", "missingshard"):  # model.safetensors.index.json and its shards
        AutoModelForCausalLM.from_pretrained(student).save_pretrained(d / name, max_shard_size="40KB")
        for n in os.listdir(student):
            if n.startswith("tokenizer"):
                shutil.copy(os.path.join(student, n), d / name)
        out[name] = str(d / name)
    shards = sorted(n for n in os.listdir(d / "missingshard") if n.startswith("model-"))
    assert len(shards) == 2
    os.remove(d / "missingshard" / shards[-1])
    return out


LONG_OUT_DIR = "/".join(["d" * 250] * 17)  # 4267 bytes below the runs folder: each name fits, the path does not

# (case id, config file or None, overrides, what the one-line error must say); {name} -> env[name]
CASES = [
    # config files: YAML that is no mapping, broken, ambiguous or empty
    ("yaml-list", "<list.yaml>", [], "list.yaml is a YAML list, not a mapping"),
    ("yaml-scalar", "<scalar.yaml>", [], "scalar.yaml is a YAML str, not a mapping"),
    ("yaml-syntax", "<syntax.yaml>", [], "syntax.yaml line 4: expected ',' or ']'"),
    ("yaml-tab", "<tab.yaml>", [], "tab.yaml line 1: found character '\\t'"),
    ("yaml-duplicate", "<dup.yaml>", [], "dup.yaml line 3: duplicate key 'steps'"),
    ("yaml-duplicate-in-section", "<dupsub.yaml>", [], "duplicate key 'name'"),
    ("yaml-empty", "<empty.yaml>", [], "empty.yaml is empty"),
    ("yaml-only-comments", "<comments.yaml>", [], "comments.yaml is empty"),
    ("yaml-missing", "<d>/nope.yaml", [], "nope.yaml not found"),
    ("yaml-typo", "<typo.yaml>", [], "unknown config key stpes (did you mean steps?)"),
    ("yaml-int-key", "<intkey.yaml>", [], "unknown config key 1"),
    ("yaml-section-scalar", "<section.yaml>", [], "config key loss is a section"),
    ("yaml-wrong-type", "<badtype.yaml>", [], "batch_size expects int, got [4]"),
    # overrides
    ("override-bad-yaml", None, ["betas=[0.9"], "override betas=[0.9 line 1"),
    ("override-duplicate", None, ["loss={name: jsd, name: jsd}"], "duplicate key 'name'"),
    ("override-no-equals", None, ["steps"], "is not key=value"),
    ("override-type", None, ["batch_size=many"], "batch_size expects int, got 'many'"),
    ("override-bool-for-int", None, ["steps=true"], "steps expects int, got True"),
    ("override-str-for-list", None, ["rollout_devices=cpu"], "rollout_devices expects list"),
    # per-key ranges
    ("steps-0", None, ["steps=0"], "steps=0 must be >= 1"),
    ("steps-negative", None, ["steps=-5"], "steps=-5 must be >= 1"),
    ("batch_size-0", None, ["batch_size=0"], "batch_size=0 must be >= 1"),
    ("mini_batches-0", None, ["mini_batches=0"], "mini_batches=0 must be >= 1"),
    ("threads-0", None, ["threads=0"], "threads=0 must be >= 1"),
    ("chunk_prompts-0", None, ["chunk_prompts=0"], "chunk_prompts=0 must be >= 1"),
    ("precompute_prompts-0", None, ["precompute_prompts=0"], "precompute_prompts=0 must be >= 1"),
    ("max_new_tokens-0", None, ["max_new_tokens=0"], "max_new_tokens=0 must be >= 1"),
    ("max_prompt_len-0", None, ["max_prompt_len=0"], "max_prompt_len=0 must be >= 1"),
    ("eval_every-0", None, ["eval_every=0"], "eval_every=0 must be >= 1"),
    ("eval_size-negative", None, ["eval_size=-1"], "eval_size=-1 is negative"),
    ("save_every-negative", None, ["save_every=-1"], "save_every=-1 is negative"),
    ("queue_size-negative", None, ["queue_size=-1"], "queue_size=-1 is negative"),
    ("rollout_batch_size-negative", None, ["rollout_batch_size=-2"], "rollout_batch_size=-2 is negative"),
    ("max_staleness-negative", None, ["max_staleness=-1"], "max_staleness=-1 is negative"),
    ("micro_batch_tokens-negative", None, ["micro_batch_tokens=-1"], "micro_batch_tokens=-1 is negative"),
    ("lr-negative", None, ["lr=-1"], "lr=-1.0 must be > 0"),
    ("lr-0", None, ["lr=0"], "lr=0.0 must be > 0"),
    ("lr-inf", None, ["lr=.inf"], "lr=inf: must be a finite number"),
    ("temperature-nan", None, ["temperature=.nan"], "temperature=nan: must be a finite number"),
    ("loss-beta-nan", None, ["loss.beta=.nan"], "loss.beta=nan: must be a finite number"),
    ("weight_decay-negative", None, ["weight_decay=-0.1"], "weight_decay=-0.1 must be >= 0"),
    ("grad_clip-negative", None, ["grad_clip=-1"], "grad_clip=-1.0 must be >= 0"),
    ("betas-one", None, ["betas=[0.9]"], "betas=[0.9] must be two numbers in [0, 1)"),
    ("betas-range", None, ["betas=[0.9, 1.5]"], "must be two numbers in [0, 1)"),
    ("betas-text", None, ["betas=[a, b]"], "must be two numbers in [0, 1)"),
    ("rollout_devices-empty", None, ["rollout_devices=[]"], "rollout_devices=[] must be a non-empty list"),
    ("learner_devices-empty", None, ["learner_devices=[]"], "learner_devices=[] must be a non-empty list"),
    ("rollout_devices-int", None, ["rollout_devices=[0]"], "rollout_devices=[0] must be a non-empty list of devices"),
    ("seed-negative", None, ["seed=-1"], "seed=-1 must be in [0, 2**32)"),
    ("loss-samples-0", None, ["loss.samples=0"], "samples=0 must be >= 1"),
    # already refused before this issue (kept in the table)
    ("schedule-typo", None, ["schedule=asynch"], "schedule='asynch'"),
    ("engine-vllm-on-cpu", None, ["engine=vllm"], "vllm"),
    ("teacher-url-with-hf", None, ["teacher_url=http://127.0.0.1:9"], "teacher_url ... teacher_engine=vllm"),
    ("teacher-tp-with-hf", None, ["teacher_tensor_parallel=2"], "teacher_tensor_parallel ... teacher_engine=vllm"),
    ("teacher-tp-on-cpu", None, ["teacher_engine=vllm", "teacher_tensor_parallel=2", "eval_teacher=false"],
     "teacher_tensor_parallel=2 spans GPUs"),
    ("teacher-vllm-draws", None, ["teacher_engine=vllm", "loss.name=forward_kl_mc", "eval_teacher=false"],
     "forward_kl_mc ... ['teacher_mc_ids', 'teacher_mc_logp'] ... teacher_engine=hf"),
    ("teacher-vllm-eval", None, ["teacher_engine=vllm"], "eval_teacher=true ... eval_teacher=false"),
    ("teacher-url-unreachable", None, ["teacher_engine=vllm", "eval_teacher=false", "teacher_url=http://127.0.0.1:9"],
     "teacher_url http://127.0.0.1:9/v1/models unreachable ... Connection refused"),
    ("teacher-engine-unknown", None, ["teacher_engine=sglang"], "teacher_engine='sglang': use one of hf, vllm"),
    ("resume-not-a-checkpoint", None, ["resume=<d>"], "no trainer_state.json there"),
    ("student-corrupt-config", None, ["student=<badconfig>"], "student <d>/badconfig: cannot load its config ("),
    ("student-corrupt-tokenizer", None, ["student=<badtokenizer>"],
     "student <d>/badtokenizer: cannot load its tokenizer ("),
    ("teacher-corrupt-config", None, ["teacher=<badconfig>"], "teacher <d>/badconfig: cannot load its config ("),
    ("student-not-causal-lm", None, ["student=<notcausal>"], "student <d>/notcausal: model type 'vit' is not a causal"),
    ("teacher-not-causal-lm", None, ["teacher=<notcausal>"], "teacher <d>/notcausal: model type 'vit' is not a causal"),
    ("start_method-typo", None, ["start_method=forkserver"], "start_method='forkserver': use one of auto, fork, spawn"),
    ("start_method-fork-on-cuda", None, ["start_method=fork", "learner_devices=[cuda:0]"],
     "start_method=fork with a cuda device: CUDA cannot be used in a forked child"),
    ("start_method-fork-threads", None, ["start_method=fork", "threads=2"],
     "start_method=fork with threads=2: a forked child may hang in OpenMP"),
    # where the run goes
    ("out_dir-file", None, ["out_dir=<afile>"], "afile is a file, not a folder"),
    ("out_dir-under-file", None, ["out_dir=<afile>/runs"], "afile is a file, not a folder"),
    ("out_dir-read-only", None, ["out_dir=<readonly>"], "cannot write in"),
    ("out_dir-empty", None, ["out_dir="], "out_dir='' is empty"),
    ("run_name-escapes", None, ["run_name=../../x"], "run_name='../../x' must be a plain folder name"),
    ("run_name-path", None, ["run_name=a/b"], "must be a plain folder name"),
    ("run_name-dotdot", None, ["run_name=.."], "must be a plain folder name"),
    ("run_name-absolute", None, ["run_name=/tmp/x"], "must be a plain folder name"),
    ("run_name-nul", None, [r'run_name="a\0b"'], "must be a plain folder name"),
    ("run_name-reused", None, ["run_name=taken"], "choose another run_name, or delete that folder"),
    # prompt data: unreadable rows named by file and row, text the tokenizer cannot represent
    ("data-empty-key", None, ["data="], "data='' is empty"),
    ("data-missing", None, ["data=<d>/nope.jsonl"], "nope.jsonl not found"),
    ("data-extension", None, ["data=<data.csv>"], "must end in .jsonl or .parquet"),
    ("data-no-rows", None, ["data=<blank.jsonl>"], "blank.jsonl has no rows"),
    ("data-malformed-line", None, ["data=<malformed.jsonl>"], "malformed.jsonl line 3: not valid JSON"),
    ("data-not-utf8", None, ["data=<binary.jsonl>"], "binary.jsonl line 1: not valid JSON"),
    ("data-row-not-object", None, ["data=<notobject.jsonl>"], "notobject.jsonl row 1 is a list"),
    ("data-prompt-not-text", None, ["data=<numberprompt.jsonl>"], "numberprompt.jsonl row 1: the prompt must be text"),
    ("data-answer-not-text", None, ["data=<nullanswer.jsonl>"], "the answer text or a number, got str and dict"),
    ("data-fields", None, ["data=<fields.jsonl>"], "fields.jsonl row 1 has fields ['text']"),
    ("data-broken-parquet", None, ["data=<d>/broken.parquet"], "broken.parquet: not a readable parquet file"),
    ("eval_data-malformed", None, ["eval_data=<malformed.jsonl>"], "malformed.jsonl line 3"),
    ("data-prompt-too-long", None, ["data=<long.jsonl>"], "long.jsonl row 1: prompt '111"),
    ("data-fullwidth-digits", None, ["data=<fullwidth.jsonl>", "student=<astudent>", "teacher=<ateacher>"],
     "fullwidth.jsonl row 2: prompt '１２+３４= ... has characters '１２３４' outside the tokenizer's vocabulary"),
    ("data-control-char", None, ["data=<control.jsonl>", "student=<astudent>", "teacher=<ateacher>"],
     "control.jsonl row 1: prompt 'a\\x00b"),
    ("data-outside-addition-vocab", None, ["data=<ok.jsonl>"], "ok.jsonl row 1: prompt 'What is 1+0?"),
    # the second fault matrix (issue #20): sizes the run cannot hold, names the file system cannot hold, keys given
    # twice or that the schedule ignores, models that cannot load
    ("yaml-deep", "<deep.yaml>", [], "deep.yaml line 2: nested deeper than a config can be"),
    ("override-deep", None, ["betas=" + "[" * 5000], "override betas=[[[ ... line 1: nested deeper than a config"),
    ("override-twice", None, ["steps=4", "steps=2"], "override 'steps=2' sets steps again after 'steps=4'"),
    ("override-section-and-key", None, ["loss={name: jsd}", "loss.name=reverse_kl_mc"],
     "override 'loss.name=reverse_kl_mc' sets loss.name again after 'loss={name: jsd}'"),
    ("eval_size-beyond-addition", None, ["eval_size=1000000000"],
     f"eval_size=1000000000 is more than the {task.DEFAULT_LIMIT['test']} held-out problems of the addition task"),
    ("eval_size-beyond-data", None, ["data=<ok.jsonl>", "eval_size=5", "student=<astudent>", "teacher=<ateacher>"],
     "eval_size=5 but <ok.jsonl> has only 4 held-out prompts: set eval_size<=4"),
    ("threads-beyond-cores", None, ["threads=100000"], "threads=100000 is more than the"),
    ("teacher_topk-beyond-vocab", None, ["loss.name=forward_kl_topk", "loss.teacher_topk=1000000"],
     "loss.teacher_topk=1000000 is more than the vocabulary (17 tokens"),
    ("student_topk-beyond-vocab", None, ["loss.name=reverse_kl_support", "loss.student_topk=18"],
     "loss.student_topk=18 is more than the vocabulary (17 tokens"),
    ("batch_size-units-in-flight", None, ["batch_size=1048576", "rollout_batch_size=4"],
     "rollout units in flight (queue_size=524288 in each of 2 queues + a batch of batch_size/rollout_batch_size="
     "262144 in the learner"),
    ("samples-shared-memory", None, ["loss.name=reverse_kl_mc", "loss.samples=1000000000"],
     "shared memory: 7 rollout units in flight ... largest field mc_ids [48 x 1000000000]) ... lower loss.samples"),
    ("run_name-too-long", None, ["run_name=" + "x" * 300], "run_name: the name 'xxx ... is 300 bytes, more than the"),
    ("out_dir-path-too-long", None, [f"out_dir=<runs>/{LONG_OUT_DIR}"],
     "out_dir or run_name: the run would write paths of ... more than PATH_MAX="),
    ("report_to-typo", None, ["report_to=tensorbord"], "report_to='tensorbord': use one of '', tensorboard, wandb"),
    ("lr_schedule-typo", None, ["lr_schedule=cosin"], "lr_schedule='cosin': use one of constant, cosine, linear"),
    ("min_lr-above-lr", None, ["lr=0.001", "min_lr=0.01"], "min_lr=0.01 must be <= lr=0.001"),
    ("warmup_steps-beyond-run", None, ["steps=4", "warmup_steps=5"], "warmup_steps=5 <= the run's optimizer steps"),
    ("min_lr-negative", None, ["min_lr=-1"], "min_lr=-1.0 must be >= 0"),
    ("dist_timeout_s-huge", None, ["dist_timeout_s=100000000000000"], "dist_timeout_s=100000000000000 is more than a "
     "week (604800 s)"),
    ("cache_dir-online", None, ["cache_dir=<d>/cache"], "cache_dir='<d>/cache' is read only by schedule=offline and "
     "`asyncopd.py precompute`; this run is schedule=async and would ignore it: drop cache_dir"),
    ("allow_teacher_mismatch-online", None, ["allow_teacher_mismatch=true"],
     "allow_teacher_mismatch=True is read only by schedule=offline; this run is schedule=async"),
    ("precompute_prompts-online", None, ["precompute_prompts=8"], "precompute_prompts=8 is read only by"),
    ("chunk_prompts-sync", None, ["schedule=sync", "chunk_prompts=8"], "chunk_prompts=8 is read only by"),
    ("step_off-async", None, ["step_off=2"],
     "step_off=2 is read only by schedule=step_off; this run is schedule=async"),
    ("max_staleness-sync", None, ["schedule=sync", "max_staleness=4"],
     "max_staleness=4 is read only by schedule=async; this run is schedule=sync"),
    ("student-no-weights", None, ["student=<noweights>"],
     "student <noweights>: no model.safetensors (nor model.safetensors.index.json)"),
    ("teacher-no-weights", None, ["teacher=<noweights>"], "teacher <noweights>: no model.safetensors"),
    ("student-truncated", None, ["student=<truncated>"],
     "student <truncated>/model.safetensors: ... bytes but its header declares ... so it is truncated"),
    ("teacher-truncated", None, ["teacher=<truncated>"], "teacher <truncated>/model.safetensors: ... truncated"),
    ("teacher-garbage-header", None, ["teacher=<garbageheader>"],
     "teacher <garbageheader>/model.safetensors: not a safetensors file (its header is unreadable)"),
    ("teacher-missing-shard", None, ["teacher=<missingshard>"],
     "teacher <missingshard>: ['model-00002-of-00002.safetensors'] named by model.safetensors.index.json missing"),
    ("student-no-tokenizer", None, ["student=<notokenizer>"], "student <notokenizer>: no tokenizer"),
]


def fill(env, text):
    return re.sub(r"<([\w.]+)>", lambda m: env[m.group(1)], text)


def overrides(env, args):
    """The valid baseline with the case's overrides; a key the case sets is not in the base (a key twice is refused)."""
    base = [f"student={env['student']}", f"teacher={env['teacher']}", f"out_dir={env['runs']}", *VALID]
    keys = {a.split("=")[0] for a in args}
    return [fill(env, a) for a in [a for a in base if a.split("=")[0] not in keys] + args]


@pytest.mark.parametrize("case,config_file,args,says", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_line(env, case, config_file, args, says):
    before = sorted(os.listdir(env["runs"]))
    with pytest.raises(ValueError) as e:
        preflight.check_inputs(config.load_config(config_file and fill(env, config_file), overrides(env, args)))
    message = str(e.value)
    assert all(fill(env, part) in message for part in says.split(" ... ")) and "\n" not in message, message
    assert sorted(os.listdir(env["runs"])) == before and not multiprocessing.active_children()


def test_the_valid_baseline_passes(env):
    """The table's cases differ from this accepted config only by what they name; each new limit is a real one (at
    the limit, or where it does not apply, the config passes)."""
    preflight.check_inputs(config.load_config(None, overrides(env, [])))
    preflight.check_inputs(config.load_config(None, overrides(env, ["data=<ok.jsonl>", "student=<astudent>",
                                                                 "teacher=<ateacher>", "eval_size=4"])))
    cores = len(os.sched_getaffinity(0))
    for ok in (["teacher=<sharded>", "student=<sharded>"],  # an index and all its shards
               [f"threads={cores}", "start_method=spawn"],
               ["loss.name=forward_kl_topk", "loss.teacher_topk=17"],
               ["loss.name=reverse_kl_support", "loss.student_topk=17"],
               ["loss.teacher_topk=1000000"],  # reverse_kl_mc reads no top-K field
               ["loss.samples=100"],  # more draws than tokens: i.i.d. with replacement
               [f"eval_size={task.DEFAULT_LIMIT['test']}"], ["dist_timeout_s=604800"], ["run_name=" + "x" * 200],
               ["schedule=step_off", "step_off=2"], ["schedule=sync", "max_staleness=2"]):  # a default stays allowed
        preflight.check_inputs(config.load_config(None, overrides(env, ok)))
    cfg = config.load_config(env["okfile.yaml"], overrides(env, ["steps=5"]))  # a file's key overridden once
    assert (cfg.steps, cfg.lr) == (5, 0.01)


def test_unrepresentable_text_is_refused_not_dropped(tiny_models):
    """The shipped tokenizer has no <unk>: it drops what it cannot spell ('１２+３４=' became '+=')."""
    from transformers import AutoTokenizer
    shipped = AutoTokenizer.from_pretrained(os.path.join(ROOT, "models", "student"))
    assert shipped.decode(shipped("１２+３４=", add_special_tokens=False)["input_ids"]) == "+="  # the silent drop
    cfg = config.Config()

    def check(tok, text, field="ids"):
        row = {"prompt": text, "ids": task.encode_prompt(tok, text)}
        row[field] = row[field] if field == "ids" else list(row["ids"])
        prompt_checks.check_prompts(cfg, [{"prompt": "0+0=", "ids": [1]}, row], "data", {field: tok})
        return row["ids"]

    for tok in (shipped, AutoTokenizer.from_pretrained(tiny_models[0]), ascii_tokenizer()):
        with pytest.raises(ValueError, match="^data row 2: prompt '１２\\+３４=' has characters '１２３４' outside "):
            check(tok, "１２+３４=")
        with pytest.raises(ValueError, match=r"row 2 \(as the teacher renders it\): .* outside the tokenizer's"):
            check(tok, "１２+３４=", "teacher_ids")
        assert tok.decode(check(tok, "0012+0034=")) == "0012+0034="
    with pytest.raises(ValueError, match="encodes to no tokens"):
        check(shipped, " ")
    with pytest.raises(ValueError, match="has 11 tokens > max_prompt_len=10"):
        prompt_checks.check_prompts(config.Config(max_prompt_len=10), [{"prompt": "0012+0034=;", "ids": [5] * 11}],
                                "data", {"ids": shipped})


def test_make_run_dir_never_shares_a_folder(tmp_path):
    cfg = config.Config(out_dir=str(tmp_path / "out"))
    first, second = coordinator.make_run_dir(cfg), coordinator.make_run_dir(cfg)  # same second, timestamp names
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == str(tmp_path / "out")
    cfg.run_name = os.path.basename(first)
    with pytest.raises(ValueError, match="exists: choose another run_name"):
        coordinator.make_run_dir(cfg)


def test_precompute_refuses_a_bad_cache_dir_and_reports_a_full_disk(env, monkeypatch, capsys):
    base = overrides(env, ["precompute_prompts=4", "chunk_prompts=4", "eval_size=0"])
    with pytest.raises(ValueError, match=r"cache_dir=.*afile is a file, not a folder"):
        preflight.check_inputs(config.load_config(None, base + [f"cache_dir={env['afile']}"]), precompute=True)

    def full(*_, **__):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{env['d']}/cache/chunk_00000.safetensors")
    monkeypatch.setattr(offline, "write_chunk", full)
    assert asyncopd.main(["precompute", *base, f"cache_dir={env['d']}/cache"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on /" in err and "chunk_00000" in err, err
    assert "free space there, or give out_dir (cache_dir) on a larger file system, then rerun" in err, err


# through the real command line: exit code 2, one stderr line, no traceback, no run folder
CLI = [
    ("yaml-syntax", ["train", "<syntax.yaml>"], "syntax.yaml line 4"),
    ("yaml-list", ["train", "<list.yaml>"], "is a YAML list"),
    ("batch_size-0", ["train", "batch_size=0"], "batch_size=0 must be >= 1"),
    ("out_dir-file", ["train", "out_dir=<afile>"], "is a file, not a folder"),
    ("run_name-reused", ["train", "run_name=taken"], "choose another run_name"),
    ("malformed-jsonl", ["train", "data=<malformed.jsonl>"], "malformed.jsonl line 3"),
    ("precompute-chunk_prompts-0", ["precompute", "chunk_prompts=0", "cache_dir=<d>/c"],
     "chunk_prompts=0 must be >= 1"),
    ("yaml-deep", ["train", "<deep.yaml>"], "deep.yaml line 2: nested deeper than a config can be"),
    ("override-twice", ["train", "steps=4", "steps=2"], "override 'steps=2' sets steps again after 'steps=4'"),
    ("threads-beyond-cores", ["train", "threads=100000"], "threads=100000 is more than the"),
    ("teacher-truncated", ["train", "teacher=<truncated>"], "so it is truncated"),
]


def test_hostile_input_on_the_command_line(env):
    before = sorted(os.listdir(env["runs"]))
    procs = []
    for case, (cmd, *args), says in CLI:  # in parallel: the start-up (imports) dominates
        argv = [sys.executable, os.path.join(ROOT, "asyncopd.py"), cmd] + [a for a in args if a.endswith(".yaml>")]
        argv += overrides(env, [a for a in args if not a.endswith(".yaml>")])
        procs.append((case, says, subprocess.Popen([fill(env, a) for a in argv], cwd=ROOT, text=True,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for case, says, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.count("\n") == 1 and err.startswith("asyncopd: error: "), (case, err[-2000:])
        assert says in err and "Traceback" not in err and out == "", (case, err)
    assert sorted(os.listdir(env["runs"])) == before and not os.path.exists(f"{env['d']}/c")
