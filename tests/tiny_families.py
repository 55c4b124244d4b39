"""Tiny real trios of today's VLM families, one per ``model_type``, built offline for tests.

Each trio is a base LLM in the real transformers 5 class of the family's language model, a
multilingual fine-tune (base + a seeded residual) and a VLM of the real class whose language model
starts from the base (+ its own residual), saved with ``save_pretrained`` together with its real
processor and a chat template that uses the family's real image placeholder. Vocabularies follow
the real models: Gemma 3, Qwen3-VL and Mistral-Small-3.1 hold their image tokens inside the base
vocabulary; LLaVA-NeXT and LLaVA-OneVision append ``<image>``; mllama appends ``<|image|>`` and its
embedding has 8 rows more than its head. mllama's language model has a cross-attention layer the
LLM lacks (VLM layer 1 here), so the LLM's layer i is VLM layer i or i + 1.

The base weights are copied into the VLM by name, written out here (not with ``dim3``), so the
trios are independent of the code under test. Sizes: hidden 32, two or three text layers, one or
two vision layers: a trio is built in about a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from transformers import PreTrainedTokenizerFast

from tests.tiny_models import Trio, train_tokenizer

try:
    import torchvision  # noqa: F401 - Qwen3-VL's and LLaVA-OneVision's video processors need it

    HAS_TORCHVISION = True
except ImportError:
    HAS_TORCHVISION = False
H = 32  # hidden width of every tiny language model


def _text(**extra) -> dict:
    return dict(
        hidden_size=H,
        intermediate_size=2 * H,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **extra,
    )


def _template(image: str, user: str, assistant: str, end: str, prompt: str) -> str:
    """A chat template: each turn ``{user|assistant}{text}{end}``; images become ``image``."""
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        + user
        + "{% else %}"
        + assistant
        + "{% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        + image
        + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        + end
        + "{% endfor %}{% if add_generation_prompt %}"
        + prompt
        + "{% endif %}"
    )


GEMMA_TEMPLATE = _template(
    "<start_of_image>",
    "<start_of_turn>user\n",
    "<start_of_turn>model\n",
    "<end_of_turn>\n",
    "<start_of_turn>model\n",
)
QWEN3_TEMPLATE = _template(
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "<|im_end|>\n",
    "<|im_start|>assistant\n",
)
MISTRAL_TEMPLATE = _template("[IMG]", "[INST]", "", "[/INST]", "")
LLAMA3_TEMPLATE = _template(
    "<|image|>",
    "<|start_header_id|>user<|end_header_id|>\n\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
)
LLAVA_NEXT_TEMPLATE = _template("<image>\n", "[INST] ", "", " [/INST]", "")
ONEVISION_TEMPLATE = _template(
    "<image>\n",
    "<|im_start|>user\n",
    "<|im_start|>assistant\n",
    "<|im_end|>\n",
    "<|im_start|>assistant\n",
)


@dataclass(frozen=True)
class Family:
    """How to build one family's trio: base LLM, VLM config and processor."""

    model_type: str
    llm: str  # base LLM class name in transformers
    llm_config: str
    base_tokens: tuple[str, ...]  # media tokens already in the base vocabulary
    vlm_tokens: tuple[str, ...]  # tokens only the VLM's tokenizer adds
    template: str
    tied: bool = False


