"""dim3.chat on a tiny real LLaVA: streaming, stopping, inputs, interleaving, bad input."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from PIL import Image

from dim3.chat import (
    ChatError,
    GenerationParams,
    build_inputs,
    interleave,
    load_image,
    load_vlm,
    stream_reply,
    to_processor_messages,
)

QUESTION = [{"role": "user", "content": "What colour is the shape?"}]


@pytest.fixture(scope="module")
def llava(tiny_llava_trio):
    model, processor = load_vlm(tiny_llava_trio.multimodal, dtype=torch.float32)
    return model, processor


@pytest.fixture()
def endless(llava):
    """The tiny LLaVA with no end-of-sequence token, so only max_new_tokens or stop end a reply."""
    model, processor = llava
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    yield model, processor
    model.generation_config.eos_token_id = eos


def red() -> Image.Image:
    return Image.new("RGB", (48, 40), (215, 35, 35))


def test_stream_yields_the_same_tokens_as_generate(llava):
    model, processor = llava
    params = GenerationParams(max_new_tokens=12)
    reply = stream_reply(model, processor, QUESTION, red(), params)
    chunks = list(reply)
    assert not reply.thread.is_alive()
    assert reply.new_tokens >= 1 and not reply.stopped

    inputs = build_inputs(model, processor, QUESTION, red())
    with torch.inference_mode():
        out = model.generate(**inputs, **params.generate_kwargs())
    expected = processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert "".join(chunks) == expected
    assert sum(1 for c in chunks if c) >= 1


def test_stop_flag_ends_generation_early(endless):
    model, processor = endless
    stop = threading.Event()
    reply = stream_reply(
        model, processor, QUESTION, red(), GenerationParams(max_new_tokens=400), stop
    )
    received = []
    for chunk in reply:
        received.append(chunk)
        if len(received) == 2:
            stop.set()
    reply.thread.join(timeout=10)
    assert not reply.thread.is_alive()
    assert reply.stopped
    assert reply.new_tokens < 20, "generation went on after the stop flag was set"


def test_closing_the_reply_stops_the_thread(endless):
    model, processor = endless
    reply = stream_reply(model, processor, QUESTION, None, GenerationParams(max_new_tokens=400))
    next(reply)
    started = time.monotonic()
    reply.close()
    assert not reply.thread.is_alive()
    assert reply.new_tokens < 400
    assert time.monotonic() - started < 10


def test_closing_a_finished_reply_returns_at_once(llava):
    model, processor = llava
    reply = stream_reply(model, processor, QUESTION, None, GenerationParams(max_new_tokens=3))
    list(reply)
    done = threading.Event()
    threading.Thread(target=lambda: (reply.close(), done.set()), daemon=True).start()
    assert done.wait(timeout=10), "close() blocked on a reply that had already ended"


def test_without_stop_it_runs_to_max_new_tokens(endless):
    model, processor = endless
    reply = stream_reply(model, processor, QUESTION, None, GenerationParams(max_new_tokens=15))
    list(reply)
    assert reply.new_tokens == 15 and not reply.stopped


def test_image_and_text_reach_the_processor(llava):
    model, processor = llava
    inputs = build_inputs(model, processor, QUESTION, red())
    image_id = model.config.image_token_id
    n_image_tokens = int((inputs["input_ids"] == image_id).sum())
    # 32 px / patch 8 = 16 patches, + the class token, which the "default" strategy drops again
    extra = processor.num_additional_image_tokens
    dropped = processor.vision_feature_select_strategy == "default"
    assert n_image_tokens == (32 // 8) ** 2 + extra - dropped
    own = processor.image_processor(red(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], own)
    prompt = processor.tokenizer.decode(inputs["input_ids"][0])
    assert "What colour is the shape?" in prompt

    # The picture changes what the model computes.
    blue = Image.new("RGB", (48, 40), (40, 70, 215))
    other = build_inputs(model, processor, QUESTION, blue)
    with torch.inference_mode():
        a = model(**inputs).logits[0, -1]
        b = model(**other).logits[0, -1]
    assert not torch.allclose(a, b)


def test_text_only_question_has_no_image_tokens(llava):
    model, processor = llava
    inputs = build_inputs(model, processor, QUESTION, None)
    assert "pixel_values" not in inputs
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 0


def test_multi_turn_messages_put_the_image_in_the_first_turn():
    turns = [
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": ""},
    ]
    with pytest.raises(ChatError, match="end with a user message"):
        to_processor_messages(turns, with_image=True)
    out = to_processor_messages(turns[:3], with_image=True)
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[0]["content"][0] == {"type": "image"}
    assert all({"type": "image"} not in m["content"] for m in out[1:])
    assert out[2]["content"] == [{"type": "text", "text": "And its colour?"}]


def test_multi_turn_reply_streams(llava):
    model, processor = llava
    turns = [
        *QUESTION,
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Sure?"},
    ]
    chunks = list(stream_reply(model, processor, turns, red(), GenerationParams(max_new_tokens=5)))
    assert chunks


def test_interleave_yields_snapshots_of_both_streams():
    snaps = list(interleave(["a", "b", "c"], ["x"]))
    assert snaps == [("a", ""), ("a", "x"), ("ab", "x"), ("abc", "x")]
    assert list(interleave([], [])) == []
    assert list(interleave([], ["1", "2"])) == [("", "1"), ("", "12")]


def test_two_concurrent_replies_match_sequential_ones(llava):
    model, processor = llava
    params = GenerationParams(max_new_tokens=10)
    second = [{"role": "user", "content": "Welche Farbe hat die Form?"}]
    alone = (
        "".join(stream_reply(model, processor, QUESTION, red(), params)),
        "".join(stream_reply(model, processor, second, None, params)),
    )
    both = (
        stream_reply(model, processor, QUESTION, red(), params),
        stream_reply(model, processor, second, None, params),
    )
    *_, last = interleave(*both)
    assert last == alone


def test_generation_params_are_checked():
    assert GenerationParams(temperature=0).generate_kwargs()["do_sample"] is False
    sampled = GenerationParams(temperature=0.7, top_p=0.9).generate_kwargs()
    assert sampled["do_sample"] and sampled["top_p"] == 0.9
    with pytest.raises(ChatError, match="max new tokens"):
        GenerationParams(max_new_tokens=0)
    with pytest.raises(ChatError, match="temperature"):
        GenerationParams(temperature=3.0)
    with pytest.raises(ChatError, match=r"0 \(always the most likely token\) or at least 0.01"):
        GenerationParams(temperature=1e-300)  # logits / 1e-300: infinite, NaN probabilities
    with pytest.raises(ChatError, match="top-p"):
        GenerationParams(top_p=0.0)


def test_the_smallest_temperature_samples_finite_probabilities(llava):
    model, processor = llava
    params = GenerationParams(max_new_tokens=8, temperature=0.01, top_p=1.0)
    reply = stream_reply(model, processor, QUESTION, red(), params)
    assert "".join(reply).strip() and reply.new_tokens >= 1


def test_load_image_refuses_non_images_and_huge_ones(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a picture")
    with pytest.raises(ChatError, match="not a readable image"):
        load_image(fake)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (1, 2, 3)).save(big)
    with pytest.raises(ChatError, match="300×200 pixels"):
        load_image(big, max_pixels=10_000)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (10, 10), (1, 2, 3, 4)).save(rgba)
    assert load_image(rgba).mode == "RGB"


def test_processor_without_chat_template_is_refused(llava):
    model, processor = llava
    template, processor.chat_template = processor.chat_template, None
    try:
        with pytest.raises(ChatError, match="no chat template"):
            stream_reply(model, processor, QUESTION, None, GenerationParams())
    finally:
        processor.chat_template = template


def test_text_streams_token_by_token_not_word_by_word(llava):
    """What a user sees: each generated token's text appears as soon as it is generated, before its
    word is complete, and the pieces add up to the whole reply with nothing lost or repeated.
    (How transformers' own streamer chunks the same ids is its business, not asserted here.)"""
    from dim3.chat import TokenStreamer

    tok = llava[1].tokenizer
    ids = tok("the red circle is big", add_special_tokens=False).input_ids
    words = tok.decode(ids).split()
    assert len(ids) > len(words)  # more tokens than words: some words are split

    streamer = TokenStreamer(tok, skip_special_tokens=True)
    seen: list[str] = []
    for n, i in enumerate(ids, 1):
        streamer.put(torch.tensor([i]))
        # after each token, everything decodable so far is already out of the streamer
        while not streamer.text_queue.empty():
            chunk = streamer.text_queue.get_nowait()
            if chunk:
                seen.append(chunk)
        assert "".join(seen) == tok.decode(ids[:n]), (n, seen)
    streamer.end()
    assert "".join(seen) + "".join(c for c in streamer if c) == tok.decode(ids)
    assert seen[0] == tok.decode(ids[:1]) and len(seen[0]) < len(words[0])  # before the word ends


def test_token_streamer_holds_back_only_an_incomplete_character(llava):
    from dim3.chat import TokenStreamer

    _, processor = llava
    tok = processor.tokenizer
    streamer = TokenStreamer(tok, skip_special_tokens=True)
    ids = tok("héllo wörld", add_special_tokens=False).input_ids
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    chunks = [c for c in streamer if c]
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in c for c in chunks)


