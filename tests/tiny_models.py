"""Tiny real checkpoints for tests: trios of (base LLM, multilingual LLM, VLM) built offline.

Every model is a real transformers architecture saved with ``save_pretrained`` (safetensors), with a
real byte-level BPE tokenizer trained here, a chat template and, for VLMs, a real processor. The
multilingual model and the VLM's language model are the base plus seeded random residuals, so the
three share a base exactly as real trios do. Layout variants rewrite the VLM's keys on disk into
the newer ``model.language_model.*`` form that transformers 4.52-4.57 wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

CORPUS = [
    "The red circle is small. The blue square is large. What colour is the shape?",
    "Der rote Kreis ist klein. Das blaue Quadrat ist groß. Welche Farbe hat die Form?",
    "El círculo rojo es pequeño. ¿De qué color es la forma? El cuadrado azul es grande.",
    "Красный круг маленький. Какого цвета фигура? Синий квадрат большой.",
    "红色的圆很小。这个形状是什么颜色？蓝色的正方形很大。",
    "الدائرة الحمراء صغيرة. ما لون الشكل؟ المربع الأزرق كبير.",
    "लाल वृत्त छोटा है। आकृति का रंग क्या है? नीला वर्ग बड़ा है।",
] * 4

LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LM_PREFIXES = ("model.language_model.", "lm_head.")  # the VLM's language model, in memory
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@dataclass(frozen=True)
class Trio:
    """Paths of a base LLM, its multilingual fine-tune, and a VLM tuned from the same base."""

    base: Path
    multilingual: Path
    multimodal: Path


def train_tokenizer(
    vocab_size: int = 300, extra_special: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small multilingual corpus (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": extra_special})
    return fast


def _perturb(
    model: torch.nn.Module, scale: float, seed: int, prefixes: tuple[str, ...] = ("",)
) -> None:
    """Add a seeded random residual (relative to each tensor's scale) to the matching params."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(prefixes):
                continue
            noise = torch.randn(p.shape, generator=g) * scale * (p.float().std() + 1e-3)
            p.add_(noise.to(p.dtype))


def _text_kwargs(hidden: int = 32, layers: int = 2) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def _save_llm(
    model: torch.nn.Module, tok: PreTrainedTokenizerFast, template: str, path: Path
) -> None:
    model.save_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)


def _copy_lm_into_vlm(llm: torch.nn.Module, vlm: torch.nn.Module, vocab: int) -> None:
    """Start the VLM's language model from the base LLM (its extra vocabulary rows stay random)."""
    target = vlm.model.language_model.state_dict()
    with torch.no_grad():
        for name, p in llm.model.state_dict().items():
            target[name][: p.shape[0]].copy_(p) if name == "embed_tokens.weight" else target[
                name
            ].copy_(p)
        vlm.model.language_model.load_state_dict(target)
        if not vlm.config.tie_word_embeddings:
            vlm.lm_head.weight[:vocab].copy_(llm.lm_head.weight)


def build_llava_trio(root: Path, *, tied: bool = False, seed: int = 0) -> Trio:
    """LLaVA-1.5 style: Llama base; the VLM adds ``<image>`` and pads its vocabulary (like 32064)."""
    torch.manual_seed(seed)
    tok = train_tokenizer(300)
    vocab = len(tok)
    text = LlamaConfig(vocab_size=vocab, tie_word_embeddings=tied, **_text_kwargs())
    base = LlamaForCausalLM(text)
    trio = Trio(root / "base", root / "multilingual", root / "multimodal")
    _save_llm(base, tok, LLAVA_TEMPLATE, trio.base)
    ml = LlamaForCausalLM(text)
    ml.load_state_dict(base.state_dict())
    _perturb(ml, 0.3, seed + 1)
    _save_llm(ml, tok, LLAVA_TEMPLATE, trio.multilingual)

    vtok = train_tokenizer(300, extra_special=["<image>"])
    image_token = vtok.convert_tokens_to_ids("<image>")
    pad_vocab_to = -(-len(vtok) // 64) * 64  # LLaVA-1.5-hf pads 32001 tokens to 32064 rows
    vtext = LlamaConfig(vocab_size=pad_vocab_to, tie_word_embeddings=tied, **_text_kwargs())
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    cfg = LlavaConfig(
        text_config=vtext,
        vision_config=vision,
        image_token_index=image_token,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=tied,
    )
    vlm = LlavaForConditionalGeneration(cfg)
    _copy_lm_into_vlm(base, vlm, vocab)
    _perturb(vlm, 0.3, seed + 2, LM_PREFIXES)
    vlm.save_pretrained(trio.multimodal)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=vtok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(trio.multimodal)
    return trio


def build_qwen2vl_trio(root: Path, *, tied: bool = True, seed: int = 0) -> Trio:
    """Qwen2-VL style: Qwen2 base with tied embeddings; the VLM adds vision special tokens."""
    torch.manual_seed(seed)
    tok = train_tokenizer(300)
    vtok = train_tokenizer(300, extra_special=QWEN_VISION_TOKENS)
    vocab = len(vtok)  # Qwen pads the base vocabulary so the VLM's tokens fit in the same rows
    text = Qwen2Config(vocab_size=vocab, tie_word_embeddings=tied, **_text_kwargs())
    base = Qwen2ForCausalLM(text)
    trio = Trio(root / "base", root / "multilingual", root / "multimodal")
    _save_llm(base, tok, QWEN_TEMPLATE, trio.base)
    ml = Qwen2ForCausalLM(text)
    ml.load_state_dict(base.state_dict())
    _perturb(ml, 0.3, seed + 1)
    _save_llm(ml, tok, QWEN_TEMPLATE, trio.multilingual)

    ids = {t: vtok.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS}
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=tied,
            **_text_kwargs(),
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            mlp_ratio=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied,
    )
    vlm = Qwen2VLForConditionalGeneration(cfg)
    _copy_lm_into_vlm(base, vlm, vocab)
    _perturb(vlm, 0.3, seed + 2, LM_PREFIXES)
    vlm.save_pretrained(trio.multimodal)
    # Qwen2VLProcessor needs torchvision in transformers 5 (its video processor); the CPU torch
    # here has no matching torchvision, so the tokenizer and image processor are saved on their own
    # (AutoTokenizer / AutoImageProcessor load them; the merge needs only the files to carry over).
    vtok.chat_template = QWEN_TEMPLATE
    vtok.save_pretrained(trio.multimodal)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(trio.multimodal)
    return trio


NEW_LAYOUT = {
    "llava": [
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ],
    "qwen2_vl": [("model.", "model.language_model."), ("visual.", "model.visual.")],
}


def rewrite_to_new_layout(folder: Path, family: str) -> None:
    """Rename the VLM's on-disk keys into the ``model.language_model.*`` layout (in place)."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    renamed = {}
    for key, value in tensors.items():
        for old, new in NEW_LAYOUT[family]:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = value
    save_file(renamed, path, metadata={"format": "pt"})


def vlm_keys(folder: Path) -> list[str]:
    """All tensor names of a single-file checkpoint (test helper)."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return list(f.keys())


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
