"""asyncopd's command line: `python asyncopd.py [train|precompute|print-config] [CONFIG.yaml] [key=value ...]` and
`--help`. It turns each way a command can end into one line and an exit code: 0 done; 2 bad input (refused before
anything started); 1 a failed run (named role, and the checkpoint to resume from); 128 + N stopped by signal N (SIGINT
130, SIGTERM 143, SIGHUP 129), with the summary and the resume hint. You need not read it to learn OPD.
"""
import dataclasses
import inspect
import re
import signal
import sys
from collections.abc import Callable

import estimators
from config import Config, load_config
from estimators import LossOptions
from runtime import coordinator, filesystem, preflight
from runtime.coordinator import say
from runtime.strict_yaml import dump_yaml

COMMANDS = ("train", "precompute", "print-config")


def main(argv: list[str], train: Callable, precompute: Callable) -> int:
    """Run `train(cfg) -> summary` or `precompute(cfg, tokenizer, prompts) -> report line` (asyncopd.py's)."""
    cmd = argv[0] if argv and argv[0] in COMMANDS else "train"
    args = [a for a in (argv[1:] if argv and argv[0] == cmd else argv) if a not in ("-h", "--help")]
    path = args[0] if args and "=" not in args[0] else None
    with coordinator.STOPS:  # to the last line: a signal during the run's shutdown still lets the report print
        try:
            cfg = load_config(path, [a for a in args if a != path])
            if len(args) < len(argv) - (argv[:1] == [cmd]):  # -h / --help
                say(config_help(cfg if args else None, path or "the command line"))
                return 0
            if cmd == "print-config":  # the values a run would get, checked (models, data and devices are not)
                preflight.check_values(cfg)
                say(dump_yaml(dataclasses.asdict(cfg)).rstrip())
                return 0
            if cmd == "precompute":
                tok, train_prompts, _ = preflight.check_inputs(cfg, precompute=True)
                say(precompute(cfg, tok, train_prompts))
                return 0
            summary = train(cfg)
        except ValueError as e:  # bad input: one line, before anything started
            say(f"asyncopd: error: {e}", sys.stderr)
            return 2
        except RuntimeError as e:  # a failed run: the role, the cause, the checkpoint to resume from
            say(f"asyncopd: {e}", sys.stderr)
            return 1
        except OSError as e:  # e.g. a full disk during precompute: finished chunks stay, a rerun resumes
            say(f"asyncopd: error: {filesystem.write_error(e)}, then rerun", sys.stderr)
            return 1
        except KeyboardInterrupt as e:  # a stop signal before the children started (or in precompute's one process)
            say("asyncopd: precompute interrupted: its finished chunks stay, a rerun resumes" if cmd == "precompute"
                else "asyncopd: interrupted during start-up: nothing to save", sys.stderr)
            return 128 + getattr(e, "signum", signal.SIGINT)
        if coordinator.STOPS.received and not summary.get("interrupted"):  # during the offline evaluation
            summary["interrupted"] = coordinator.STOPS.received[0][0]
        say(coordinator.summary_table(cfg, summary))
        if summary.get("interrupted"):
            first = signal.Signals(summary["interrupted"]).name
            if summary.get("killed_by"):
                second = signal.Signals(summary["killed_by"]).name
                say(f"interrupted by {first}, then stopped at once by a second {second} (the last step may be lost)"
                    f"{coordinator.resume_hint(summary)}")
            else:
                say(f"interrupted by {first}{coordinator.resume_hint(summary)}")
            return 128 + summary["interrupted"]
        return 0


def config_help(cfg: Config | None = None, source: str = "") -> str:
    """Every config key with its default and the comment written next to it in Config / LossOptions, [the value cfg
    sets] where it differs (`bash run.sh --help`: configs/default.yaml's); every estimator name."""
    lines = ["usage: python asyncopd.py [train|precompute|print-config] [CONFIG.yaml] [key=value ...]",
             "       (loss keys: loss.KEY=VALUE; print-config: the effective config as YAML, its values checked)", "",
             f"config keys (default{f', or [what {source} sets]' if cfg else ''}  # meaning):"]
    for cls, prefix in ((Config, ""), (LossOptions, "loss.")):
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s{4}(\w+): \w+ = (.*?)\s+#\s(.*)$", line)
            if m and m.group(1) != "loss":
                default = getattr(cls(), m.group(1))
                set_to = getattr(cfg.loss if prefix else cfg, m.group(1)) if cfg else default
                shown = f"{default!r}" if set_to == default else f"[{set_to!r}]"
                lines.append(f"  {prefix + m.group(1):<26} {shown:<18} # {m.group(3)}")
            elif re.match(r"\s{4}#\s{3}", line):  # a comment continued on the next line
                lines[-1] += " " + line.strip()[1:].strip()
            elif re.match(r"\s{4}#\s\S", line):  # a section of keys
                lines.append(f" {line.strip()[2:]}:")
    first = lambda fn: (inspect.getdoc(fn) or "").splitlines()[0]  # noqa: E731
    lines += ["", "estimators (loss.name; formulas, bias, variance and staleness in estimators.py):"]
    lines += [f"  {name:<26} {first(e.fn)}" for name, e in estimators.ESTIMATORS.items()]
    return "\n".join(lines)
