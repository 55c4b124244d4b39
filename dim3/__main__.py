"""``python -m dim3``: the command line."""

import os
import sys
import threading

from dim3.cli import main

# Commands that close (and for a merge, fsync and rename into place) everything they write before
# they return, and register nothing to run at exit.
QUICK_EXIT = ("merge", "plan")

code = main()
if sys.argv[1:2] and sys.argv[1] in QUICK_EXIT:
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