FAMILIES = {
    "gemma3": Family(
        "gemma3",
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        ("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        (),
        GEMMA_TEMPLATE,
        tied=True,
    ),
    "qwen3_vl": Family(
        "qwen3_vl",
        "Qwen3ForCausalLM",
        "Qwen3Config",
        ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
        (),
        QWEN3_TEMPLATE,
        tied=True,
    ),
    "mistral3": Family(
        "mistral3",
        "MistralForCausalLM",
        "MistralConfig",
        ("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
        (),
        MISTRAL_TEMPLATE,
    ),
    "llava_next": Family(
        "llava_next",
        "MistralForCausalLM",
        "MistralConfig",
        (),
        ("<image>",),
        LLAVA_NEXT_TEMPLATE,
    ),
    "llava_onevision": Family(
        "llava_onevision",
        "Qwen2ForCausalLM",
        "Qwen2Config",
        (),
        ("<image>",),
        ONEVISION_TEMPLATE,
        tied=True,
    ),
    "mllama": Family(
        "mllama",
        "LlamaForCausalLM",
        "LlamaConfig",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"),
        ("<|image|>",),
        LLAMA3_TEMPLATE,
    ),
}
CROSS_LAYER = 1  # mllama: the VLM's text layer 1 is cross-attention; LLM layer i>=1 is VLM i + 1


def _perturb(model: torch.nn.Module, scale: float, seed: int, prefixes: tuple[str, ...] = ("",)):
    """Add a seeded residual relative to each tensor's spread (one-element gates: to 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                spread = p.float().std() if p.numel() > 1 else torch.tensor(0.0)
                p.add_((torch.randn(p.shape, generator=g) * scale * (spread + 1e-3)).to(p.dtype))


def _tokenizers(fam: Family) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    base = train_tokenizer(300, extra_special=list(fam.base_tokens) or None)
    vlm = train_tokenizer(300, extra_special=list(fam.base_tokens + fam.vlm_tokens) or None)
    return base, vlm


def _vlm_config(fam: Family, text: dict, vtok: PreTrainedTokenizerFast, vocab: int):
    ids = vtok.convert_tokens_to_ids
    if fam.model_type == "gemma3":
        return tf.Gemma3Config(
            text_config=dict(text, vocab_size=vocab, head_dim=8, sliding_window=64),
            vision_config=dict(
                hidden_size=H,
                intermediate_size=2 * H,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            mm_tokens_per_image=4,
            boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"),
            image_token_index=ids("<image_soft_token>"),
            tie_word_embeddings=fam.tied,
        )
    if fam.model_type == "qwen3_vl":
        return tf.Qwen3VLConfig(
            text_config=dict(
                text,
                vocab_size=vocab,
                head_dim=8,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1]},
                tie_word_embeddings=fam.tied,
            ),
            vision_config=dict(
                depth=2,
                hidden_size=H,
                intermediate_size=2 * H,
                num_heads=4,
                out_hidden_size=H,
                patch_size=8,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=16,
                deepstack_visual_indexes=[0],
            ),
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=fam.tied,
        )
    if fam.model_type == "mistral3":
        return tf.Mistral3Config(
            text_config=dict(text, model_type="mistral", vocab_size=vocab, head_dim=8),
            vision_config=dict(
                model_type="pixtral",
                hidden_size=H,
                intermediate_size=2 * H,
                num_hidden_layers=1,
                num_attention_heads=4,
                head_dim=8,
                image_size=32,
                patch_size=8,
            ),
            image_token_index=ids("[IMG]"),
            spatial_merge_size=2,
            vision_feature_layer=-1,
            multimodal_projector_bias=False,
        )
    if fam.model_type == "llava_next":
        return tf.LlavaNextConfig(
            text_config=dict(text, model_type="mistral", vocab_size=vocab),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=H,
                intermediate_size=2 * H,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            image_token_index=ids("<image>"),
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
            vision_feature_layer=-1,
        )
    if fam.model_type == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            text_config=dict(text, model_type="qwen2", vocab_size=vocab, tie_word_embeddings=True),
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=H,
                intermediate_size=2 * H,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            image_token_index=ids("<image>"),
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
            vision_feature_layer=-1,
            tie_word_embeddings=True,
        )
    if fam.model_type == "mllama":
        return tf.MllamaConfig(
            text_config=dict(
                text,
                num_hidden_layers=3,
                cross_attention_layers=[CROSS_LAYER],
                vocab_size=vocab,
                rope_scaling={"rope_type": "default"},
                bos_token_id=1,
                eos_token_id=2,
                pad_token_id=3,
            ),
            vision_config=dict(
                hidden_size=H,
                intermediate_size=2 * H,
                num_hidden_layers=2,
                num_global_layers=1,
                attention_heads=4,
                image_size=32,
                patch_size=8,
                max_num_tiles=1,
                intermediate_layers_indices=[0],
                vision_output_dim=2 * H,
                supported_aspect_ratios=[[1, 1]],
            ),
            image_token_index=ids("<|image|>"),
        )
    raise ValueError(fam.model_type)


def _processor(fam: Family, vtok: PreTrainedTokenizerFast, config, folder: Path):
    """The family's real processor class with its PIL image processor (no torchvision here)."""
    vtok.chat_template = fam.template
    if fam.model_type == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        return tf.Gemma3Processor(
            Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
            vtok,
            chat_template=fam.template,
            image_seq_length=config.mm_tokens_per_image,
        )
    if fam.model_type == "mistral3":
        from transformers.models.pixtral.image_processing_pil_pixtral import (
            PixtralImageProcessorPil,
        )

        return tf.PixtralProcessor(
            PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8),
            vtok,
            patch_size=8,
            spatial_merge_size=2,
            chat_template=fam.template,
            image_token="[IMG]",
            image_break_token="[IMG_BREAK]",
            image_end_token="[IMG_END]",
        )
    if fam.model_type == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil,
        )

        return tf.LlavaNextProcessor(
            LlavaNextImageProcessorPil(
                size={"shortest_edge": 32},
                crop_size={"height": 32, "width": 32},
                image_grid_pinpoints=config.image_grid_pinpoints,
            ),
            vtok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
            chat_template=fam.template,
        )
    if fam.model_type == "llava_onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        image = LlavaOnevisionImageProcessorPil(
            size={"height": 32, "width": 32}, image_grid_pinpoints=config.image_grid_pinpoints
        )
        if not HAS_TORCHVISION:  # its video processor needs torchvision: saved on their own
            image.save_pretrained(folder)
            return None
        return tf.LlavaOnevisionProcessor(
            image,
            vtok,
            video_processor=tf.LlavaOnevisionVideoProcessor(),
            num_image_tokens=16,
            vision_feature_select_strategy="full",
            chat_template=fam.template,
        )
    if fam.model_type == "mllama":
        from transformers.models.mllama.image_processing_pil_mllama import (
            MllamaImageProcessorPil,
        )

        return tf.MllamaProcessor(
            MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=1),
            vtok,
            chat_template=fam.template,
        )
    # qwen3_vl
    image = tf.Qwen2VLImageProcessor(
        patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=32 * 32
    )
    if not HAS_TORCHVISION:  # its video processor needs torchvision: saved on their own
        image.save_pretrained(folder)
        return None
    video = tf.Qwen3VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2)
    return tf.Qwen3VLProcessor(image, vtok, video, chat_template=fam.template)


