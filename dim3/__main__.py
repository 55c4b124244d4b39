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
    # torch's CUDA build imports NVIDIA's Python bindings of the CUDA driver and runtime
    # (``cuda.bindings``, installed with it) for APIs no command calls (CUDA graph
    # annotations, green contexts, managed memory); a CUDA merge uses streams, events and
    # pinned memory, torch's own C++. Importing them was 50-140 ms of every command's start on
    # a 2-core machine (``python -X importtime``). While torch is imported they are missing
    # (torch then does without them, as where they are not installed), and put back at once.
    if "cuda.bindings" not in sys.modules:
        sys.modules["cuda.bindings"] = None  # type: ignore[assignment]  # import fails: not found
        try:
            import torch  # noqa: F401
        finally:
            del sys.modules["cuda.bindings"]
from dim3.cli import main  # noqa: E402


def _numba_without_blas_check() -> None:
    """Load numba's numpy support with its BLAS check failing. When a process's first kernel
    call loads it, ``numba.np.arraymath`` checks once for a BLAS (for ``np.dot`` and the like,
    which no kernel of :mod:`dim3.kernels` calls) by importing ``scipy.linalg.cython_blas``: all
    of ``scipy.linalg`` and, through scipy, ``numpy.f2py``: 0.1 s of a 2-core machine's time
    at the start of every merge (docs/performance-log.md). Here it finds ``scipy.linalg``
    missing, and numba would use its own loops. Run on the main thread before any other starts
    (no other import can meet the missing entry), which is put back at once: ``scipy.linalg``
    imports as usual afterwards. Where the module will not import so (a numba that moved it),
    numba loads it itself at the first kernel call, the check included, as before."""
    try:
        import numba  # noqa: F401  (its own version check imports scipy's top level only)
    except ImportError:
        return  # the engine runs torch's code
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import fails: not found
    try:
        import numba.np.arraymath  # noqa: F401
    except ImportError:
        pass
    finally:
        del sys.modules["scipy.linalg"]


if sys.argv[1:2] == ["merge"]:
    _numba_without_blas_check()
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