def test_over_long_messages_are_refused_before_tokenizing(llava):
    from dim3.chat import MAX_MESSAGE_CHARS

    model, processor = llava
    long = [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]
    with pytest.raises(ChatError, match=r"4,001 characters long; the limit is 4,000"):
        stream_reply(model, processor, long, None, GenerationParams())


def test_conversations_longer_than_the_context_are_refused_before_a_forward_pass(llava):
    from dim3.chat import context_length

    model, processor = llava
    limit = context_length(model)
    words = " ".join(["red blue"] * limit)  # well over the context in tokens, under the char cap
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ChatError, match=f"reads at most {limit:,}.*Clear"):
            stream_reply(
                model,
                processor,
                [{"role": "user", "content": words[:3000]}],
                None,
                GenerationParams(),
            )
    finally:
        hook.remove()
    assert not calls


def test_max_new_tokens_is_cut_to_the_room_the_context_leaves(endless):
    from dim3.chat import build_inputs, context_length

    model, processor = endless
    limit = context_length(model)
    prompt = build_inputs(model, processor, QUESTION, None)["input_ids"].shape[1]
    reply = stream_reply(model, processor, QUESTION, None, GenerationParams(max_new_tokens=2048))
    list(reply)
    assert reply.max_new_tokens == limit - prompt == reply.new_tokens