def _copy_base_into_vlm(fam: Family, base: torch.nn.Module, vlm: torch.nn.Module) -> None:
    """Start the VLM's language model from the base, by name (mllama: around its cross layer)."""
    lm = vlm.model.language_model.state_dict()
    with torch.no_grad():
        for name, p in base.model.state_dict().items():
            target = name
            if fam.model_type == "mllama" and name.startswith("layers."):
                i = int(name.split(".")[1])
                target = name.replace(f"layers.{i}.", f"layers.{i + (i >= CROSS_LAYER)}.", 1)
            lm[target][: p.shape[0]].copy_(p)
        vlm.model.language_model.load_state_dict(lm)
        if not fam.tied:
            vlm.lm_head.weight[: base.lm_head.weight.shape[0]].copy_(base.lm_head.weight)


def build_family_trio(
    model_type: str, root: Path, *, seed: int = 0, multimodal_base: bool = False
) -> Trio:
    """The tiny trio of ``model_type`` (a key of :data:`FAMILIES`) under ``root``.

    multimodal_base: save the base and the multilingual model as VLMs of the family too (their
    language models are the LLMs', vision and projector the VLM's), as Gemma 3's 4B-27B "base"
    checkpoints and their fine-tunes are.
    """
    fam = FAMILIES[model_type]
    torch.manual_seed(seed)
    tok, vtok = _tokenizers(fam)
    if fam.model_type == "gemma3":  # Gemma3Processor reads these tokenizer attributes
        named = dict(zip(("boi_token", "eoi_token", "image_token"), fam.base_tokens, strict=True))
        tok, vtok = (_with_named_tokens(t, named) for t in (tok, vtok))
    vocab = len(tok)  # mllama: <|image|> is row len(tok) of its 8 extra embedding rows
    if fam.model_type in ("llava_next", "llava_onevision"):
        vocab = -(-len(vtok) // 64) * 64  # padded VLM vocabulary (32064 / 152064 style)
    extra = {"head_dim": 8} if fam.llm_config in ("Gemma3TextConfig", "Qwen3Config") else {}
    text = _text(**extra)
    base_cfg = getattr(tf, fam.llm_config)(
        vocab_size=len(tok), tie_word_embeddings=fam.tied, **text
    )
    base = getattr(tf, fam.llm)(base_cfg)
    trio = Trio(root / "base", root / "multilingual", root / "multimodal")
    ml = getattr(tf, fam.llm)(base_cfg)
    ml.load_state_dict(base.state_dict())
    _perturb(ml, 0.3, seed + 1)

    cfg = _vlm_config(fam, text, vtok, vocab)
    vlm_class = getattr(
        tf, tf.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[fam.model_type]
    )
    vlm = vlm_class(cfg)
    for llm, folder in ((base, trio.base), (ml, trio.multilingual)):
        if multimodal_base:
            as_vlm = vlm_class(cfg)
            as_vlm.load_state_dict(vlm.state_dict())
            _copy_base_into_vlm(fam, llm, as_vlm)
            as_vlm.save_pretrained(folder)
        else:
            llm.save_pretrained(folder)
        _save_tok(tok, fam.template, folder)
    _copy_base_into_vlm(fam, base, vlm)
    _perturb(vlm, 0.3, seed + 2, ("model.language_model.", "lm_head."))
    vlm.save_pretrained(trio.multimodal)
    processor = _processor(fam, vtok, cfg, trio.multimodal)
    if processor is not None:
        processor.save_pretrained(trio.multimodal)
    else:
        _save_tok(vtok, fam.template, trio.multimodal)
    return trio


def _with_named_tokens(tok: PreTrainedTokenizerFast, named: dict) -> PreTrainedTokenizerFast:
    """The same tokenizer with model-specific special tokens (``tok.boi_token`` ...)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=named,
    )


def _save_tok(tok: PreTrainedTokenizerFast, template: str, path: Path) -> None:
    tok.chat_template = template
    tok.save_pretrained(path)


# ---------------------------------------------------------------- stretch families

_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=H,
    intermediate_size=2 * H,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
_TOWER = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=4)
COHERE_TURNS = ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")
COHERE_END = "<|END_OF_TURN_TOKEN|>"


@dataclass(frozen=True)
class Stretch:
    """How to build a stretch family's trio: base LLM, VLM config, tokens and processor."""

    llm: str  # base LLM class name in transformers
    llm_config: str
    text: dict  # extra text config
    config: Any  # (text config, image token id) -> the VLM's config
    base_tokens: tuple[str, ...]  # special tokens of the base LLM (its chat turns)
    vlm_tokens: tuple[str, ...]  # tokens the VLM's tokenizer appends (its image tokens)
    image_token: str  # the token the model replaces by image features (config's image id)
    template: str | None  # the chat template the VLM ships (None: PaliGemma has none)


def _idefics(model_type: str) -> Stretch:
    """Idefics3's or SmolVLM2's stretch family (the same layout, tokens and template)."""
    config = tf.Idefics3Config if model_type == "idefics3" else tf.SmolVLMConfig
    return Stretch(
        "LlamaForCausalLM",
        "LlamaConfig",
        {},
        lambda text, img: config(
            text_config=dict(text, model_type="llama"),
            vision_config=dict(_TOWER, image_size=32, patch_size=8),
            image_token_id=img,
            scale_factor=2,
        ),
        (),
        ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"),
        "<image>",
        _template("<image>", "User:", "Assistant:", "<end_of_utterance>\n", "Assistant:"),
    )


STRETCH = {
    "internvl": Stretch(
        "Qwen2ForCausalLM",
        "Qwen2Config",
        {},
        lambda text, img: tf.InternVLConfig(
            text_config=dict(text, model_type="qwen2"),
            vision_config=dict(_TOWER, image_size=[32, 32], patch_size=[8, 8]),
            image_token_id=img,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            tie_word_embeddings=False,  # as its text config: a head of its own, as the base's
        ),
        ("<|im_start|>", "<|im_end|>"),
        ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
        "<IMG_CONTEXT>",
        # InternVL3-hf: <IMG_CONTEXT> where the picture goes, expanded by InternVLProcessor
        _template(
            "<IMG_CONTEXT>\n",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            "<|im_start|>assistant\n",
        ),
    ),
    "aya_vision": Stretch(
        "Cohere2ForCausalLM",
        "Cohere2Config",
        {},
        lambda text, img: tf.AyaVisionConfig(
            text_config=dict(text, model_type="cohere2"),
            vision_config=_SIGLIP,
            image_token_index=img,
            downsample_factor=2,
        ),
        (*COHERE_TURNS, COHERE_END),
        ("<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"),
        "<|IMG_PATCH|>",  # AyaVisionProcessor writes <image> as START_OF_IMG, patches, END_OF_IMG
        _template(
            "<image>",
            "".join(COHERE_TURNS[:2]),
            COHERE_TURNS[0] + COHERE_TURNS[2],
            COHERE_END,
            COHERE_TURNS[0] + COHERE_TURNS[2],
        ),
    ),
    "paligemma": Stretch(
        "GemmaForCausalLM",
        "GemmaConfig",
        {"head_dim": 8},
        lambda text, img: tf.PaliGemmaConfig(
            text_config=dict(text, model_type="gemma"),
            vision_config=_SIGLIP,
            image_token_index=img,
            projection_dim=H,
        ),
        (),
        ("<image>",),  # and PaliGemmaProcessor appends its 1,152 location and segment tokens
        "<image>",
        None,  # PaliGemma's processors carry no chat template: prompts are task prefixes
    ),
    # SmolVLM2 has Idefics3's layout, tokens and template under its own classes
    **{m: _idefics(m) for m in ("idefics3", "smolvlm")},
}


def _stretch_processor(model_type: str, vtok: PreTrainedTokenizerFast) -> Any:
    """The stretch family's real processor class, with its PIL image processor: one tile a
    picture where the class allows it, so the prompts stay short."""
    fam = STRETCH[model_type]
    if model_type == "internvl":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )

        names = ("start_image_token", "end_image_token", "context_image_token", "video_token")
        vtok = _with_named_tokens(vtok, dict(zip(names, fam.vlm_tokens, strict=True)))
        return tf.InternVLProcessor(  # its video processor needs torchvision
            GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False),
            vtok,
            tf.InternVLVideoProcessor(),
            image_seq_length=4,  # (32 / 8) ** 2 patches, downsampled by 0.5 twice
            chat_template=fam.template,
        )
    if model_type == "aya_vision":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )

        return tf.AyaVisionProcessor(
            GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False),
            vtok,
            patch_size=8,
            img_size=32,
            downsample_factor=2,
            chat_template=fam.template,
        )
    if model_type == "paligemma":
        from transformers.models.siglip.image_processing_pil_siglip import (
            SiglipImageProcessorPil,
        )

        image = SiglipImageProcessorPil(size={"height": 32, "width": 32})
        image.image_seq_length = 16  # (32 / 8) ** 2, as PaliGemma's processor config holds it
        vtok = _with_named_tokens(vtok, {"image_token": "<image>"})
        return tf.PaliGemmaProcessor(image, vtok)
    if model_type == "smolvlm":  # SmolVLMProcessor needs num2words, not installed here
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil,
        )

        return SmolVLMImageProcessorPil(
            size={"longest_edge": 32},
            max_image_size={"longest_edge": 32},
            do_image_splitting=False,
        )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    image = Idefics3ImageProcessorPil(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
    )
    return tf.Idefics3Processor(image, vtok, image_seq_len=4, chat_template=fam.template)


