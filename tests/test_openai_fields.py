"""OpenAI fields done, not ignored: presence/frequency penalty, min_p and logit_bias — the rules against their
references (OpenAI's documented formula, transformers' warpers), through the Pipeline, the CLI and the server
(openai client) — and `usage.prompt_tokens_details.cached_tokens`."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
import torch
import transformers

from conftest import F32
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import GenerationConfig, Sampler, apply_openai_penalties
from llava_ov.runtime.pipeline import Pipeline
from test_server import openai_client

PROMPT = "Tell me a story."


@pytest.fixture(scope="module")
def pipe(exports) -> Pipeline:
    return Pipeline(exports["llava"], properties=F32, cache_dir=None)


def test_presence_and_frequency_penalties_follow_openais_formula():
    """mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty (OpenAI's parameter documentation)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    answer = [3, 3, 7, 3, 49, 7]
    out = apply_openai_penalties(logits, answer, presence=0.5, frequency=0.25)
    expected = logits.copy()
    for j in range(50):
        count = answer.count(j)
        expected[j] -= count * 0.25 + (count > 0) * 0.5
    assert np.allclose(out, expected)


@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.05), (0, 0.9, 0.1), (20, 1.0, 0.02), (10, 0.8, 0.3)])
def test_sampling_filters_keep_what_transformers_keeps(top_k, top_p, min_p):
    rng = np.random.default_rng(1)
    scores = (rng.standard_normal(300) * 3).astype(np.float64)
    order, probs = Sampler(GenerationConfig(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)).distribution(scores)
    warpers = transformers.LogitsProcessorList([
        *([transformers.TopKLogitsWarper(top_k)] if top_k else []),
        transformers.TopPLogitsWarper(top_p), transformers.MinPLogitsWarper(min_p),
    ])  # fmt: skip
    kept = warpers(None, torch.from_numpy(scores)[None])[0]
    reference = set(np.flatnonzero(np.isfinite(kept.numpy())).tolist())
    assert set(order.tolist()) == reference
    assert np.allclose(probs, torch.softmax(kept, -1).numpy()[order])


def test_logit_bias_bans_and_forces_tokens(pipe):
    plain = pipe.generate(PROMPT, config=GenerationConfig(max_new_tokens=6, logprobs=2))
    first, runner_up = plain.token_ids[0], plain.logprobs[0].top[1][0]
    banned = pipe.generate(PROMPT, config=GenerationConfig(max_new_tokens=6, logit_bias={first: -100}))
    assert banned.token_ids[0] == runner_up  # the raw logits' second choice
    forced = pipe.generate(PROMPT, config=GenerationConfig(max_new_tokens=6, logit_bias={500: 100}))
    assert forced.token_ids == [500] * 6


def test_frequency_penalty_equals_the_rule_applied_to_transformers_logits(pipe, exports, checkpoints):
    """Greedy with presence/frequency penalties (negative: repeats, so the answer changes) = transformers' greedy
    with a logits processor doing OpenAI's rule."""
    from reference import hf_inputs

    class OpenAIPenalties(transformers.LogitsProcessor):
        def __init__(self, prompt_length: int):
            self.prompt_length = prompt_length

        def __call__(self, input_ids, scores):
            answer = input_ids[0, self.prompt_length :].tolist()
            penalised = apply_openai_penalties(scores[0].numpy(), answer, presence=-2.0, frequency=-1.5)
            return torch.from_numpy(penalised)[None]

    from llava_ov.runtime.pipeline import Message

    model = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoints["llava"], attn_implementation="sdpa").eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoints["llava"])
    messages = [Message("user", PROMPT)]
    inputs = hf_inputs(processor, messages)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, logits_processor=[OpenAIPenalties(length)])
    ref = out[0, length:].tolist()
    ref = ref[: ref.index(2)] if 2 in ref else ref
    ours = pipe.generate(messages, config=GenerationConfig(max_new_tokens=16, presence_penalty=-2.0, frequency_penalty=-1.5))
    plain = pipe.generate(messages, config=GenerationConfig(max_new_tokens=16))
    assert ours.token_ids[: len(ref)] == ref and ours.token_ids != plain.token_ids


def test_bad_values_are_refused(pipe):
    for config, message in [
        (GenerationConfig(presence_penalty=3), "presence_penalty"),
        (GenerationConfig(frequency_penalty=-2.5), "frequency_penalty"),
        (GenerationConfig(min_p=1.5), "min_p"),
        (GenerationConfig(logit_bias={5: 101}), "logit_bias values"),
        (GenerationConfig(logit_bias={10**9: 1}), "not in the vocabulary"),
    ]:
        with pytest.raises(LlavaOvError, match=message):
            pipe.generate(PROMPT, config=config)


