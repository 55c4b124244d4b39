"""Training data for the demo trio: samples of the world's text and pictures, and their tokens.

Four mixtures, one per kind of model (each deterministic given a ``random.Random``):

- ``base_sample``: "pretraining" text, mostly English (descriptions of scenes and text-only
  questions about a described scene), with a little of every other language.
- ``multilingual_sample``: much more text in all languages: descriptions, translations of the
  world's words, text-only questions and answers, and mixed-language pairs (a description in one
  language, a question and its answer in another). Never pictures.
- ``group_sample``: the multilingual mixture restricted to a group of languages (plus a little
  English), for the language-group experts.
- ``vlm_sample``: an English question about a picture, answered in English.

``encode`` turns a sample into token ids and labels with the shared chat template; ``collate``
pads a batch. This module knows the world and the tokenizer, not the models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from dim3.demo import world
from dim3.demo.world import LANGUAGES, QUESTION_KINDS, Scene

BASE_ENGLISH_SHARE = 0.86  # the rest is spread evenly over the other seven languages


@dataclass(frozen=True)
class Sample:
    """One training sequence: a plain document, or a user turn + the assistant's answer.

    ``image`` is a scene whose picture stands at the start of the user turn (VLM samples only).
    ``answer_only`` puts the loss on the answer alone (as LLaVA does) instead of every token.
    """

    text: str = ""
    user: str = ""
    answer: str = ""
    image: Scene | None = None
    answer_only: bool = False


def _qa(scene: Scene, context: str, language: str, rng: random.Random) -> Sample:
    kind = rng.choice(QUESTION_KINDS)
    user = f"{context}\n{world.question(language, kind, rng)}"
    return Sample(user=user, answer=scene.answer(kind, language))


def _document(language: str, rng: random.Random) -> Sample:
    scenes = [world.random_scene(rng) for _ in range(rng.randint(1, 3))]
    return Sample(text=" ".join(s.describe(language, rng.randint(0, 1)) for s in scenes))


def _translations(language: str, pool: tuple[str, ...], rng: random.Random) -> Sample:
    concepts = (*world.COLOURS, *world.SHAPES, *world.SIZES)
    lines = []
    for _ in range(rng.randint(2, 4)):
        other = rng.choice([x for x in pool if x != language])
        src, dst = (language, other) if rng.random() < 0.5 else (other, language)
        lines.append(world.translation_sentence(rng.choice(concepts), src, dst, rng))
    return Sample(text=" ".join(lines))


def base_sample(rng: random.Random) -> Sample:
    """A "pretraining" sample: 86% English, 2% each other language; documents and text QA."""
    if rng.random() < BASE_ENGLISH_SHARE:
        language = "en"
    else:
        language = rng.choice(LANGUAGES[1:])
    if rng.random() < 0.4:
        return _document(language, rng)
    scene = world.random_scene(rng)
    return _qa(scene, scene.describe(language, rng.randint(0, 1)), language, rng)


def multilingual_sample(rng: random.Random) -> Sample:
    """A multilingual sample: all languages alike; documents, translations, mono and mixed QA."""
    return _mixture(rng.choice(LANGUAGES), LANGUAGES, rng)


def group_sample(rng: random.Random, group: tuple[str, ...], english_share: float) -> Sample:
    """A language-group expert's sample: the multilingual mixture over ``group`` + English.

    English with probability ``english_share``, else one of ``group`` alike; translations and
    mixed-language questions pair only languages of ``group`` and English.
    """
    language = "en" if rng.random() < english_share else rng.choice(group)
    return _mixture(language, ("en", *group), rng)


def _mixture(language: str, pool: tuple[str, ...], rng: random.Random) -> Sample:
    """Documents, translations, mono and mixed QA in ``language``; other languages from ``pool``."""
    r = rng.random()
    if r < 0.2:
        return _document(language, rng)
    if r < 0.4:
        return _translations(language, pool, rng)
    scene = world.random_scene(rng)
    if r < 0.7:
        return _qa(scene, scene.describe(language, rng.randint(0, 1)), language, rng)
    other = rng.choice([x for x in pool if x != language])
    return _qa(scene, scene.describe(other, rng.randint(0, 1)), language, rng)


def vlm_sample(rng: random.Random) -> Sample:
    """An English question about a picture, answered in English (loss on the answer only)."""
    scene = world.random_scene(rng)
    kind = rng.choice(QUESTION_KINDS)
    return Sample(
        user=world.question("en", kind, rng),
        answer=scene.answer(kind, "en"),
        image=scene,
        answer_only=True,
    )


def user_messages(sample: Sample) -> list[dict]:
    """The sample's user turn as chat messages (an image part first when there is a picture)."""
    parts: list[dict] = []
    if sample.image is not None:
        parts.append({"type": "image"})
    parts.append({"type": "text", "text": sample.user})
    return [{"role": "user", "content": parts}]


def encode(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, image_tokens: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 = no loss) of ``sample``; an image becomes ``image_tokens`` ids."""
    if not sample.user:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(sample.text, add_special_tokens=False)]
        ids.append(tokenizer.eos_token_id)
        return ids, list(ids)
    prompt = tokenizer.apply_chat_template(
        user_messages(sample), add_generation_prompt=True, tokenize=False
    )
    prompt = prompt.replace(tokenizer.image_token, tokenizer.image_token * image_tokens)
    full = f"{prompt}{sample.answer}{tokenizer.eos_token}\n"
    ids = tokenizer.encode(full, add_special_tokens=False)
    n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    labels = list(ids)
    if sample.answer_only or sample.image is not None:
        labels[:n_prompt] = [-100] * n_prompt
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    return ids, [-100 if t == image_id else t for t in labels]


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each of shape (batch, longest)."""
    longest = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def tokenizer_corpus(rng: random.Random, n: int) -> list[str]:
    """Texts to train the tokenizer on: every language alike, so no script is left as raw bytes."""
    texts = []
    for _ in range(n):
        s = multilingual_sample(rng)
        texts.append(s.text or f"{s.user}\n{s.answer}")
    for language in LANGUAGES:
        for kind in QUESTION_KINDS:
            texts.append(world.question(language, kind))
    return texts
