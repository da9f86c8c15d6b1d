r"""Supervised fine-tuning: the embedded teacher and the teacher-consistent student.

Reproduce the shipped models (CPU, one thread of a busy 2-core machine: 12 min and 1.5 min):

    .venv/bin/python -m tools.sft teacher --out models/teacher --steps 1200 --seed 0 --threads 1
    .venv/bin/python -m tools.sft student --teacher models/teacher --out models/student --steps 1000 \
        --target-accuracy 0.2 --seed 0 --threads 1

The teacher learns the written additions of task.py from the ground truth. The student is
smaller and learns from the teacher's own samples (temperature 1), so the teacher that scores
its OPD rollouts is the one it was distilled from ("teacher consistency", Lightning OPD); the
teacher's fingerprint goes into <out>/asyncopd_sft.json. Both losses are the next-token
cross-entropy on response tokens only:  L = -1/|R| sum_{r in R} log p(y_r | x, y_<r).

    .venv/bin/python -m tools.sft eval --model models/student --n 500   # held-out greedy accuracy
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

import task
from optional.offline import fingerprint

# Shapes of the two embedded models (Qwen2 = Llama-style decoder with RoPE, RMSNorm, SwiGLU).
SIZES = {
    "teacher": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4),
    "student": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2),
}
# Per-stage defaults. The student stops early once its greedy accuracy on the VAL_PROBLEMS validation problems reaches
# --target-accuracy: its accuracy stays near 0% for ~250-400 steps (the step varies with seed and data), then climbs
# to >90% within ~100-150 steps as the digit-copying attention forms, so a fixed step count would land on either side
# of the window OPD needs.
STAGE_DEFAULTS = {"teacher": dict(steps=1200, log_every=100, target_accuracy=None),
                  "student": dict(steps=1000, log_every=5, target_accuracy=0.2)}
VAL_PROBLEMS = 200  # train-split problems after the training ones: never trained on, never held out


def response_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-padded prompt+response ids and labels that are -100 except on response tokens.
    Right padding needs no attention mask: causal attention never looks at later pad tokens."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids = torch.full((len(prompts), width), pad_id)
    labels = torch.full((len(prompts), width), -100)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    return ids, labels


def train(model, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float,
          pad_id: int, seed: int, log_every: int = 100, eval_fn=None, stop_at: float | None = None) -> int:
    """AdamW on the masked next-token loss, linear warmup then cosine decay to lr/10.
    Examples are (prompt_ids, response_ids) pairs, visited in seeded random order, epoch by epoch.
    Every log_every steps eval_fn() (an accuracy) is logged; with stop_at, training stops at the
    first check where it reaches stop_at. Returns the number of steps taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))
    order, cursor, t0 = torch.randperm(len(examples), generator=gen), 0, time.time()
    model.train()
    for step in range(1, steps + 1):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(examples), generator=gen), 0
        batch = [examples[j] for j in order[cursor:cursor + batch_size].tolist()]
        cursor += batch_size
        ids, labels = response_batch([b[0] for b in batch], [b[1] for b in batch], pad_id)
        logits = model(input_ids=ids).logits
        # position k predicts token k+1
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        progress = (step - warmup) / max(1, steps - warmup)
        scale = step / warmup if step <= warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps:
            acc = eval_fn() if eval_fn is not None else None
            extra = f" val_acc {acc:.3f}" if acc is not None else ""
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s{extra}", flush=True)
            if stop_at is not None and acc is not None and acc >= stop_at:
                print(f"val_acc {acc:.3f} >= {stop_at}: stopping at step {step}")
                return step
            model.train()
    return steps


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[list[int]], temperature: float, batch_size: int,
                     max_new_tokens: int = task.MAX_NEW_TOKENS) -> list[list[int]]:
    """One sampled response per prompt (pure softmax(logits/T) sampling, no top-k/top-p), cut after
    the first <eos>. Prompts of the embedded task all have the same length, so no padding."""
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[i:i + batch_size])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             temperature=temperature, top_k=None, top_p=None, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, ids.shape[1]:].tolist():
            eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            out.append(row[:eos])
    return out


def save(model, tokenizer, out: str, info: dict):
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=task.MAX_NEW_TOKENS)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "asyncopd_sft.json"), "w") as f:
        json.dump(info, f, indent=1)
    mb = os.path.getsize(os.path.join(out, "model.safetensors")) / 2**20
    print(f"saved {out} ({sum(p.numel() for p in model.parameters())} params, {mb:.2f} MB)")


