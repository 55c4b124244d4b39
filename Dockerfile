# DiM3 Studio: the merge studio and side-by-side chat, served on 0.0.0.0:7860.
#
# CPU image (default):
#   docker build -t dim3-studio .
#   docker run --rm -p 7860:7860 dim3-studio            # then open http://localhost:7860
# CUDA image: take PyTorch from a CUDA wheel index instead (the wheels bring the CUDA runtime):
#   docker build -t dim3-studio:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --gpus all -p 7860:7860 -e HF_TOKEN dim3-studio:cuda
# Showcase (the models fixed at start-up; see the README):
#   docker run --rm -p 7860:7860 -e DIM3_SHOWCASE=showcase.json dim3-studio
#
# Installs exactly what the README does: `pip install -r requirements.txt`, then `python app.py`.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# Where torch and torchvision (a matching pair, pinned in requirements.txt) may also come from;
# their +cpu / +cuXXX builds win over PyPI's plain ones.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH

RUN useradd --create-home --uid 1000 user \
    && install -d -o user -g user /home/user/app
USER 1000
WORKDIR /home/user/app

COPY --chown=1000:1000 requirements.txt .
RUN pip install --no-cache-dir --user --extra-index-url "${TORCH_INDEX}" -r requirements.txt

COPY --chown=1000:1000 . .

# Merges saved from the app land in ./outputs; Hub downloads in ~/.cache/huggingface, which the
# server keeps within $DIM3_MAX_HUB_CACHE when set (unset: only on a Space, and only when the disk
# is short, are the least recently used checkpoints deleted; docs/app.md). Do not set it when you
# mount your own Hub cache into the container: it deletes from it.
EXPOSE 7860
CMD ["python", "app.py"]
