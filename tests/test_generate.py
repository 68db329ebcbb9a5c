"""Decode-loop pieces: sampling, repetition penalty, streaming detokenisation, stop strings, template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import (
    DecodeState,
    ForcedDecode,
    GenerationConfig,
    IncrementalDetokenizer,
    Sampler,
    StopStrings,
    apply_repetition_penalty,
)
from llava_ov.runtime.model import ExportedModel
from llava_ov.runtime.settings import LoadSettings
from llava_ov.runtime.template import ChatTemplate


def test_greedy_picks_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert Sampler(GenerationConfig())(logits, []) == 1


def test_top_k_1_is_greedy_and_top_p_keeps_the_nucleus():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=100).astype(np.float32)
    sampler = Sampler(GenerationConfig(temperature=1.0, top_k=1, seed=0))
    assert {sampler(logits, []) for _ in range(20)} == {int(logits.argmax())}
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)].tolist())
    sampler = Sampler(GenerationConfig(temperature=1.0, top_p=0.5, seed=1))
    drawn = {sampler(logits, []) for _ in range(300)}
    assert drawn <= nucleus and len(drawn) > 1


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    sampler = Sampler(GenerationConfig(temperature=1.0, seed=3))
    counts = np.bincount([sampler(logits, []) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    history = [3, 7, 7, 12, 40]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), torch.from_numpy(logits[None].copy()))
    np.testing.assert_allclose(apply_repetition_penalty(logits, history, 1.3), ref[0].numpy(), rtol=1e-6)


def test_tiny_temperature_samples_the_argmax_without_nan():
    logits = np.array([1.0, 3.0, 2.9, -50.0], np.float32)
    for temperature in (1e-310, 1e-30, 1e-8):
        sampler = Sampler(GenerationConfig(temperature=temperature, seed=0))
        assert {sampler(logits, []) for _ in range(20)} == {1}


def test_invalid_settings_are_rejected():
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                dict(repetition_penalty=0), dict(repetition_penalty=1e-9)):  # fmt: skip
        with pytest.raises(LlavaOvError):
            GenerationConfig(**bad).validate()


@pytest.fixture(scope="module")
def tokenizer(exports):
    return ExportedModel(exports["llava-next"], LoadSettings(cache_dir=None)).tokenizer


TEXTS = ["Hello world, this is a test.", "Émojis 🦙🔥 and 日本語 mixed in", "  spaces   and\nnewlines\n\n",
         "a b  c   d", "<image> special </s> tokens <pad> inside"]  # fmt: skip


def streams(tokenizer):
    return {"ir": lambda: IncrementalDetokenizer(tokenizer.decode), "pieces": tokenizer.pieces.stream}


@pytest.mark.parametrize("kind", ["ir", "pieces"])
@pytest.mark.parametrize("text", TEXTS)
def test_streaming_detokenizers_reassemble_text(tokenizer, text, kind):
    ids = tokenizer.encode(text)[1:]  # drop BOS
    detok = streams(tokenizer)[kind]()
    pieces = [detok.push(int(t)) for t in ids]
    assert "".join(pieces) + detok.flush() == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_piece_decoder_equals_detokenizer_ir_on_random_ids(tokenizer):
    rng = np.random.default_rng(0)
    for _ in range(30):
        ids = rng.integers(0, 32002, rng.integers(1, 40)).tolist()
        assert tokenizer.pieces.decode(ids) == tokenizer.decode(ids), ids


@pytest.mark.parametrize("kind", ["ir", "pieces"])
def test_byte_fallback_tokens_never_emit_broken_utf8(tokenizer, kind):
    ids = tokenizer.encode("🦙")[1:]
    assert len(ids) > 1  # the emoji is several byte tokens
    detok = streams(tokenizer)[kind]()
    pieces = [detok.push(int(t)) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)  # nothing until the character is complete
    assert "".join(pieces).strip() == "🦙"


def test_stop_strings_hold_back_partial_matches():
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", False)
    assert stops.feed("N") == ("", False)
    assert stops.feed("D tail") == ("", True)
    stops = StopStrings(["END"])
    assert stops.feed("abc E") == ("abc ", False)
    assert stops.feed("x") == ("Ex", False)


def test_decode_state_finishes_on_eos_length_and_stop_strings():
    logits = {0: np.array([0, 0, 5.0]), 1: np.array([5.0, 0, 0])}  # token 2 then token 0 (EOS)

    def text():
        return IncrementalDetokenizer(lambda ids: "x" * len(ids))

    state = DecodeState(text(), GenerationConfig(), {0})
    first, last = state.next(logits[0]), state.next(logits[1])
    assert (first.token_id, first.finish_reason) == (2, None) and first.text == "x"
    assert (last.token_id, last.finish_reason) == (None, "eos") and state.finished == "eos"
    state = DecodeState(text(), GenerationConfig(max_new_tokens=1), {0})
    event = state.next(logits[0])
    assert (event.token_id, event.finish_reason) == (2, "length")  # the last token carries the finish reason
    state = DecodeState(text(), GenerationConfig(), {0}, max_tokens=1)  # the context caps max_new_tokens
    assert state.next(logits[0]).finish_reason == "length"
    state = DecodeState(text(), GenerationConfig(stop=["xx"]), {0})
    assert state.next(logits[0]).finish_reason is None
    event = state.next(logits[0])
    assert event.finish_reason == "stop" and event.text == ""  # the stop string itself is not shown
    assert DecodeState(text(), GenerationConfig(), {0}).cancel().finish_reason == "cancelled"


def test_forced_decode_feeds_the_given_tokens_and_keeps_every_row():
    forced = ForcedDecode([5, 7])
    rows = [np.full(3, i, np.float32) for i in range(3)]
    events = [forced.next(r) for r in rows]
    assert [e.token_id for e in events] == [5, 7, None] and events[-1].finish_reason == "length"
    np.testing.assert_array_equal(np.stack(forced.rows), np.stack(rows))


def test_multi_turn_template_matches_transformers(hf_models, exports):
    _, processor = hf_models["llava-next"]
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Its colour?"}]},
    ]
    ours = ChatTemplate.from_export(exports["llava-next"]).render(chat)
    assert ours == processor.apply_chat_template(chat, add_generation_prompt=True)
    assert "A cat.</s> [INST]" in ours  # the current Hub form, not the 2024 `<\s>` typo
