"""Children of a run die with their coordinator. Imported first by asyncopd.py: a spawned child re-imports the main
module before anything else, so the guard is in place before the seconds of torch and transformers imports."""
import ctypes
import os
import sys

COORDINATOR_ENV = "ASYNCOPD_COORDINATOR"  # the coordinator's pid, in its children's environment only


def die_with(coordinator_pid):
    """SIGKILL this process when its parent exits (PR_SET_PDEATHSIG); exit now if the parent is already gone."""
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6").prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != coordinator_pid:  # it died before the prctl: nobody to report to
        os._exit(1)


if os.environ.get(COORDINATOR_ENV):  # a child of a run (the variable stops here: grandchildren have other parents)
    die_with(int(os.environ.pop(COORDINATOR_ENV)))
