"""The teacher on vLLM 0.32.0: t read from vLLM's prompt log-probs, either in this process (tensor parallel over the
teacher's GPUs, teacher_engine=vllm) or from a `vllm serve` on other nodes (teacher_url). It fills the fields that
teacher_cache.score fills, in batch_format.py's shift convention; teacher_cache.score_unit calls its score().

One request per sequence. The prompt is the teacher's prompt p (P tokens) followed by the student's response y
(L tokens), so every response token is a prompt token that vLLM scores under the teacher, after its prefix;
max_tokens=1 (vLLM generates at least one token; it is not read). Facts used, from the vllm 0.32.0 source:

- prompt_logprobs=K (sampling_params.py): entry P + r of RequestOutput.prompt_logprobs is {id: Logprob} for y_r,
  holding y_r itself and the teacher's top-K (rank 1..K; -1: all V ids) -> teacher_logp, teacher_topk_*,
  teacher_dense_logp.
- prompt_logprob_token_ids [L, n] with prompt_logprob_start = P - 1: row i of RequestOutput.prompt_token_id_logprobs
  scores its ids as predictions of prompt token P - 1 + i + 1 = P + i, i.e. response row i -> student_topk_teacher_logp
  (at student_topk_ids), mc_teacher_logp (at mc_ids). Model Runner V2 only (v1/engine/input_processor.py refuses it
  otherwise; v1/worker/gpu/sample/prompt_logprob.py computes it): a GPU, VLLM_USE_V2_MODEL_RUNNER=1.
- Raw log-probs (logprobs_mode's default, raw_logprobs): log_softmax of the logits at temperature 1, from an fp32 LM
  head with hf_overrides={"head_dtype": "float32"} (config/model.py), as the HF teacher's float32 log_softmax.
- Prefix caching: skip_reading_prefix_cache defaults to True when prompt log-probs are asked for (sampling_params.py);
  a request whose first scored row was still skipped gets no prompt_token_id_logprobs (prompt_logprob.py): parse
  refuses a missing or misshaped answer rather than train on a hole.
- `vllm serve --enable-scale-out` adds POST /inference/v1/generate (entrypoints/scale_out/token_in_token_out/):
  {"token_ids", "sampling_params", "output_mode"} in; prompt_logprobs with -inf written as -9999.0
  (entrypoints/generate/base/serving.py clamp_prompt_logprobs) and prompt_token_id_logprobs as base64 .npy
  (utils/serial_utils.py numpy2base64) out. GET /v1/models gives the served model and its max_model_len.

Not served: the teacher's own draws (teacher_mc_*, forward_kl_mc): prompt log-probs score given ids, they draw none.
"""
import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from transformers import AutoConfig

import estimators
from batch_format import TEACHER_AT_ROLLOUT_IDS, Batch, validate_batch
from config import Config, teacher_devices
from optional import vllm_support
from runtime.coordinator import visible_device

FROM_PROMPT_LOGPROBS = {"teacher_logp", "teacher_topk_ids", "teacher_topk_logp", "teacher_dense_logp"}
SERVED = FROM_PROMPT_LOGPROBS | set(TEACHER_AT_ROLLOUT_IDS)  # every teacher field but the teacher's own draws
CLAMPED_NEG_INF = -9999.0  # what the server writes for -inf in prompt_logprobs
CPU_KV_CACHE_BYTES = 1 << 30  # KV cache of a CPU engine (its prompts are the unit's sequences, one pass each)


def check_fields(fields: set | frozenset, where: str) -> None:
    """One-line ValueError if a vLLM teacher cannot fill these fields."""
    if fields - SERVED:
        raise ValueError(f"{where} cannot fill {sorted(fields - SERVED)}: vLLM's prompt log-probs score given ids, "
                         "they draw none from the teacher; use teacher_engine=hf for this estimator")


