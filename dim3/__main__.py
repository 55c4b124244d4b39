"""``python -m dim3``: the command line."""

import gc
import os
import sys
import threading

# Commands that close (and for a merge, fsync and rename into place) everything they write before
# they return, and register nothing to run at exit.
QUICK_EXIT = ("merge", "plan")
quick = sys.argv[1:2] and sys.argv[1] in QUICK_EXIT

# A command imports torch and numpy (and a merge numba): some 185,000 objects that live as long as
# the process. Python's full collections walk all of them, while every thread waits: four times
# while they are imported and once more during a merge. The collector is off while they are
# imported (a module keeps what its import makes, so there is little to free), and they are then
# set aside (``gc.freeze``): a full collection walks only what came after. A DiM3 merge command on
# the Qwen2-VL-2B trio spent 0.53-0.62 s in the collector before, 0.06-0.09 s so
# (``benchmarks/cli_gc.py``, docs/performance-log.md).
gc.disable()
if quick:
    # numpy's and scipy's OpenBLAS (numba imports scipy) each start a pool of threads that spin
    # for a while when loaded, and a merge or a plan multiplies no matrices through them. A
    # setting of the user's own is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from dim3.cli import main  # noqa: E402

gc.freeze()
gc.enable()

code = main()
if quick:
    # What is left after them is the interpreter's teardown: with torch loaded, finalizing its
    # modules and unloading its libraries took 0.3-0.9 s on a 2-core machine (a tenth of a 2B
    # merge, more than its plan). Wait for any thread that normal exit would wait for, flush
    # the standard streams, and end the process as it is.
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