def test_cli_flags(exports, pipe, capsys):
    from llava_ov.cli import main

    expected = pipe.generate(PROMPT, config=GenerationConfig(max_new_tokens=6, frequency_penalty=1.0, logit_bias={500: 5}))
    argv = ["run", str(exports["llava"]), "--prompt", PROMPT, "--max-new-tokens", "6", "--frequency-penalty", "1",
            "--logit-bias", "500=5", "--json", "--f32"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == expected.token_ids
    assert main(["run", str(exports["llava"]), "--prompt", PROMPT, "--logit-bias", "x=1", "--f32"]) == 2
    assert "TOKEN_ID=BIAS" in capsys.readouterr().err


@pytest.fixture(scope="module")
def client(exports, pipe):
    with openai_client(exports["llava"], pipe) as client:
        yield client


@pytest.mark.parametrize("stream", [False, True])
def test_server_fields_equal_the_pipeline(client, pipe, stream):
    config = GenerationConfig(max_new_tokens=8, temperature=0.8, seed=3, presence_penalty=0.5, frequency_penalty=1.0,
                              min_p=0.1, logit_bias={500: 3.0, 2: -100})  # fmt: skip
    expected = pipe.generate(PROMPT, config=config)
    kwargs = dict(model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0.8, seed=3,
                  presence_penalty=0.5, frequency_penalty=1.0, logit_bias={"500": 3.0, "2": -100},
                  extra_body={"min_p": 0.1})  # fmt: skip
    if stream:
        chunks = client.chat.completions.create(stream=True, **kwargs)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    assert text == expected.text


@pytest.mark.parametrize("bias, message", [({"x": 1}, "token ids"), ({"999999999": 1}, "vocabulary"), ({"5": 200}, "logit_bias")])
def test_server_refuses_a_bad_logit_bias(client, bias, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], logit_bias=bias)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_reports_the_prompt_tokens_the_prefix_cache_held(client, pipe, stream):
    pipe.clear_caches()
    text = f"A question asked twice, streamed={stream}. " * 12  # several KV blocks of the same prompt
    kwargs = dict(model="m", messages=[{"role": "user", "content": text}], max_tokens=2)
    if stream:
        kwargs.update(stream=True, stream_options={"include_usage": True})

    def usage():
        if not stream:
            return client.chat.completions.create(**kwargs).usage
        return [c for c in client.chat.completions.create(**kwargs) if c.usage is not None][-1].usage

    first, second = usage(), usage()
    assert first.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.prompt_tokens_details.cached_tokens < second.prompt_tokens == first.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_n_answers_share_one_prefill(client, pipe, stream):
    """n = 4: four choices, sampled with seed + i (each equal to the pipeline's single answer with that seed),
    the prompt prefilled once (counted in the engine: the others only recompute their last partial block)."""
    pipe.clear_caches()
    text = f"Four answers, streamed={stream}. " * 10
    singles = [pipe.generate(text, config=GenerationConfig(max_new_tokens=6, temperature=1.0, seed=20 + i))
               for i in range(4)]  # fmt: skip
    expected = [r.text for r in singles]
    pipe.clear_caches()
    before = pipe.engine.stats()["prefilled_tokens"]
    kwargs = dict(model="m", messages=[{"role": "user", "content": text}], max_tokens=6, temperature=1.0, seed=20, n=4)
    if stream:
        texts = ["", "", "", ""]
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
        assert sorted(finished) == [0, 1, 2, 3]
        usage = chunks[-1].usage
    else:
        response = client.chat.completions.create(**kwargs)
        texts = [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]
        usage = response.usage
    assert texts == expected and len(set(texts)) > 1
    prompt = usage.prompt_tokens
    prefilled = pipe.engine.stats()["prefilled_tokens"] - before
    block = pipe.engine.stats()["block_size"]
    assert prompt <= prefilled < prompt + 3 * block  # one prefill, three tails of under a block
    assert usage.completion_tokens == sum(len(r.token_ids) for r in singles)


def test_n_out_of_range_is_refused(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=17)


@pytest.mark.parametrize("field, value", [
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"),
])  # fmt: skip
def test_fields_that_cannot_be_honoured_are_a_400_naming_them(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], extra_body={field: value})
    assert caught.value.body["param"] == field


def test_neutral_values_are_accepted(client):
    answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            modalities=["text"], user="u", metadata={"k": "v"}, store=False)  # fmt: skip
    assert answer.choices[0].message.content is not None