def heldout_eval(model, tokenizer, n: int) -> float:
    return task.evaluate(model, tokenizer, task.read_prompts("addition", "test", n))


def training_data(args, steps: int):
    """(tokenizer, prompts, responses, info) of the teacher or student stage; prompts has VAL_PROBLEMS more
    entries than responses, the validation problems."""
    if args.stage == "teacher":  # ground truth: the written solution followed by <eos>
        tokenizer = task.build_tokenizer()
        pairs = task.addition_problems("train", steps * args.batch_size + VAL_PROBLEMS)
        prompts = [task.encode_prompt(tokenizer, task.addition_prompt(a, b)) for a, b in pairs]
        responses = [tokenizer(task.addition_solution(a, b), add_special_tokens=False)["input_ids"]
                     + [tokenizer.eos_token_id] for a, b in pairs[:-VAL_PROBLEMS]]
        return tokenizer, prompts, responses, {"data": "ground truth"}
    if not args.teacher or not os.path.isfile(os.path.join(args.teacher, "model.safetensors")):
        raise ValueError(f"--teacher {args.teacher} has no model.safetensors; train one with "
                         "`python -m tools.sft teacher --out models/teacher`")
    tokenizer, teacher = AutoTokenizer.from_pretrained(args.teacher), AutoModelForCausalLM.from_pretrained(args.teacher)
    prompts = [task.encode_prompt(tokenizer, r["prompt"])
               for r in task.read_prompts("addition", "train", args.samples + VAL_PROBLEMS)]
    t0 = time.time()
    responses = sample_responses(teacher, tokenizer, prompts[:-VAL_PROBLEMS], args.temperature, batch_size=500)
    print(f"sampled {len(responses)} teacher responses at temperature {args.temperature} in {time.time() - t0:.0f}s")
    return tokenizer, prompts, responses, {"teacher_fingerprint": fingerprint(args.teacher),
                                           "teacher_dir": args.teacher, "teacher_temperature": args.temperature,
                                           "samples": args.samples}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["teacher", "student", "eval"])
    p.add_argument("--out", help="output model dir (teacher, student)")
    p.add_argument("--teacher", help="teacher model dir (student)")
    p.add_argument("--model", help="model dir to evaluate (eval)")
    p.add_argument("--size", choices=sorted(SIZES), help="architecture (default: the stage's name)")
    p.add_argument("--steps", type=int, help="optimizer steps, at most (default 1200 teacher, 1000 student)")
    p.add_argument("--target-accuracy", type=float, help="stop once validation accuracy >= this "
                   "(default 0.2 student, off teacher; 0 = off)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=16000, help="teacher samples for the student")
    p.add_argument("--temperature", type=float, default=1.0, help="teacher sampling temperature (student)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=500, help="held-out problems for the final accuracy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, help="steps between validation checks (default 100 teacher, 5 student)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("reproduce: python " + " ".join(sys.argv), flush=True)
    t0 = time.time()
    if args.stage == "eval":
        if not args.model or not os.path.isdir(args.model):
            raise ValueError(f"--model {args.model} is not a model dir; pass e.g. --model models/student")
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
        print(f"{args.model}: held-out greedy accuracy {heldout_eval(model, tokenizer, args.n):.3f} (n={args.n})")
        return
    if not args.out:
        raise ValueError(f"{args.stage} needs --out DIR, e.g. --out models/{args.stage}")
    defaults = STAGE_DEFAULTS[args.stage]
    steps = args.steps or defaults["steps"]
    target = defaults["target_accuracy"] if args.target_accuracy is None else (args.target_accuracy or None)
    tokenizer, prompts, responses, info = training_data(args, steps)
    val = task.read_prompts("addition", "train", len(prompts))[-VAL_PROBLEMS:]
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=128,
                                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                                         **SIZES[args.size or args.stage]))
    taken = train(model, list(zip(prompts[:-VAL_PROBLEMS], responses, strict=True)), steps, args.batch_size, args.lr,
                  tokenizer.pad_token_id, args.seed, args.log_every or defaults["log_every"],
                  eval_fn=lambda: task.evaluate(model, tokenizer, val), stop_at=target)
    accuracy = heldout_eval(model, tokenizer, args.n)
    info.update(steps=taken, max_steps=steps, target_accuracy=target, accuracy=accuracy, eval_n=args.n,
                seed=args.seed, wall_s=round(time.time() - t0), command="python -m tools.sft " + " ".join(sys.argv[1:]))
    save(model, tokenizer, args.out, info)
    print(f"{args.stage}: held-out greedy accuracy {accuracy:.3f} (n={args.n}), {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
