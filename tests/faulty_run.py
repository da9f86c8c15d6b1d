"""Test-only launcher: `ASYNCOPD_FAULT=F python tests/faulty_run.py train [k=v ...]` is asyncopd.py with a rollout
engine broken on purpose, so tests can show tools/gpu_check.py's assertions catching each silent failure:

    reload       load_weights keeps the old weights (only the version number moves)
    temperature  the temperature is applied twice (the engine samples and scores at T^2)
    draws        the MC draws (columns 1..) belong to the next row: samples of another position's distribution
    teacher_rows the vLLM teacher's fields are read one row off (t of the previous response token)

The patch is top-level code: spawned children re-import this file (as __mp_main__) and are broken too; forked
children inherit it. The product has no such hook."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import asyncopd  # noqa: E402
import rollout  # noqa: E402
from optional import vllm_teacher  # noqa: E402

FAULT = os.environ["ASYNCOPD_FAULT"]
FAULTS = ("reload", "temperature", "draws", "teacher_rows")
if FAULT not in FAULTS:
    raise SystemExit(f"ASYNCOPD_FAULT={FAULT!r}: use one of {FAULTS}")


def broken(engine: rollout.Engine) -> rollout.Engine:
    if FAULT == "reload":
        engine.load_weights = lambda state_dict, version: setattr(engine, "policy_version", int(version))
    elif FAULT == "temperature":
        engine.temperature = engine.temperature ** 2
    else:
        generate = engine.generate

        def shifted(*args, **kwargs):
            traj = generate(*args, **kwargs)
            for key in ("mc_ids", "mc_behavior_logp"):
                if key in traj:
                    traj[key][:, 1:] = torch.roll(traj[key][:, 1:], 1, dims=0)
            return traj
        engine.generate = shifted
    return engine


def shifted_parse(traj, fields, *args, parse=vllm_teacher.parse):
    out = parse(traj, fields, *args)
    return dict(out, **{f: torch.roll(out[f], 1, dims=0) for f in fields})


if FAULT == "teacher_rows":
    vllm_teacher.parse = shifted_parse
else:
    make_engine = rollout.make_engine
    rollout.make_engine = lambda *args, **kwargs: broken(make_engine(*args, **kwargs))

if __name__ == "__main__":
    sys.exit(asyncopd.main(sys.argv[1:]))