def requests_for(traj: Batch, fields: set | frozenset, teacher_topk: int) -> list[tuple[list[int], dict]]:
    """Per sequence: (prompt + response token ids, SamplingParams keywords) asking for exactly `fields`."""
    check_fields(fields, "a vLLM teacher")
    pcu, cu, ids = traj["prompt_cu_seqlens"].tolist(), traj["cu_seqlens"].tolist(), traj["prompt_ids"].tolist()
    tokens = traj["token_ids"].tolist()
    by_ids = [traj[TEACHER_AT_ROLLOUT_IDS[f]] for f in sorted(fields & set(TEACHER_AT_ROLLOUT_IDS))]
    id_rows = torch.cat(by_ids, 1).tolist() if by_ids else None
    width = -1 if "teacher_dense_logp" in fields else teacher_topk if fields & {"teacher_topk_ids"} else 0
    out = []
    for i in range(len(cu) - 1):
        P = pcu[i + 1] - pcu[i]
        params = {"max_tokens": 1, "temperature": 0.0, "detokenize": False, "prompt_logprobs": width}
        if id_rows is not None:
            params.update(prompt_logprob_token_ids=id_rows[cu[i]:cu[i + 1]], prompt_logprob_start=P - 1)
        out.append((ids[pcu[i]:pcu[i + 1]] + tokens[cu[i]:cu[i + 1]], params))
    return out


def parse(traj: Batch, fields: set | frozenset, teacher_topk: int, vocab_size: int,
          answers: list[tuple[list, np.ndarray | None]]) -> Batch:
    """traj + fields from each sequence's answer: (prompt_logprobs as [None | {id: (logprob, rank)}], the
    prompt_token_id_logprobs array or None). Every row is checked: a missing or short answer raises."""
    pcu, cu, tokens = traj["prompt_cu_seqlens"].tolist(), traj["cu_seqlens"].tolist(), traj["token_ids"].tolist()
    by_ids = sorted(fields & set(TEACHER_AT_ROLLOUT_IDS))
    widths = [traj[TEACHER_AT_ROLLOUT_IDS[f]].shape[1] for f in by_ids]
    if len(answers) != len(cu) - 1:
        raise RuntimeError(f"vLLM teacher: {len(answers)} answers for {len(cu) - 1} sequences")
    rows, id_logp = [], []
    for i, (logprobs, scores) in enumerate(answers):
        P, L = pcu[i + 1] - pcu[i], cu[i + 1] - cu[i]
        if logprobs is None or len(logprobs) != P + L:
            raise RuntimeError(f"vLLM teacher: sequence {i} came back with {len(logprobs or ())} prompt log-prob rows, "
                               f"expected {P + L} (prompt {P} + response {L})")
        rows += logprobs[P:]
        if by_ids:
            if scores is None or tuple(scores.shape) != (L, sum(widths)):
                raise RuntimeError(f"vLLM teacher: sequence {i} came back with prompt_token_id_logprobs of shape "
                                   f"{None if scores is None else tuple(scores.shape)}, expected {(L, sum(widths))}")
            id_logp.append(torch.from_numpy(np.asarray(scores, dtype=np.float32)))
    out = dict(traj)
    try:
        out["teacher_logp"] = torch.tensor([row[y][0] for row, y in zip(rows, tokens, strict=True)])
    except KeyError as e:
        raise RuntimeError(f"vLLM teacher: no log-prob for the response token {e} in its prompt_logprobs") from None
    if fields & {"teacher_topk_ids", "teacher_topk_logp"}:  # the top-K ranks 1..K; y_r after an equal-rank entry
        top = [sorted(row.items(), key=lambda kv, y=y: (kv[1][1], kv[0] == y))[:teacher_topk]
               for row, y in zip(rows, tokens, strict=True)]
        if any(len(t) < teacher_topk or t[-1][1][1] > teacher_topk for t in top):
            raise RuntimeError(f"vLLM teacher: fewer than teacher_topk={teacher_topk} ids in its prompt_logprobs")
        out["teacher_topk_ids"] = torch.tensor([[k for k, _ in t] for t in top], dtype=torch.int64)
        out["teacher_topk_logp"] = torch.tensor([[v[0] for _, v in t] for t in top])
        for f in ("teacher_topk_ids", "teacher_topk_logp"):  # [N, K] also when N = 0
            out[f] = out[f].view(-1, teacher_topk)
    if "teacher_dense_logp" in fields:
        if any(len(row) != vocab_size for row in rows):
            raise RuntimeError(f"vLLM teacher: prompt_logprobs=-1 gave fewer than V={vocab_size} ids at some row")
        dense = torch.empty(len(rows), vocab_size)
        for r, row in enumerate(rows):
            dense[r, list(row)] = torch.tensor([v[0] for v in row.values()])
        out["teacher_dense_logp"] = dense
    if by_ids:
        for f, part in zip(by_ids, torch.cat(id_logp).split(widths, 1), strict=True):
            out[f] = part.contiguous()
    for f in out.keys() & FROM_PROMPT_LOGPROBS - {"teacher_topk_ids"}:
        out[f] = out[f].float().masked_fill(out[f] == CLAMPED_NEG_INF, float("-inf"))
    validate_batch(out, vocab_size=vocab_size, where="vLLM teacher output")
    return out


