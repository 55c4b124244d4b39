"""How soon the chat shows text: first visible text of ``dim3.chat.stream_reply`` against a plain
``generate``'s first token, on a LLaVA-shaped model and on the demo VLM.

    python benchmarks/first_text_latency.py [--runs 5] [--tokens 24] [--device cpu]

For each model it times, from the call to
- ``generate``: the first generated token handed to a streamer (no decoding: the floor);
  tokenizing the question is counted for all three;
- ``stream_reply``: the first non-empty text chunk (what the app shows; per-token streamer);
- ``word streamer``: the first non-empty chunk of transformers' ``TextIteratorStreamer``, which
  holds text back until a word ends (what the app used before);
and the time to the whole ``--tokens``-token reply for each. Medians over ``--runs``, greedy
decoding, a fixed reply length (no end-of-sequence token).

The LLaVA-shaped model: the language model of ``merge_throughput.py``'s ``tiny`` trio (Llama,
4 layers × 256, 32,064-row vocabulary, reused from that builder) under a CLIP ViT-B/32-sized vision
tower (12 layers × 768, 224 px) and projector, about 440 MB in float32. Its tokenizer, chat
template and image processor are the demo's; vocabulary rows the tokenizer lacks have zero output
weights, so a random model still writes decodable text. The demo VLM is ``assets/demo/multimodal``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a clone, no install
sys.path.insert(0, str(ROOT / "benchmarks"))

from merge_throughput import build_trio  # noqa: E402

from dim3.chat import GenerationParams, build_inputs, load_vlm, stream_reply  # noqa: E402

QUESTION = [{"role": "user", "content": "What colour is the shape?"}]


def llava_shaped(root: Path) -> Path:
    """A chat-ready LLaVA folder whose language model comes from the ``tiny`` benchmark trio."""
    from safetensors.torch import load_file
    from transformers import (
        AutoProcessor,
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    recipe = build_trio(root / "trio", "tiny", torch.float32)
    demo = AutoProcessor.from_pretrained(ROOT / "assets" / "demo" / "multimodal")
    tok = demo.tokenizer
    stored = {}
    for shard in Path(recipe.multimodal.ref).glob("*.safetensors"):
        stored |= load_file(shard)
    text = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "vocab_size": stored["language_model.lm_head.weight"].shape[0],
        "max_position_embeddings": 2048,
    }
    config = LlavaConfig(
        text_config=text,
        vision_config={"model_type": "clip_vision_model", "image_size": 224, "patch_size": 32},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    model = LlavaForConditionalGeneration(config)
    own = model.state_dict()
    rename = {"language_model.model.": "model.language_model.", "language_model.": ""}
    loaded = {}
    for key, value in stored.items():
        for old, new in rename.items():
            if key.startswith(old):
                name = new + key[len(old) :]
                if name in own and own[name].shape == value.shape:
                    loaded[name] = value
                break
    model.load_state_dict(loaded, strict=False)
    with torch.no_grad():
        model.lm_head.weight[len(tok) :] = 0  # tokens the tokenizer cannot write
    model.generation_config.eos_token_id = None
    folder = root / "llava-shaped"
    model.save_pretrained(folder)
    image = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224)
    LlavaProcessor(
        image_processor=image,
        tokenizer=tok,
        patch_size=32,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=demo.chat_template,
    ).save_pretrained(folder)
    return folder


class _FirstToken:
    """A streamer that only notes when ``generate`` hands out its first new token."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def time_generate(model, processor, image, tokens: int) -> tuple[float, float]:
    """On a thread, as the streamers run it (a thread's torch gets its own intra-op pool, so
    the main thread would not compare like with like)."""
    start = time.perf_counter()
    inputs = build_inputs(model, processor, QUESTION, image)
    streamer = _FirstToken()

    def run() -> None:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return streamer.first - start, time.perf_counter() - start


def time_stream_reply(model, processor, image, tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    reply = stream_reply(model, processor, QUESTION, image, GenerationParams(tokens))
    first = None
    for chunk in reply:
        if chunk and first is None:
            first = time.perf_counter()
    return (first or time.perf_counter()) - start, time.perf_counter() - start


def time_word_streamer(model, processor, image, tokens: int) -> tuple[float, float]:
    from transformers import TextIteratorStreamer

    start = time.perf_counter()
    inputs = build_inputs(model, processor, QUESTION, image)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def run() -> None:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=tokens, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    first = None
    for chunk in streamer:
        if chunk and first is None:
            first = time.perf_counter()
    thread.join()
    return (first or time.perf_counter()) - start, time.perf_counter() - start


def measure(name: str, folder: Path, runs: int, tokens: int) -> None:
    model, processor = load_vlm(folder, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # every reply is exactly `tokens` long
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    image = Image.new("RGB", (64, 64), (215, 35, 35))
    print(f"\n{name}: {size / 1e6:.0f} MB in float32, {tokens}-token replies, median of {runs}")
    methods = {
        "generate (first token)": time_generate,
        "stream_reply (first text)": time_stream_reply,
        "word streamer (first text)": time_word_streamer,
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
    for fn in methods.values():  # warm-up
        fn(model, processor, image, 2)
    for _ in range(runs):  # round robin, so load changes touch every method alike
        for label, fn in methods.items():
            results[label].append(fn(model, processor, image, tokens))
    for label, timings in results.items():
        firsts, totals = zip(*timings, strict=True)
        print(
            f"  {label:<28} first {statistics.median(firsts) * 1000:7.1f} ms"
            f"   whole reply {statistics.median(totals) * 1000:7.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory(prefix="dim3-latency-") as tmp:
        measure("LLaVA-shaped", llava_shaped(Path(tmp)), args.runs, args.tokens)
    measure("demo VLM", ROOT / "assets" / "demo" / "multimodal", args.runs, args.tokens)


if __name__ == "__main__":
    main()
