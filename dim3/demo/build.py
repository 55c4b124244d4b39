"""Build the demo trio's parts: tokenizer, chat template, configs, models, processor, saving.

Everything the three demo checkpoints share is made here: a byte-level BPE tokenizer trained on
the world's text, the chat template, the Llama and LLaVA configs, the VLM's CLIP image processor,
and ``save_llm`` / ``save_vlm``, which write ordinary Hugging Face folders (config, generation
config, safetensors, tokenizer, chat template, processor) that ``from_pretrained`` loads. This
module knows no training loop and no data beyond the texts it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from dim3.demo.world import IMAGE_SIZE

BOS, EOS, PAD, IMAGE = "<s>", "<|end|>", "<pad>", "<image>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, *ROLES]

# One template for the LLMs and the VLM. A list-of-parts content renders images as "<image>\n"
# (the LLaVA processor expands it to one token per image patch) followed by the text parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelSize:
    """Sizes of the demo models (all three share the text model's)."""

    vocab_size: int = 1024
    hidden: int = 96
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 160
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 192
    patch_size: int = 8

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden sizes must be divisible by their head counts")
        if IMAGE_SIZE % self.patch_size:
            raise ValueError(f"patch_size must divide the image size {IMAGE_SIZE}")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 bytes + special tokens)")

    @property
    def image_tokens(self) -> int:
        """Tokens one image becomes in the text model (patches; CLS dropped)."""
        return (IMAGE_SIZE // self.patch_size) ** 2


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around ``tok`` with the demo's special tokens and chat template."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=ModelSize().max_positions,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.padding_side = "left"
    return wrapped


def llama_config(size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The text model config shared by the base, the multilingual model and the VLM."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def new_llm(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama causal LM (float32), deterministic given ``seed``."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size, tokenizer)).float()


def llava_config(size: ModelSize, text: LlamaConfig, image_token_id: int) -> LlavaConfig:
    """A LLaVA config: a small CLIP vision tower sized for the world's pictures + ``text``."""
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=size.image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def new_vlm(
    size: ModelSize, base: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int
) -> LlavaForConditionalGeneration:
    """A LLaVA VLM with a fresh vision tower and projector and ``base``'s text weights."""
    torch.manual_seed(seed)
    config = llava_config(size, base.config, tokenizer.convert_tokens_to_ids(IMAGE))
    vlm = LlavaForConditionalGeneration(config).float()
    vlm.model.language_model.load_state_dict(base.model.state_dict())
    vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    return vlm


def image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing for the world's pictures: resize + centre crop to IMAGE_SIZE, normalise."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def processor(size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """The VLM's processor (CLIP image processor + the shared tokenizer and chat template)."""
    return LlavaProcessor(
        image_processor=image_processor(),
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy decoding that stops at the end-of-turn token."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_llm(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write ``model`` + tokenizer + chat template + generation config to ``out`` (safetensors)."""
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def save_vlm(
    model: LlavaForConditionalGeneration,
    proc: LlavaProcessor,
    tokenizer: PreTrainedTokenizerFast,
    out: Path,
) -> None:
    """Write the VLM, its processor, tokenizer and chat template to ``out`` (safetensors)."""
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    proc.save_pretrained(out)
