"""DiM3 Studio: ``python app.py`` serves the merge studio and side-by-side chat.

Listens on ``$GRADIO_SERVER_NAME:$GRADIO_SERVER_PORT`` (default 127.0.0.1:7860; Docker and Spaces
set 0.0.0.0). Everything else lives in ``dim3.ui``.
"""

import gc

# The server imports torch, transformers and gradio and builds the app: some 350,000 objects that
# live as long as the process. Python's full collections walk all of them (0.17 s each on a 2-core
# machine) while every thread waits: every visitor's request, a merge's read and tile threads. The
# collector is off while they are made (a module keeps what its import makes), and they are then
# set aside (``gc.freeze``), so a full collection walks only what came after
# (``benchmarks/cli_gc.py --app``, docs/performance.md).
gc.disable()

from dim3.ui import build_app, configure_logging, launch_options  # noqa: E402

configure_logging()
demo = build_app()

gc.freeze()
gc.enable()

if __name__ == "__main__":
    demo.launch(**launch_options())
