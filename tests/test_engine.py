"""The engine: paged KV cache, continuous batching, chunked prefill, prefix cache, preemption.

Exactness is checked against the stateful path (itself equal to transformers, see
test_pipeline.py, which now runs through the engine by default) and against transformers
directly; the block pool and scheduler are also tested on their own, without a model.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from conftest import F32, FAMILIES
from llava_ov.runtime.chat import ChatSession
from llava_ov.errors import ContextLengthError, LlavaOvError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.export import DEFAULT_PINPOINTS
from llava_ov.runtime.engine.kvcache import BlockPool, PoolExhausted, block_hashes
from llava_ov.runtime.engine.paged import ForwardBatch
from llava_ov.runtime.pipeline import Message, Pipeline
from llava_ov.runtime.engine.scheduler import Scheduler, Sequence
from reference import hf_generate

GREEDY = GenerationConfig(max_new_tokens=24)
PROMPTS = ["hi", "What is this?", "Tell me a story about a cat on a boat.", "Describe the picture in detail."]


@pytest.fixture(scope="module")
def stateful(exports):
    return {fam: Pipeline(exports[fam], properties=F32, cache_dir=None, kv_cache="stateful") for fam in FAMILIES}


@pytest.fixture(scope="module")
def paged(exports):
    pipes = {fam: Pipeline(exports[fam], properties=F32, cache_dir=None) for fam in FAMILIES}
    yield pipes
    for pipe in pipes.values():
        pipe.close()


def small_pool(export, blocks: int, **engine) -> Pipeline:
    probe = Pipeline(export, properties=F32, cache_dir=None, kv_cache_gb=0.001)
    gb = blocks * probe.model.paged.bytes_per_block / 2**30
    probe.close()
    return Pipeline(export, properties=F32, cache_dir=None, kv_cache_gb=gb, **engine)


def generate_together(pipe: Pipeline, prompts: list[str], config: GenerationConfig, timeout: float = 300) -> list:
    """Each prompt generated from a thread of its own, all started at once; the results in prompt order."""
    out: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def run(i):
        start.wait()
        out[i] = pipe.generate(prompts[i], config=config)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return out


# ----------------------------------------------------------------------------- the block pool alone


def test_default_pool_takes_a_quarter_of_the_room_a_container_leaves(monkeypatch):
    """The default KV budget comes from the memory this process can still get (a cgroup limit caps
    the host's MemAvailable), bounded by 4 GiB and CONTEXTS_IN_POOL contexts, never under one context."""
    from types import SimpleNamespace

    from llava_ov.runtime.engine import core as engine
    from llava_ov.common import hardware

    lm = SimpleNamespace(block_size=32, bytes_per_block=2**20)  # 1 MiB per block of 32 tokens
    monkeypatch.setattr(hardware, "available_memory", lambda: 2 * 2**30)  # e.g. a 2 GiB room left in a container
    assert engine.default_pool_blocks(lm, None, max_context=4096) == 512  # a quarter: 512 MiB
    monkeypatch.setattr(hardware, "available_memory", lambda: 64 * 2**20)
    assert engine.default_pool_blocks(lm, None, max_context=4096) == 128  # never less than one context
    monkeypatch.setattr(hardware, "available_memory", lambda: 512 * 2**30)
    assert engine.default_pool_blocks(lm, None, max_context=4096) == min(4096, engine.CONTEXTS_IN_POOL * 128)
    assert engine.default_pool_blocks(lm, 0.25, max_context=4096) == 256  # an explicit budget is taken as given


def test_block_hashes_chain_over_the_whole_prefix():
    a = np.arange(100, dtype=np.int64)
    b = a.copy()
    b[3] = -7  # an earlier difference changes every later block's hash
    ha, hb = block_hashes(a, 32), block_hashes(b, 32)
    assert len(ha) == 3 and all(x != y for x, y in zip(ha, hb))
    assert block_hashes(a[:64], 32) == ha[:2]


def test_pool_shares_reuses_and_evicts_lru():
    pool = BlockPool(3, 4)
    hashes = block_hashes(np.arange(8, dtype=np.int64), 4)
    first = [pool.allocate(), pool.allocate()]
    first = [pool.publish(b, h) for b, h in zip(first, hashes)]
    pool.release(first)
    assert pool.available == 3 and len(pool.idle) == 2
    assert pool.match(hashes) == first  # a later sequence finds both
    pool.release(first)
    other = [pool.allocate(), pool.allocate()]  # 1 free + the least recently used idle one: the prefix's tail
    assert first[1] in other and first[0] not in other
    assert pool.match(hashes) == first[:1]  # the head is kept, so the prefix still matches as far as it goes
    pool.release(first[:1])
    pool.allocate()
    with pytest.raises(PoolExhausted):
        pool.allocate()


def test_a_preempted_sequence_keeps_the_head_of_its_prefix_cached():
    """Recycling takes a released sequence's blocks from its end: after a preemption and some of its
    blocks recycled by others, it is re-admitted from the cached head of its prompt, not from zero."""
    pool = BlockPool(6, 4)
    sched = Scheduler(pool, max_step_tokens=256, max_running=4)
    a, b = _seq(8, 32), _seq(16, 32, start=200)  # a decodes; b holds 4 blocks, 3 of them full and cached
    sched.add(a)
    sched.add(b)
    for _ in range(9):
        for chunk in sched.schedule():
            sample = chunk.sample
            sched.advance(chunk)
            if sample:
                chunk.seq.append(1)
    assert sched.preemptions >= 1 and b in sched.waiting
    hashes = block_hashes(b.keys[:16], 4)
    kept = pool.match(hashes)
    assert len(kept) >= 2  # was 0: the head went first, and the cached tail could never be matched
    pool.release(kept)


def test_publish_of_equal_content_keeps_one_block():
    pool = BlockPool(4, 4)
    (h,) = block_hashes(np.arange(4, dtype=np.int64), 4)
    a, b = pool.allocate(), pool.allocate()
    assert pool.publish(a, h) == a
    assert pool.publish(b, h) == a  # b computed the same content: it is freed, a is shared
    assert pool.refs[a] == 2 and pool.available == 3


def _seq(length: int, new: int, start: int = 0) -> Sequence:
    keys = np.arange(start, start + length, dtype=np.int64)
    return Sequence(keys, keys.copy(), np.full(length, -1), np.zeros((0, 4), np.float32), capacity=length + new)


def test_proposed_tokens_take_at_most_half_the_step_budget():
    """Decoding sequences' proposals (verified in the same forward) never starve a waiting prompt."""
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_step_tokens=16, max_running=8)
    decoding = [_seq(4, 20, start=10 * i) for i in range(3)]
    for seq in decoding:
        sched.add(seq)
    for chunk in sched.schedule():  # their prompts in one step (12 of 16 tokens)
        sched.advance(chunk)
        chunk.seq.append(1)
    waiting = _seq(12, 4, start=500)
    sched.add(waiting)
    for seq in decoding:
        seq.propose([2, 3, 4, 5, 6, 7])
    plan = sched.schedule()
    counts = {id(c.seq): (c.start, c.count, c.rows) for c in plan}
    assert [counts[id(s)] for s in decoding] == [(4, 7, 7), (4, 3, 3), (4, 1, 1)]  # 6 + 2 + 0 proposals: 8 of 16
    assert counts[id(waiting)] == (0, 5, 0) and sum(c.count for c in plan) == 16  # the rest went to the prompt


