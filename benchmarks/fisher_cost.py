"""Wall time and peak memory of estimating one diagonal Fisher (``dim3.fisher.estimate``).

The model is the language model of Qwen2-VL-2B (Qwen2-1.5B's shape: hidden 1536, 12 heads, 2 KV
heads, MLP 8960, the real 151,936-token vocabulary, tied embeddings), built from
../shared/realmaps by ``tests/realmaps.py`` with random weights and cut to ``--layers`` layers (the
real file has 28), as a text LLM. Examples are random token sequences (a prompt of ``--prompt``
tokens, an answer of ``--answer`` tokens): cost does not depend on what the tokens say.

    python benchmarks/fisher_cost.py --layers 2 --n 8 [--labels given|sampled] [--device cpu]

Prints one JSON line: parameters, wall and CPU seconds per example (after one warm-up example;
CPU seconds count every thread, so on a shared machine they say more than wall time), peak anonymous
memory (RssAnon plus RssShmem sampled every 20 ms: weights + Fisher accumulators + one example's activations)
and the load average before and after, so a figure from a shared machine can be read honestly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_throughput import AnonPeak  # noqa: E402

from dim3.fisher import estimate, load_model  # noqa: E402
from dim3.probes import ProbeItem  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(folder: Path, layers: int) -> Path:
    try:
        from tests import realmaps
    except ImportError:
        sys.exit("tests/realmaps.py is needed to build the real shape; run from a clone")
    if not realmaps.available():
        sys.exit("../shared/realmaps is absent: the real key maps are needed for this shape")
    keymap = realmaps.TRIOS["qwen2-vl-2b"][1]  # the 1.5B-shaped LLM of the qwen2-vl-2b trio
    keep = realmaps.kept_layers(realmaps.load_keymap(keymap), layers)
    path = realmaps.build_checkpoint(keymap, folder, layers=keep, data="random", seed=1)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


def items(n: int, prompt: int, answer: int, vocab: int, seed: int = 0) -> list[ProbeItem]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab - 1000, (prompt + answer,), generator=g).tolist()
        text = " ".join(f"tok{i}" for i in ids[:prompt])
        out.append(ProbeItem(text, " ".join(f"tok{i}" for i in ids[prompt:]), "xx"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--n", type=int, default=8, help="timed examples (after one warm-up)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--answer", type=int, default=4)
    parser.add_argument("--labels", default="given", choices=("given", "sampled"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dim3-fisher-cost-") as tmp:
        path = build(Path(tmp) / "llm", args.layers)
        model, tok = load_model(path, torch.device(args.device))
        params = sum(p.numel() for p in model.parameters())
        examples = items(args.n + 1, args.prompt, args.answer, model.config.vocab_size)
        kw = {"labels": args.labels, "max_new_tokens": args.answer}
        estimate(model, tok, examples[:1], **kw)  # warm-up
        with AnonPeak() as peak:
            start, cpu = time.perf_counter(), time.process_time()
            estimate(model, tok, examples[1:], **kw)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(
        json.dumps(
            {
                "shape": f"Qwen2-VL-2B language model, {args.layers} of 28 layers, vocab 151936",
                "parameters": params,
                "labels": args.labels,
                "device": args.device,
                "torch_threads": torch.get_num_threads(),
                "examples": args.n,
                "prompt_tokens": args.prompt,
                "answer_tokens": args.answer,
                "seconds_per_example": round(seconds / args.n, 3),
                "cpu_seconds_per_example": round(cpu / args.n, 3),
                "peak_anon_gib": round(peak.peak / 2**30, 2),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
