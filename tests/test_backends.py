"""One generation interface, two backends: the paged engine and the stateful model behind
`submit(prompt, state, cancel) -> Handle`; handles read with `for` and `async for`; image
work outside any global lock (concurrent encodes, one encode per new image)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conftest import F32
from llava_ov.runtime.feature_cache import FeatureCache
from llava_ov.runtime.generate import DecodeState, GenerationConfig, TokenEvent
from llava_ov.runtime.handle import Finished, Handle
from llava_ov.runtime.pipeline import Message, Pipeline

GREEDY = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def paged(exports) -> Pipeline:
    return Pipeline(exports["llava-next"], properties=F32, cache_dir=None, vision_requests=2)


@pytest.fixture(scope="module")
def stateful(exports) -> Pipeline:
    pipe = Pipeline(exports["llava-next"], properties=F32, cache_dir=None, kv_cache="stateful")
    yield pipe
    pipe.close()


def _tokens(handle: Handle) -> list[int]:
    return [item.token_id for item in handle if isinstance(item, TokenEvent) and item.token_id is not None]


def test_both_backends_give_the_same_greedy_tokens_through_one_interface(paged, stateful, photos):
    prompt = paged.prepare([Message("user", "What is in the picture?", [photos["chelsea"]])])
    answers = []
    for pipe in (paged, stateful):
        state = DecodeState(pipe.model.tokenizer.stream(), GREEDY, pipe.eos_ids)
        handle = pipe.backend.submit(prompt, state)
        answers.append(_tokens(handle))
        assert handle.done and handle.started
    assert len(answers[0]) > 3 and answers[0] == answers[1]
    assert paged.engine is not None and stateful.engine is None  # the public attribute front ends read


@pytest.mark.parametrize("backend", ["paged", "stateful"])
def test_async_stream_equals_the_blocking_one(backend, request, photos):
    pipe = request.getfixturevalue(backend)
    messages = [Message("user", "Describe it.", [photos["coffee"]])]
    expected = pipe.generate(messages, config=GREEDY)

    async def collect(n: int) -> list[list[int]]:
        async def one() -> list[int]:
            return [t async for chunk in pipe.astream(messages, config=GREEDY) for t in chunk.token_ids]

        return await asyncio.gather(*(one() for _ in range(n)))

    assert asyncio.run(collect(3)) == [expected.token_ids] * 3


def test_stateful_handle_is_cancelled_while_waiting_without_running(stateful):
    """One sequence at a time: a second one cancelled while the first runs ends without being computed."""
    first = stateful.submit("Hello", config=GenerationConfig(max_new_tokens=64, ignore_eos=True))
    cancel = threading.Event()
    cancel.set()
    second = stateful.submit("Hello again", config=GREEDY, cancel=cancel)
    result = list(second)[-1].result
    assert result.finish_reason == "cancelled" and not second.started and result.token_ids == []
    assert list(first)[-1].result.finish_reason == "length"


def test_handle_wakes_an_event_loop_from_another_thread():
    """Events put by a backend thread reach `async for` without polling, in order, until Finished."""
    handle = Handle(state=None)

    def produce():
        for i in range(50):
            handle.put(TokenEvent(i, str(i)))
            time.sleep(0.001)
        handle.put(Finished())

    async def consume() -> list[int]:
        threading.Thread(target=produce).start()
        return [event.token_id async for event in handle]

    assert asyncio.run(asyncio.wait_for(consume(), 30)) == list(range(50))


def test_concurrent_requests_encode_their_images_at_the_same_time(paged, photos, monkeypatch):
    """Two requests with different images: both encodes are in progress at once (a barrier that
    only opens when both calls are inside the encoder; a global lock would break it)."""
    paged.clear_caches()
    encode = paged.model.encode_image_tiles
    both_inside = threading.Barrier(2, timeout=30)
    spans = []

    def recorded(pixels):
        start = time.perf_counter()
        both_inside.wait()
        out = encode(pixels)
        spans.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(paged.model, "encode_image_tiles", recorded)
    results = {}

    def ask(name):
        results[name] = paged.prepare([Message("user", "What is it?", [photos[name]])])

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("chelsea", "astronaut")]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert set(results) == {"chelsea", "astronaut"} and len(spans) == 2
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # the two encodes overlap


def test_the_same_new_image_requested_twice_at_once_is_encoded_once(paged, photos, monkeypatch):
    paged.clear_caches()
    encode = paged.model.encode_image_tiles
    make = paged.prompts.features.get_or_make
    arrived, calls = threading.Semaphore(0), []

    def counted_make(key, fn):
        arrived.release()
        return make(key, fn)

    def held_encode(pixels):  # the first encode waits until the second request asks for the same image
        calls.append(1)
        assert arrived.acquire(timeout=30) and arrived.acquire(timeout=30)
        time.sleep(0.05)  # the second request is inside get_or_make: waiting on the first one's result
        return encode(pixels)

    monkeypatch.setattr(paged.prompts.features, "get_or_make", counted_make)
    monkeypatch.setattr(paged.model, "encode_image_tiles", held_encode)
    prompts = []

    def ask():
        prompts.append(paged.prepare([Message("user", "What is it?", [photos["rocket"]])]))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(prompts) == 2 and len(calls) == 1
    assert prompts[0].images[0].features is prompts[1].images[0].features


def test_feature_cache_holds_at_most_its_bytes():
    """Videos make large entries: the cache keeps the newest that fit `max_bytes` (and always the newest one)."""
    cache: FeatureCache[bytes] = FeatureCache(16, max_bytes=100, weigh=len)
    for key, size in [("a", 40), ("b", 40), ("c", 40)]:
        cache.get_or_make(key, lambda n=size: b"x" * n)
    assert [k for k in "abc" if cache.get(k)] == ["b", "c"]
    cache.get_or_make("huge", lambda: b"x" * 500)
    assert cache.get("huge") and len(cache) == 1
    cache.clear()
    cache.get_or_make("d", lambda: b"x" * 60)
    assert cache.get("d") and len(cache) == 1


def test_feature_cache_makes_each_key_once_and_forgets_the_oldest():
    cache: FeatureCache[int] = FeatureCache(2)
    started, release, made = threading.Event(), threading.Event(), []

    def slow():
        made.append("a")
        started.set()
        assert release.wait(30)
        return 1

    out = []
    first = threading.Thread(target=lambda: out.append(cache.get_or_make("a", slow)))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: out.append(cache.get_or_make("a", lambda: made.append("again") or 2)))
    second.start()
    release.set()
    first.join(30), second.join(30)
    assert out == [1, 1] and made == ["a"]
    cache.get_or_make("b", lambda: 2)
    cache.get_or_make("c", lambda: 3)
    assert cache.get("a") is None and cache.get("c") == 3 and len(cache) == 2
    with pytest.raises(ValueError):
        cache.get_or_make("d", lambda: (_ for _ in ()).throw(ValueError("bad")))
    assert cache.get_or_make("d", lambda: 4) == 4  # a failed make is not cached


def test_vision_encoder_runs_while_another_request_holds_a_vision_request(paged, photos):
    """The vision pool has more than one infer request: an encode completes while one is taken."""
    assert paged.model.vision_requests == 2
    job = paged.prompts._plan([photos["motorcycle_left"]], [""], [], [], GenerationConfig(), 0)[0]
    taken = paged.model._vision.get()  # another request is encoding with this one
    try:
        done = []
        pixels = paged.model.family.preprocess(job.found, job.resolution).pixel_values
        worker = threading.Thread(target=lambda: done.append(paged.model.encode_image_tiles(pixels)))
        worker.start()
        worker.join(60)
        assert done and done[0].shape[0] == len(pixels)
    finally:
        paged.model._vision.put(taken)


def test_prompts_holding_images_at_once_are_bounded(paged, photos, monkeypatch):
    """However many threads prepare image prompts, at most `image_places` hold decoded images at once
    (bounded memory); a text prompt does not wait for a place."""
    paged.clear_caches()
    plan = paged.prompts._plan
    inside, most, lock = [0], [0], threading.Lock()

    def counted(sources, *args, **kwargs):
        if not sources:  # a text prompt plans no image
            return plan(sources, *args, **kwargs)
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.2)
            return plan(sources, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(paged.prompts, "_plan", counted)
    names = ["chelsea", "astronaut", "coffee", "rocket"]
    threads = [threading.Thread(target=paged.count_tokens, args=([Message("user", "Hi", [photos[names[i % 4]]])],))
               for i in range(3 * paged.prompts.image_places)]  # fmt: skip
    [t.start() for t in threads]
    time.sleep(0.1)
    paged.count_tokens([Message("user", "just text")])  # not behind the image prompts
    still_preparing = inside[0]
    [t.join(60) for t in threads]
    assert most[0] == paged.prompts.image_places == 4
    assert still_preparing > 0  # the text prompt was answered while image prompts were still inside


def test_a_task_cancelled_while_its_prompt_is_prepared_leaves_nothing_running(paged, photos, monkeypatch):
    """astream's task cancelled during the image encode: the generation it would have submitted ends at once."""
    paged.clear_caches()
    encode = paged.model.encode_image_tiles

    def slow(pixels):
        time.sleep(0.5)
        return encode(pixels)

    monkeypatch.setattr(paged.model, "encode_image_tiles", slow)
    long = GenerationConfig(max_new_tokens=400, ignore_eos=True)

    async def cancelled_while_preparing() -> None:
        task = asyncio.ensure_future(paged.astream([Message("user", "Hi", [photos["rocket"]])], config=long).__anext__())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    steps = paged.engine.steps
    asyncio.run(cancelled_while_preparing())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and paged.occupancy() != (0, 0):
        time.sleep(0.05)
    assert paged.occupancy() == (0, 0)
    assert paged.engine.steps - steps < 20  # not the 400 decode steps of an orphaned generation