class VLLMTeacher:
    """vllm.LLM in this process (engine core in process; tensor_parallel_size > 1 starts vLLM's own workers)."""

    def __init__(self, model: str, fields: set | frozenset, teacher_topk: int, ids_per_row: int, *, dtype: str,
                 device: str, tensor_parallel_size: int = 1, **llm_kwargs):
        check_fields(fields, "teacher_engine=vllm")
        by_ids = bool(fields & set(TEACHER_AT_ROLLOUT_IDS))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vllm is imported: the engine core in process
        if by_ids:  # prompt_logprob_token_ids is Model Runner V2's
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        import vllm

        if device == "cpu":
            llm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
            llm_kwargs.setdefault("enforce_eager", True)
        widest = -1 if "teacher_dense_logp" in fields else max(teacher_topk, ids_per_row if by_ids else 0, 1)
        self.llm = vllm.LLM(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size, max_logprobs=widest,
                            hf_overrides={"head_dtype": "float32"}, **llm_kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.SamplingParams, self.TokensPrompt = vllm.SamplingParams, vllm.TokensPrompt

    def score(self, traj: Batch, fields: set | frozenset, teacher_topk: int) -> Batch:
        asks = requests_for(traj, fields, teacher_topk)
        outputs = self.llm.generate([self.TokensPrompt(prompt_token_ids=ids) for ids, _ in asks],
                                    [self.SamplingParams(**params) for _, params in asks], use_tqdm=False)
        answers = [([None if d is None else {k: (v.logprob, v.rank) for k, v in d.items()} for d in o.prompt_logprobs],
                    o.prompt_token_id_logprobs) for o in outputs]
        return parse(traj, fields, teacher_topk, self.vocab_size, answers)


class RemoteTeacher:
    """A `vllm serve --enable-scale-out` at `url`: one POST per sequence, `concurrency` in flight (the server batches
    them). A request that times out, cannot connect or gets a 5xx is retried `retries` times after 1, 2, 4, ... s;
    a 4xx (the server refuses the request) raises at once with the server's message."""

    def __init__(self, url: str, vocab_size: int, *, timeout_s: float = 600.0, retries: int = 3,
                 concurrency: int = 64):
        self.url, self.vocab_size, self.timeout_s = url.rstrip("/"), vocab_size, timeout_s
        self.retries, self.concurrency = retries, concurrency

    def _call(self, path: str, body: dict | None = None, retries: int | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    return json.load(reply)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")
                try:
                    detail = json.loads(detail)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    detail = detail[:300]
                if e.code < 500 or attempt == retries:
                    raise RuntimeError(f"teacher_url {self.url}{path} answered {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == retries:
                    raise RuntimeError(f"teacher_url {self.url}{path} unreachable after {retries + 1} tries "
                                       f"({getattr(e, 'reason', e)}): start `vllm serve` there (README, GPU section) "
                                       "or fix teacher_url") from None
            time.sleep(2 ** attempt)
        raise AssertionError("unreachable")

    def check(self, need_len: int, fields: set | frozenset, teacher_topk: int) -> None:
        """Before start: the server answers, serves a long enough context, and accepts this run's scoring request
        (a 2-token sequence). One-line ValueError naming the URL otherwise."""
        try:
            models = self._call("/v1/models", retries=0).get("data") or [{}]
            if models[0].get("max_model_len", 0) < need_len:
                raise RuntimeError(f"teacher_url {self.url} serves max_model_len={models[0].get('max_model_len')} "
                                   f"< {need_len} (max_prompt_len + max_new_tokens + 1): restart it with "
                                   f"--max-model-len {need_len}")
            probe = {"prompt_ids": torch.tensor([0]), "prompt_cu_seqlens": torch.tensor([0, 1]),
                     "cu_seqlens": torch.tensor([0, 1]), "token_ids": torch.tensor([0])}
            for f in fields & set(TEACHER_AT_ROLLOUT_IDS):
                probe[TEACHER_AT_ROLLOUT_IDS[f]] = torch.zeros(1, 1, dtype=torch.int64)
            self.score(probe, fields, teacher_topk, retries=0)
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[0]) from None

    def score(self, traj: Batch, fields: set | frozenset, teacher_topk: int, retries: int | None = None) -> Batch:
        def ask(item):
            ids, params = item
            body = {"token_ids": ids, "sampling_params": params, "output_mode": "tokens"}
            return self._call("/inference/v1/generate", body, retries)

        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(ask, item) for item in requests_for(traj, fields, teacher_topk)]
            try:
                replies = [f.result() for f in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the unit has failed: send no more of its requests
                raise
        answers = []
        for reply in replies:
            logprobs = [None if d is None else {int(k): (v["logprob"], v["rank"]) for k, v in d.items()}
                        for d in reply.get("prompt_logprobs") or []]
            scores = reply.get("prompt_token_id_logprobs")
            answers.append((logprobs or None, None if scores is None else
                            np.load(io.BytesIO(base64.b64decode(scores)), allow_pickle=False)))
        return parse(traj, fields, teacher_topk, self.vocab_size, answers)


TeacherOnVLLM = VLLMTeacher | RemoteTeacher


def from_config(cfg: Config, dtype: torch.dtype) -> TeacherOnVLLM:
    """The teacher of teacher_engine=vllm, built in the teacher process: at teacher_url, or here on the first
    teacher_tensor_parallel GPUs, which it shows vLLM alone (CUDA_VISIBLE_DEVICES, before vLLM starts)."""
    if cfg.teacher_url:
        return RemoteTeacher(cfg.teacher_url, AutoConfig.from_pretrained(cfg.teacher).vocab_size,
                             timeout_s=cfg.teacher_timeout_s)
    on_gpu = {}
    if cfg.teacher_device.startswith("cuda"):
        parent = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_device(d, parent) for d in teacher_devices(cfg))
        on_gpu = {"gpu_memory_utilization": cfg.gpu_memory_utilization}
    return VLLMTeacher(cfg.teacher, estimators.needs(cfg.loss).teacher | {"teacher_logp"}, cfg.loss.teacher_topk,
                       cfg.loss.student_topk + cfg.loss.samples, dtype=str(dtype).removeprefix("torch."),
                       device=cfg.teacher_device, tensor_parallel_size=cfg.teacher_tensor_parallel,
                       max_model_len=cfg.max_prompt_len + cfg.max_new_tokens + 1, **on_gpu)


def check_config(cfg: Config, fields: set, vocab_size: int) -> None:
    """Before start (runtime/preflight.py): teacher_engine=vllm can score these fields where it is asked to, in this
    process (the installed vLLM build, its devices) or at teacher_url (asked a 2-token request of this run's kind: the
    server refuses what it cannot do). Also refuses the vLLM teacher's keys without it."""
    if cfg.teacher_engine == "hf":
        if cfg.teacher_url or cfg.teacher_tensor_parallel != 1:
            raise ValueError("teacher_url and teacher_tensor_parallel are read by teacher_engine=vllm: set it, or drop "
                             "them")
        return
    check_fields(fields, f"teacher_engine=vllm ({cfg.loss.name})")
    if cfg.teacher_tensor_parallel > 1 and not cfg.teacher_device.startswith("cuda"):
        raise ValueError(f"teacher_tensor_parallel={cfg.teacher_tensor_parallel} spans GPUs: set teacher_device=cuda:N "
                         "or teacher_tensor_parallel=1")
    if cfg.eval_teacher and cfg.eval_size:
        raise ValueError("eval_teacher=true: the vLLM teacher only scores (its accuracy is not measured here): set "
                         "eval_teacher=false, or teacher_engine=hf")
    if cfg.teacher_url:
        RemoteTeacher(cfg.teacher_url, vocab_size, timeout_s=min(cfg.teacher_timeout_s, 30)).check(
            cfg.max_prompt_len + cfg.max_new_tokens + 1, fields, cfg.loss.teacher_topk)
    else:
        vllm_support.check_teacher(fields & set(TEACHER_AT_ROLLOUT_IDS), teacher_devices(cfg))
