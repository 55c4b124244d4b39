"""DiM3 Studio: ``python app.py`` serves the merge studio and side-by-side chat.

Listens on ``$GRADIO_SERVER_NAME:$GRADIO_SERVER_PORT`` (default 127.0.0.1:7860; Docker and Spaces
set 0.0.0.0). Everything else lives in ``dim3.ui``.
"""

from dim3.ui import build_app, configure_logging, launch_options

configure_logging()
demo = build_app()

if __name__ == "__main__":
    demo.launch(**launch_options())
