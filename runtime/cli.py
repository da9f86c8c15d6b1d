"""asyncopd's command line: `python asyncopd.py [train|precompute] [CONFIG.yaml] [key=value ...]`. It turns each way
a command can end into one line and an exit code: 0 done; 2 bad input (refused before anything started); 1 a failed
run (named role, and the checkpoint to resume from); 128 + N stopped by signal N (SIGINT 130, SIGTERM 143, SIGHUP 129),
with the summary and the resume hint. You need not read it to learn OPD.
"""
import signal
import sys
from collections.abc import Callable

from config import config_help, load_config
from runtime import coordinator, filesystem, preflight


def main(argv: list[str], train: Callable, precompute: Callable) -> int:
    """Run `train(cfg) -> summary` or `precompute(cfg, tokenizer, prompts) -> report line` (asyncopd.py's)."""
    if any(a in ("-h", "--help") for a in argv):
        print(config_help())
        return 0
    cmd = argv[0] if argv and argv[0] in ("train", "precompute") else "train"
    args = argv[1:] if argv and argv[0] == cmd else argv
    path = args[0] if args and "=" not in args[0] else None
    with coordinator.STOPS:  # to the last line: a signal during the run's shutdown still lets the report print
        try:
            cfg = load_config(path, [a for a in args if a != path])
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


def say(line: str, stream=None) -> None:
    """print, unless the terminal is gone (SIGHUP): the run folder keeps everything."""
    try:
        print(line, file=stream or sys.stdout, flush=True)
    except OSError:
        pass