def test_an_unread_reply_stops_generating(endless):
    model, processor = endless
    # 20 ms a step, as a large model's: the tiny one could otherwise write its whole context
    # within the idle timeout on a fast machine, and end before anything had to stop it
    hook = model.register_forward_pre_hook(lambda *a: time.sleep(0.02))
    try:
        reply = stream_reply(
            model,
            processor,
            QUESTION,
            None,
            GenerationParams(max_new_tokens=2048),
            idle_timeout=0.3,
        )
        next(reply)  # then the reader goes away
        reply.thread.join(timeout=30)
    finally:
        hook.remove()
    assert reply.max_new_tokens * 0.02 > 1.0  # it had more than a second left to write
    assert not reply.thread.is_alive() and reply.stopped
    assert reply.new_tokens < reply.max_new_tokens


def test_a_decompression_bomb_is_refused_as_too_many_pixels(tmp_path):
    from PIL import PngImagePlugin

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels, a small file
    assert bomb.stat().st_size < 5_000_000
    with pytest.raises(ChatError, match="too many pixels"):
        load_image(bomb)
    assert PngImagePlugin  # the PNG plugin read the header, not the pixels


def test_qwen2vl_chats_through_the_processor_autoprocessor_builds(tiny_qwen2vl_trio, tmp_path):
    """What `pip install -r requirements.txt` must give: Qwen2-VL's processor (which needs
    torchvision in transformers 5) built by AutoProcessor, and a streamed answer to a picture."""
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    folder = tmp_path / "qwen2vl-chat"
    shutil.copytree(tiny_qwen2vl_trio.multimodal, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    Qwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),  # needs torchvision
        chat_template=tok.chat_template,
    ).save_pretrained(folder)
    model, processor = load_vlm(folder, dtype=torch.float32)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    inputs = build_inputs(model, processor, QUESTION, red())
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) >= 1
    assert "pixel_values" in inputs and "image_grid_thw" in inputs
    reply = stream_reply(model, processor, QUESTION, red(), GenerationParams(max_new_tokens=6))
    text = "".join(reply)
    assert reply.new_tokens >= 1 and not reply.stopped
    assert isinstance(text, str)


def test_a_damaged_vlm_is_refused_with_its_file_and_the_fix(tiny_llava_trio, tmp_path):
    """A VLM whose weights file was cut short (an interrupted download) is refused by name, with
    the fix, before transformers reads it (not its deserializing error)."""
    from dim3.checkpoints import CheckpointError

    folder = tmp_path / "vlm"
    shutil.copytree(tiny_llava_trio.multimodal, folder)
    [shard] = folder.glob("*.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated .* re-download"):
        load_vlm(folder, dtype=torch.float32)