def tied(model: torch.nn.Module) -> bool:
    """Whether the model's head is its input embedding (as transformers tied them)."""
    head = model.get_output_embeddings().weight
    return head.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def build_stretch_trio(model_type: str, root: Path, *, seed: int = 0) -> Trio:
    """A tiny trio of a stretch family (:data:`STRETCH`): the base's and multilingual model's
    tokenizer holds the base's tokens, the VLM's appends its image tokens (rows the merge keeps),
    and the VLM is saved with its real processor (InternVL's video processor needs torchvision;
    SmolVLM's processor needs num2words, which is not installed: its image processor, tokenizer
    and processor config are written as SmolVLMProcessor would write them)."""
    fam = STRETCH[model_type]
    torch.manual_seed(seed)
    tok = train_tokenizer(300, extra_special=list(fam.base_tokens) or None)
    vtok = train_tokenizer(300, extra_special=list(fam.base_tokens + fam.vlm_tokens))
    processor = _stretch_processor(model_type, vtok)
    # PaliGemma's has grown by its location and segment tokens; SmolVLM's image processor alone
    vtok = getattr(processor, "tokenizer", vtok)
    ids = {  # a Cohere config's defaults name ids of the real 256k vocabulary
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.convert_tokens_to_ids(COHERE_END if fam.base_tokens else "</s>"),
        "pad_token_id": tok.pad_token_id,
    }
    text = dict(_text(**fam.text), **ids)
    base = getattr(tf, fam.llm)(getattr(tf, fam.llm_config)(vocab_size=len(tok), **text))
    ml = getattr(tf, fam.llm)(base.config)
    ml.load_state_dict(base.state_dict())
    _perturb(ml, 0.3, seed + 1)
    names = tf.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    cfg = fam.config(dict(text, vocab_size=len(vtok)), vtok.convert_tokens_to_ids(fam.image_token))
    vlm = getattr(tf, names[model_type])(cfg)
    decoder = vlm.get_decoder()
    with torch.no_grad():  # the base's rows; the VLM's own rows after them stay its own
        own = decoder.state_dict()
        for name, p in base.model.state_dict().items():
            own[name][: p.shape[0]].copy_(p)
        decoder.load_state_dict(own)
        if not tied(vlm):
            vlm.lm_head.weight[: len(tok)].copy_(base.lm_head.weight)
    _perturb(vlm, 0.3, seed + 2, ("model.language_model.", "model.text_model.", "lm_head."))
    trio = Trio(root / "base", root / "multilingual", root / "multimodal")
    for model, folder in ((base, trio.base), (ml, trio.multilingual), (vlm, trio.multimodal)):
        model.save_pretrained(folder)
    for folder in (trio.base, trio.multilingual):
        tok.chat_template = fam.template
        tok.save_pretrained(folder)
    processor.save_pretrained(trio.multimodal)
    if not hasattr(processor, "tokenizer"):  # SmolVLM: what SmolVLMProcessor would save
        _save_tok(vtok, fam.template, trio.multimodal)
        config = {"processor_class": "SmolVLMProcessor", "image_seq_len": 4}
        (trio.multimodal / "processor_config.json").write_text(json.dumps(config))
    return trio
