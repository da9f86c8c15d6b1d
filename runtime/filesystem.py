"""What a failed write tells the user: which file system refused it, how much room is left there, and the fix. The
coordinator (metrics, trace, plots), the learner (checkpoints) and the command line (run folder, offline cache) report
through it. You need not read it to learn OPD.
"""
import errno
import os
import shutil

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """ENOSPC whose message is the whole story (no "[Errno 28]" prefix)."""

    def __init__(self, path: str, needed: float = 0.0):
        super().__init__(errno.ENOSPC, no_space(path, needed), path)

    def __str__(self) -> str:
        return self.strerror


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, file system type) that holds `path` (or its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    kind = "?"
    try:
        with open("/proc/self/mounts") as f:
            kind = next((fields[2] for fields in map(str.split, f) if fields[1] == path), "?")
    except OSError:
        pass
    return path, kind


def size(n: float) -> str:
    """Bytes as a short human number: 3.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def is_full(e: BaseException) -> bool:
    """A write refused for lack of space (safetensors and torch.save report it in their own words)."""
    text = str(e)
    return (isinstance(e, OSError) and e.errno in FULL) or "No space left" in text or "StorageFull" in text \
        or "Disk quota" in text or "file write failed" in text


def no_space(path: str, needed: float = 0.0) -> str:
    """One line: the file system holding `path` is full, with its free space (and what was needed), and the fix."""
    mount, kind = mount_of(path)
    usage = shutil.disk_usage(mount)
    need = f", {size(needed)} needed" if needed else ""
    return (f"no space left on {mount} ({kind}, {size(usage.free)} free of {size(usage.total)}{need}) to write "
            f"{path}: free space there, or give out_dir (cache_dir) on a larger file system")


def write_error(e: OSError, path: str | None = None) -> str:
    """One line for an OSError of a write: a full file system named with its free space, or the error and the file."""
    path = path or e.filename or "?"
    if is_full(e):
        return no_space(str(path))
    what = e.strerror or " ".join(str(e).split())
    return f"cannot write {path} ({what}): fix the file system or give out_dir (cache_dir) elsewhere"