def test_scheduler_decodes_first_chunks_prompts_and_preempts_when_the_pool_runs_out():
    pool = BlockPool(6, 4)
    sched = Scheduler(pool, max_step_tokens=6, max_running=8)
    a, b = _seq(10, 10), _seq(5, 10, start=100)  # 5 and 4 blocks at the end: each fits alone, not both
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [(c.seq, c.start, c.count) for c in plan] == [(a, 0, 6)]  # the budget caps the chunk
    for c in plan:
        sched.advance(c)
    plan = sched.schedule()
    assert [(c.seq, c.start, c.count) for c in plan] == [(a, 6, 4), (b, 0, 2)]
    for _ in range(60):  # decode both; a needs blocks b holds: b is preempted, then recomputed
        for c in plan:
            sched.advance(c)
            if c.sample and c.seq.length >= c.seq.capacity:
                sched.remove(c.seq)
            elif c.sample:
                c.seq.append(7)
        if not sched.has_work():
            break
        plan = sched.schedule()
        assert sum(c.count for c in plan) <= 6
        assert pool.used <= pool.num_blocks
    assert not sched.has_work() and sched.preemptions >= 1 and b.preemptions >= 1
    assert pool.used == 0


# ----------------------------------------------------------------------------- exactness


def _pinpoint_image(tmp_path, h: int, w: int):
    path = tmp_path / f"grid-{h}x{w}.png"
    rng = np.random.default_rng(h * 7 + w)
    Image.fromarray(rng.integers(0, 255, (h - 40, w - 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("pinpoint", DEFAULT_PINPOINTS)
def test_engine_equals_stateful_path_for_every_grid_shape(pinpoint, paged, stateful, tmp_path):
    image = _pinpoint_image(tmp_path, *pinpoint)
    ref = stateful["llava-next"].generate("Describe it.", [image], GREEDY)
    ours = paged["llava-next"].generate("Describe it.", [image], GREEDY)
    assert ours.token_ids == ref.token_ids and ours.prompt_tokens == ref.prompt_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_transformers_and_stateful(family, paged, stateful, hf_models, photos):
    model, processor = hf_models[family]
    messages = [Message("user", "What is in this picture?", [photos["rocket"]])]
    ref = hf_generate(model, processor, messages, max_new_tokens=24)
    assert paged[family].generate(messages, config=GREEDY).token_ids == ref
    assert stateful[family].generate(messages, config=GREEDY).token_ids == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_four_requests_together_give_what_they_give_alone(family, paged, photos):
    pipe = paged[family]
    jobs = [(p, [photos["chelsea"]] if i % 2 else []) for i, p in enumerate(PROMPTS)]
    alone = []
    for prompt, images in jobs:
        pipe.clear_caches()
        alone.append(pipe.generate(prompt, images, GREEDY).token_ids)
    pipe.clear_caches()
    together: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i):
        start.wait()
        together[i] = pipe.generate(jobs[i][0], jobs[i][1], GREEDY).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_chunks_of_1_7_256_give_the_same_logits(family, exports, stateful, photos):
    """The same prompt split into chunks of 1, 7 and 256 tokens: last-position logits within 1e-4."""
    ref_pipe = stateful[family]
    prompt = ref_pipe.prepare([Message("user", "What is this?", [photos["coffee"]])])
    ref_pipe.reset()
    reference, _ = ref_pipe.prefill(prompt)
    ref_pipe.reset()
    pipe = Pipeline(exports[family], properties=F32, cache_dir=None, kv_cache_gb=0.05)
    lm, ids = pipe.model.paged, prompt.token_ids
    rows, features = prompt.image_rows()
    total = len(ids)
    blocks = list(range(-(-total // lm.block_size)))
    for chunk in (1, 7, 256):
        past, logits = 0, None
        while past < total:
            n = min(chunk, total - past)
            used = blocks[: -(-(past + n) // lm.block_size)]
            at = np.flatnonzero(rows[past : past + n] >= 0)
            batch = ForwardBatch(ids[past : past + n], np.arange(past, past + n), [past], [n], [used], [n - 1],
                                 image_rows=at, image_embeds=features[rows[past + at]])  # fmt: skip
            logits = lm.forward(batch)[0]
            past += n
        np.testing.assert_allclose(logits, reference, atol=1e-4, err_msg=f"chunks of {chunk}")
    pipe.close()


# ----------------------------------------------------------------------------- prefix cache


def test_two_interleaved_conversations_each_find_their_own_prefix(paged, photos):
    pipe = paged["llava-next"]
    pipe.clear_caches()
    chats = [ChatSession(pipe), ChatSession(pipe)]
    first = [chat.ask("What is this?", [photos[name]], GREEDY) for chat, name in zip(chats, ("chelsea", "rocket"))]
    for turn in ("Say more.", "And the colours?"):
        for chat, earlier in zip(chats, first):
            result = chat.ask(turn, config=GREEDY)
            assert result.cached_tokens >= earlier.prompt_tokens - pipe.engine.pool.block_size
            assert result.prompt_tokens - result.cached_tokens < 100


# ----------------------------------------------------------------------------- limits


def test_cancel_takes_effect_during_prefill_and_frees_the_blocks(exports, photos):
    pipe = Pipeline(exports["llava-next"], properties=F32, cache_dir=None, max_step_tokens=16)
    cancel = threading.Event()
    seen, steps_at_cancel = [], []

    def progress(done, total):
        seen.append(done)
        if not cancel.is_set():
            steps_at_cancel.append(pipe.engine.steps)
            cancel.set()

    chunks = list(pipe.stream("Describe it.", [photos["astronaut"]], GREEDY, cancel=cancel, progress=progress))
    result = chunks[-1].result
    assert result.finish_reason == "cancelled" and result.token_ids == []
    assert seen[0] == 16 and seen[-1] < result.prompt_tokens  # cancelled in the middle of the prefill
    # the engine thread runs ahead of this one: what counts is that at most the step already in
    # flight when the cancel was set ran after it (progress events of earlier steps may still arrive)
    assert pipe.engine.steps <= steps_at_cancel[0] + 1, (pipe.engine.steps, steps_at_cancel)
    assert pipe.engine.pool.used == 0
    assert pipe.generate("hi", config=GREEDY).finish_reason in ("eos", "length")  # the engine goes on
    pipe.close()


def test_a_full_pool_queues_or_preempts_and_every_request_completes(exports):
    export = exports["llava"]
    alone_pipe = Pipeline(export, properties=F32, cache_dir=None)
    config = GenerationConfig(max_new_tokens=60, ignore_eos=True)  # ~3 blocks each: one fits, four do not
    alone = [alone_pipe.generate(p, config=config).token_ids for p in PROMPTS]
    alone_pipe.close()
    pipe = small_pool(export, blocks=5)
    out = generate_together(pipe, PROMPTS, config)
    assert [r.token_ids for r in out] == alone
    stats = pipe.engine.stats()
    assert stats["blocks_total"] == 5 and stats["blocks_used"] == 0
    assert stats["preemptions"] >= 1
    pipe.close()


def test_a_prompt_larger_than_the_pool_is_refused_clearly(exports, photos):
    pipe = small_pool(exports["llava-next"], blocks=4)
    with pytest.raises(ContextLengthError, match="KV cache"):
        pipe.generate("Describe it.", [photos["astronaut"]], GREEDY)
    assert pipe.generate("hi", config=GenerationConfig(max_new_tokens=4)).token_ids  # still serving
    pipe.close()


def test_scoring_more_tokens_than_the_pool_holds_is_refused_clearly(exports):
    """Prompt plus scored tokens must fit: refused up front (it ended in an IndexError from the sequence's
    token array once the forced tokens ran past it), and scoring that fits still works after."""
    pipe = small_pool(exports["llava-next"], blocks=4)
    messages = [Message("user", "hi")]
    prompt = pipe.count_tokens(messages)
    room = pipe.prompt_limit - prompt
    for too_many in (room, room + 10):
        with pytest.raises(ContextLengthError, match="to score do not fit"):
            pipe.score(messages, [5] * too_many)
    assert pipe.score(messages, [5] * (room - 1)).shape[0] == room  # the most that fits: one row per position
    assert pipe.engine.stats()["blocks_used"] == 0
    pipe.close()


def test_engine_at_the_plugin_default_precision(exports, photos):
    """Default precision (bf16 where the CPU has it, u8 KV cache): runs, batches, and is deterministic."""
    pipe = Pipeline(exports["llava-next"], cache_dir=None)
    first = pipe.generate("What is this?", [photos["chelsea"]], GREEDY)
    pipe.clear_caches()
    again = pipe.generate("What is this?", [photos["chelsea"]], GREEDY)
    assert first.token_ids == again.token_ids and len(first.token_ids) > 0
    assert pipe.info()["runtime"]["language"].get("KV_CACHE_PRECISION")
    pipe.close()


def test_the_decode_variant_runs_the_decode_steps_on_the_same_kv_blocks(exports, paged, photos):
    """decode_precision='f32' compiles the LM a second time for steps of at most 32 tokens; under the f32
    pins both compilations compute alike, so the tokens equal the one-model engine's exactly, with the
    prompt prefilled by the main model and the answer decoded by the variant over the same blocks."""
    pipe = Pipeline(exports["llava-next"], properties=F32, cache_dir=None, decode_precision="f32")
    together = []

    def run(question: str) -> None:
        together.append((question, pipe.generate(question, [photos["chelsea"]], GREEDY).token_ids))

    threads = [threading.Thread(target=run, args=(q,)) for q in PROMPTS[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for question, tokens in together:
        assert tokens == paged["llava-next"].generate(question, [photos["chelsea"]], GREEDY).token_ids
    steps = pipe.model.paged.steps
    assert steps["decode"] >= GREEDY.max_new_tokens - 1 and steps["main"] >= 1
    assert "f32" in pipe.info()["runtime"]["language"]["DECODE_STEPS"]
    pipe.close()


def test_the_decode_variant_at_the_plugin_default_precision(exports, photos):
    """Where the plugin computes bf16 by default the two compilations differ in precision: it runs,
    keeps one KV cache type, and repeats itself."""
    pipe = Pipeline(exports["llava-next"], cache_dir=None, decode_precision="f32")
    first = pipe.generate("What is this?", [photos["chelsea"]], GREEDY)
    pipe.clear_caches()
    again = pipe.generate("What is this?", [photos["chelsea"]], GREEDY)
    assert first.token_ids == again.token_ids and len(first.token_ids) > 1
    assert pipe.model.paged.steps["decode"] > 0
    pipe.close()


def test_the_decode_variant_refuses_what_it_cannot_do(exports):
    with pytest.raises(LlavaOvError, match="paged KV cache"):
        Pipeline(exports["llava-next"], cache_dir=None, kv_cache="stateful", decode_precision="f32")
    with pytest.raises(LlavaOvError, match="unknown decode precision"):
        Pipeline(exports["llava-next"], cache_dir=None, decode_precision="f16")


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_are_counted_before_encoding(family, paged, photos, tmp_path, monkeypatch):
    """The token count from image sizes equals the packed features, for every grid shape, and a prompt
    too long for the context or the pool is refused before the vision encoder runs."""
    pipe = paged[family]
    for pinpoint in DEFAULT_PINPOINTS:
        image = _pinpoint_image(tmp_path, *pinpoint)
        pipe.clear_caches()
        (job,) = pipe.prompts._plan([image], [""], [], [], GenerationConfig(), 0)
        assert pipe.prompts._visual_tokens(job.tiles, 0.0) == len(pipe.prepare_image(image).features), pinpoint
    pipe.clear_caches()
    monkeypatch.setattr(pipe.model, "encode_image_tiles", lambda px: pytest.fail("encoded a refused prompt"))
    many = [Message("user", "Compare them.", [photos["astronaut"]] * 60)]
    with pytest.raises(ContextLengthError, match="for images"):
        pipe.generate(many, config=GREEDY)


def test_a_huge_text_prompt_is_refused_before_tokenizing(paged, monkeypatch):
    pipe = paged["llava"]
    monkeypatch.setattr(pipe.model.tokenizer, "encode", lambda text: pytest.fail("tokenized a refused prompt"))
    huge = "word " * (pipe.prompt_limit * pipe.model.tokenizer.max_piece_bytes)  # 5 chars a word: over 4 x limit
    with pytest.raises(ContextLengthError, match="at least"):
        pipe.generate(huge, config=GREEDY)


def test_a_broken_step_fails_its_sequences_and_the_engine_goes_on(exports, monkeypatch):
    """An error outside the forward (here: in the scheduler) ends the running sequences with that
    error, raised in their clients, and the next request is answered."""
    pipe = Pipeline(exports["llava-next"], properties=F32, cache_dir=None)
    engine = pipe.engine
    schedule = engine.scheduler.schedule

    def broken_once():
        if engine.scheduler.running and engine.steps >= 2:
            monkeypatch.setattr(engine.scheduler, "schedule", schedule)
            raise RuntimeError("scheduler broke")
        return schedule()

    monkeypatch.setattr(engine.scheduler, "schedule", broken_once)
    failed = []
    thread = threading.Thread(target=lambda: failed.append(_error_of(pipe)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and "scheduler broke" in failed[0]
    assert pipe.generate("hi", config=GREEDY).finish_reason in ("eos", "length")
    pipe.close()


def _error_of(pipe) -> str:
    try:
        pipe.generate("Tell me a story.", config=GenerationConfig(max_new_tokens=64, ignore_eos=True))
    except Exception as exc:  # the engine's error, raised in the client
        return str(exc)
    return "no error"
