"""Pipeline tests: prompts, greedy tokens and multi-turn chat against transformers; errors; torch-free runtime."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from conftest import F32, FAMILIES
from llava_ov.runtime.chat import ChatSession
from llava_ov.errors import ContextLengthError, InvalidImageError, ModelNotFoundError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_generate, hf_inputs

GREEDY32 = GenerationConfig(max_new_tokens=32)


@pytest.fixture(scope="module")
def pipes(exports):
    return {fam: Pipeline(exports[fam], properties=F32, cache_dir=None) for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "rocket", "small", "square336"])
def test_prompt_ids_equal_processor_expansion(family, photo, pipes, hf_models, photos, tmp_path):
    _, processor = hf_models[family]
    if photo in ("small", "square336"):  # both sides <= 336: grid ties (where openvino_genai differs)
        path = tmp_path / f"{photo}.png"
        Image.open(photos["chelsea"]).convert("RGB").resize((300, 200) if photo == "small" else (336, 336)).save(path)
    else:
        path = photos[photo]
    messages = [Message("user", "What is in this picture?", [path])]
    ours = pipes[family].prepare(messages).token_ids
    ref = hf_inputs(processor, messages)["input_ids"][0].numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "motorcycle_left"])
def test_greedy_tokens_match_transformers(family, photo, pipes, hf_models, photos):
    model, processor = hf_models[family]
    messages = [Message("user", "Describe this image in detail.", [photos[photo]])]
    ref = hf_generate(model, processor, messages)
    result = pipes[family].generate(messages, config=GREEDY32)
    assert len(set(ref)) > 4, "reference collapsed into repeats"
    assert result.token_ids == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_second_turn_matches_transformers_and_prefills_only_new_tokens(family, pipes, hf_models, photos):
    model, processor = hf_models[family]
    pipes[family].clear_caches()  # the first turn must really prefill the image
    session = ChatSession(pipes[family])
    first = session.ask("What is shown here?", [photos["coffee"]], GREEDY32)
    second = session.ask("Tell me more about the colours.", config=GREEDY32)
    assert second.token_ids == hf_generate(model, processor, session.messages[:-1])
    # Only the tail is prefilled: the image and the first turn come from the KV cache (whole blocks).
    block = pipes[family].engine.pool.block_size
    assert second.cached_tokens >= first.prompt_tokens - block
    prefilled = second.prompt_tokens - second.cached_tokens
    assert prefilled < len(first.token_ids) + 40 + block, prefilled


def test_two_images_in_one_conversation(pipes, hf_models, photos):
    model, processor = hf_models["llava-next"]
    session = ChatSession(pipes["llava-next"])
    session.ask("What is this?", [photos["chelsea"]], GREEDY32)
    result = session.ask("And this one? Compare both.", [photos["rocket"]], GREEDY32)
    assert result.image_tokens > 2 * 576
    assert result.token_ids == hf_generate(model, processor, session.messages[:-1])
    assert session.last_image == photos["rocket"]


def test_two_images_in_one_message(pipes, hf_models, photos):
    model, processor = hf_models["llava"]
    messages = [Message("user", "Which picture is brighter?", [photos["astronaut"], photos["coffee"]])]
    assert pipes["llava"].generate(messages, config=GREEDY32).token_ids == hf_generate(model, processor, messages)


def test_text_only_turn(pipes, hf_models):
    model, processor = hf_models["llava-next"]
    messages = [Message("user", "Write a haiku about the sea.")]
    assert pipes["llava-next"].generate(messages, config=GREEDY32).token_ids == hf_generate(model, processor, messages)


def test_image_features_are_cached_by_content(pipes, photos):
    pipe = pipes["llava"]
    first = pipe.prepare_image(photos["rocket"])
    again = pipe.prepare_image(photos["rocket"].read_bytes())  # same pixels, other source type
    assert again.key == first.key and again.vision_s == 0.0


# ---------------------------------------------------------------- decoding controls


def test_seeded_sampling_is_reproducible(pipes, photos):
    pipe = pipes["llava"]
    cfg = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50)
    a = pipe.generate("Describe.", [photos["chelsea"]], GenerationConfig(seed=7, **cfg))
    b = pipe.generate("Describe.", [photos["chelsea"]], GenerationConfig(seed=7, **cfg))
    c = pipe.generate("Describe.", [photos["chelsea"]], GenerationConfig(seed=8, **cfg))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_string_ends_generation_at_the_right_place(pipes, photos):
    pipe = pipes["llava-next"]
    full = pipe.generate("Describe.", [photos["chelsea"]], GenerationConfig(max_new_tokens=40)).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    result = pipe.generate("Describe.", [photos["chelsea"]], GenerationConfig(max_new_tokens=40, stop=[stop]))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]


def test_streamed_text_equals_detokenized_tokens(pipes, photos):
    pipe = pipes["llava-next"]
    chunks = list(pipe.stream("Describe.", [photos["astronaut"]], GenerationConfig(max_new_tokens=48)))
    result = chunks[-1].result
    assert "".join(c.text for c in chunks) == result.text == pipe.model.tokenizer.decode(result.token_ids)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert result.finish_reason == "length" and len(result.token_ids) == 48


def test_cancel_from_another_thread_stops_within_one_token(pipes, photos):
    """The engine stops within the step in flight when the cancel is set (it may have run ahead of this
    reader: its events are queued, so the tokens seen here are not what it had made by then)."""
    pipe = pipes["llava-next"]
    cancel = threading.Event()
    seen, steps_at_cancel = 0, None
    for chunk in pipe.stream("Describe.", [photos["astronaut"]], GenerationConfig(max_new_tokens=200), cancel):
        seen += len(chunk.token_ids)
        if seen == 5:
            setter = threading.Thread(target=cancel.set)
            setter.start()
            setter.join()
            steps_at_cancel = pipe.engine.stats()["steps"]
    assert chunk.finish_reason == "cancelled"
    assert 5 <= len(chunk.result.token_ids) < 200
    assert pipe.engine.stats()["steps"] - steps_at_cancel <= 2  # the step in flight (and one starting)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_clear_errors_and_pipeline_still_works(pipes, photos, tmp_path):
    pipe = pipes["llava"]
    good = pipe.generate("Describe.", [photos["coffee"]], GREEDY32).token_ids
    with pytest.raises(InvalidImageError, match="not found|no such"):
        pipe.generate("Describe.", [tmp_path / "missing.png"], GREEDY32)
    with pytest.raises(InvalidImageError):
        pipe.generate("Describe.", [b"\x89PNG\r\n\x1a\nthis is not a png"], GREEDY32)
    with pytest.raises(ContextLengthError, match="context is 4096 tokens"):
        pipe.generate("word " * 5000, [photos["coffee"]], GREEDY32)
    assert pipe.generate("Describe.", [photos["coffee"]], GREEDY32).token_ids == good


def test_unknown_model_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        Pipeline(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a llava-ov export"):
        Pipeline(tmp_path / "empty")


def test_chat_context_overflow_drops_oldest_turns(exports, photos):
    pipe = Pipeline(exports["llava"], properties=F32, cache_dir=None)
    session = ChatSession(pipe)
    for _ in range(3):
        session.ask("Describe the photo. " + "more words " * 400, [photos["chelsea"]], GenerationConfig(max_new_tokens=8))
    assert session.dropped_turns >= 1
    assert pipe.count_tokens(session.history()) <= pipe.model.max_context


def test_runtime_runs_with_torch_and_transformers_blocked(exports, photos):
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "torchvision"):
            sys.modules[name] = None  # any import of them now raises ImportError
        from llava_ov.runtime.pipeline import Pipeline
        from llava_ov.runtime.generate import GenerationConfig
        pipe = Pipeline({str(exports["llava-next"])!r}, cache_dir=None)
        result = pipe.generate("What is it?", [{str(photos["rocket"])!r}], GenerationConfig(max_new_tokens=4))
        assert len(result.token_ids) == 4, result
        assert not any(m in sys.modules and sys.modules[m] is not None for m in ("torch", "transformers"))
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_default_cache_covers_gpu_and_npu_not_cpu(tmp_path):
    from llava_ov.runtime.model import cache_dir_for, default_cache_dir

    assert cache_dir_for("default", "CPU") is None  # imported CPU blobs decode slower (docs/benchmarks.md)
    assert cache_dir_for("default", "GPU.1") == cache_dir_for("default", "NPU") == str(default_cache_dir())
    assert cache_dir_for(str(tmp_path), "CPU") == str(tmp_path)  # an explicit dir is honoured everywhere
    assert cache_dir_for(None, "GPU") is None


def test_compiled_model_cache_is_written_and_reused(exports, tmp_path):
    cache = tmp_path / "ov-cache"
    Pipeline(exports["llava"], cache_dir=str(cache))
    blobs = sorted(p.name for p in cache.iterdir())
    assert len(blobs) >= 3  # one compiled blob per model part
    again = Pipeline(exports["llava"], cache_dir=str(cache))
    assert sorted(p.name for p in cache.iterdir()) == blobs  # loaded from the cache, nothing recompiled
    assert again.generate("Hi", config=GenerationConfig(max_new_tokens=2)).token_ids


def test_mixing_precisions_per_part(exports, tmp_path, photos):
    from llava_ov.exporting.quantize import compress_export

    int8 = compress_export(exports["llava"], tmp_path / "int8", weight_format="int8", progress=False)
    mixed = Pipeline(exports["llava"], part_paths={"language": str(int8)}, cache_dir=None)
    assert mixed.model.part_path("language") == int8 / "openvino_language_model.xml"
    assert mixed.generate("Describe.", [photos["coffee"]], GenerationConfig(max_new_tokens=4)).token_ids


def test_context_overflow_keeps_the_turn_with_the_latest_image(exports, photos):
    pipe = Pipeline(exports["llava"], properties=F32, cache_dir=None)
    session = ChatSession(pipe)
    session.ask("Describe the photo.", [photos["chelsea"]], GenerationConfig(max_new_tokens=4))
    for _ in range(4):
        session.ask("Tell me more. " + "more words " * 500, config=GenerationConfig(max_new_tokens=4))
    assert session.dropped_turns >= 1
    assert session.messages[0].images == [photos["chelsea"]] and session.last_image == photos["chelsea"]
    assert pipe.count_tokens(session.history()) <= pipe.model.max_context


def test_parallel_sessions_on_one_pipeline_give_their_own_answers(exports, photos):
    pipe = Pipeline(exports["llava-next"], properties=F32, cache_dir=None)
    cfg = GenerationConfig(max_new_tokens=8)
    expected = {name: pipe.generate("What is it?", [photos[name]], cfg).token_ids for name in ("rocket", "coffee")}
    results: dict[str, list[int]] = {}

    def ask(name):
        results[name] = ChatSession(pipe).ask("What is it?", [photos[name]], cfg).token_ids

    for _ in range(3):
        threads = [threading.Thread(target=ask, args=(n,)) for n in expected]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert results == expected


@pytest.mark.parametrize("kv_cache", ["paged", "stateful"])
def test_one_cpu_thread_at_the_default_precision_loads_and_answers(exports, kv_cache):
    """OpenVINO 2026.4 dies with SIGFPE compiling the language model with INFERENCE_NUM_THREADS=1 at
    bf16 (the default on AMX / AVX-512-bf16 CPUs): the pipeline must never hand it that setting.
    Default precision on purpose (no f32 pins); in a child process, so a crash fails only this test."""
    code = textwrap.dedent(f"""
        from llava_ov.runtime.pipeline import Pipeline
        from llava_ov.runtime.generate import GenerationConfig
        pipe = Pipeline({str(exports["llava"])!r}, properties={{"INFERENCE_NUM_THREADS": 1}}, cache_dir=None,
                        kv_cache={kv_cache!r})
        result = pipe.generate("Hi", config=GenerationConfig(max_new_tokens=3))
        print(len(result.token_ids), pipe.model.runtime_info()["language"]["INFERENCE_NUM_THREADS"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.split() == ["3", "1"]