def test_an_unused_stateful_pipeline_is_freed_and_the_positional_device_still_works(exports):
    import gc
    import weakref

    pipe = Pipeline(exports["llava-next"], "CPU", properties=F32, cache_dir=None, kv_cache="stateful")
    assert pipe.settings.device == "CPU"
    model = weakref.ref(pipe.model)
    del pipe
    gc.collect()
    assert model() is None  # no backend thread holds it before the first submission


def test_a_handle_has_one_async_reader():
    handle = Handle(None, threading.Event())

    async def two_readers() -> None:
        first = handle.__aiter__()
        waiting = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="one reader"):
            await handle.__aiter__().__anext__()
        waiting.cancel()

    asyncio.run(two_readers())


def test_one_image_is_encoded_at_a_time_on_cpu_by_default(exports):
    """The vision pool takes the plugin's optimal number of requests: 1 on CPU, where one encode uses
    every core (two at once were no faster for concurrent image requests on 2 cores)."""
    pipe = Pipeline(exports["llava-next"], properties=F32, cache_dir=None, kv_cache="stateful")
    assert pipe.model.vision_requests == 1 and pipe.prompts.image_places == 2
    assert Pipeline(exports["llava-next"], cache_dir=None, kv_cache="stateful", vision_requests=3).model.vision_requests == 3
