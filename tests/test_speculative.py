"""Several tokens per forward (runtime/speculative.py and the engine's verification): exactness first.

The engine verifies proposed tokens by sampling every proposed position from the model's logits and
keeping the proposals while they equal the sample. Whatever is proposed, answers must be those of
plain decoding: greedy token for token, seeded sampling too (each position draws from the same
generator in the same order, so equality of seeded answers checks that the sampled distribution is
the model's). An oracle proposer (the plain answer, optionally corrupted) drives acceptance to any
rate; the real proposers (grammar jump-forward, prompt lookup) are checked the same way.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import F32, FAMILIES
from llava_ov.runtime.generate import DecodeState, GenerationConfig
from llava_ov.runtime.pipeline import Pipeline
from llava_ov.runtime.speculative import MAX_BACKOFF, PromptLookup, lookup
from test_engine import PROMPTS, generate_together, small_pool

GREEDY = GenerationConfig(max_new_tokens=40)
SEEDED = GenerationConfig(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def pipes(exports):
    out = {fam: Pipeline(exports[fam], properties=F32, cache_dir=None) for fam in FAMILIES}
    yield out
    for pipe in out.values():
        pipe.close()


def plain(pipe: Pipeline, prompt: str, config: GenerationConfig, images=()):
    pipe.clear_caches()
    return pipe.generate(prompt, list(images), config)


class Oracle:
    """Proposes the plain answers' next tokens: `wrong` says which proposal indexes are corrupted."""

    def __init__(self, answers: list[list[int]], tokens: int = 4, wrong=lambda step, i: False):
        self.answers, self.tokens, self.wrong = answers, tokens, wrong
        self.steps = 0

    def proposals(self, state: DecodeState, context: np.ndarray, room: int) -> list[int]:
        done = state.answer
        answer = next((a for a in self.answers if a[: len(done)] == done), None)
        if answer is None or state.finished:
            return []
        self.steps += 1
        ahead = answer[len(done) : len(done) + min(self.tokens, room, state.limit - state.produced - 1)]
        return [(t + 1) % 1000 if self.wrong(self.steps, i) else t for i, t in enumerate(ahead)]


@pytest.fixture
def oracle(monkeypatch):
    def install(answers, **kw):
        proposer = Oracle(answers, **kw)
        monkeypatch.setattr(DecodeState, "proposals", lambda self, context, room: proposer.proposals(self, context, room))
        return proposer

    return install


# ----------------------------------------------------------------------------- the proposers alone


def test_lookup_proposes_what_followed_the_latest_longest_match():
    context = np.array([5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7])  # "6 7" occurs at 1 and 6; the latest wins
    assert lookup(context, 3).tolist() == [2, 3, 6]
    assert lookup(np.array([1, 2, 3, 9, 2, 3, 4, 1, 2, 3]), 2).tolist() == [9, 2]  # "1 2 3" beats "2 3"
    assert lookup(np.array([1, 2, 3, 4]), 3).tolist() == []  # no earlier occurrence
    assert lookup(np.array([4, -7, 4, -7]), 3).tolist() == []  # image positions never match
    assert lookup(np.array([1, 2, 1, 2]), 5).tolist() == [1, 2]  # what follows, up to the end
    assert lookup(np.array([1, 2, 7, -5, 3, 1, 2]), 3).tolist() == [7]  # a proposal stops before an image


def test_a_failing_lookup_rests_longer_each_time_and_wakes_on_success():
    proposer = PromptLookup(4)
    context = np.array([1, 2, 3, 1, 2])
    rests = []
    for _ in range(7):
        assert proposer.propose(context, 4) == [3, 1, 2]
        proposer.verified(3, 0)
        rests.append(proposer.backoff.rest)
        for _ in range(proposer.backoff.rest):
            assert proposer.propose(context, 4) == []
    assert rests == [1, 2, 4, 8, 16, 32, MAX_BACKOFF]
    proposer.verified(3, 2)
    assert proposer.backoff.length == 1


# ----------------------------------------------------------------------------- the engine's verification


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", ["all-kept", "one-wrong", "all-wrong"])
def test_verified_proposals_give_the_plain_answer(pipes, photos, oracle, family, case):
    pipe = pipes[family]
    expected = plain(pipe, "Describe the picture in detail.", GREEDY, [photos["chelsea"]])
    wrong = {"all-kept": lambda s, i: False, "one-wrong": lambda s, i: i == 2, "all-wrong": lambda s, i: True}[case]
    proposer = oracle([expected.token_ids], tokens=5, wrong=wrong)
    got = plain(pipe, "Describe the picture in detail.", GREEDY, [photos["chelsea"]])
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.finish_reason == expected.finish_reason and proposer.steps > 0
    kept = {"all-kept": got.proposed_tokens, "one-wrong": 2 * proposer.steps, "all-wrong": 0}[case]
    assert got.proposed_tokens > 0 and (got.accepted_tokens == kept if case != "one-wrong" else got.accepted_tokens <= kept)
    if case == "all-kept":  # every forward after the first verified 5 tokens and sampled a sixth
        assert pipe.engine.stats()["accepted_tokens"] >= got.accepted_tokens
    assert pipe.engine.pool.used == 0  # every block came back, the dropped proposals' included


def test_seeded_samples_are_the_plain_ones_whatever_is_kept(pipes, oracle):
    pipe = pipes["llava-next"]
    for seed in range(4):
        config = GenerationConfig(**{**SEEDED.__dict__, "seed": seed})
        expected = plain(pipe, PROMPTS[2], config)
        oracle([expected.token_ids], tokens=4, wrong=lambda s, i, seed=seed: (s + i + seed) % 3 == 0)
        got = plain(pipe, PROMPTS[2], config)
        assert got.token_ids == expected.token_ids and got.accepted_tokens > 0


def test_four_sequences_with_proposals_beside_each_other_and_across_preemption(exports, pipes, oracle):
    """Four prompts at once, some proposals kept and some not, on a pool too small for all: the answers
    are the plain ones alone, with preemptions on the way."""
    config = GenerationConfig(max_new_tokens=60, ignore_eos=True)
    alone = [plain(pipes["llava"], p, config).token_ids for p in PROMPTS]
    oracle(alone, tokens=3, wrong=lambda s, i: s % 4 == 0 and i == 1)
    assert_together_as_alone(exports["llava"], 6, config, alone)


def assert_together_as_alone(export, blocks: int, config: GenerationConfig, alone: list[list[int]], **load) -> Pipeline:
    """PROMPTS at once on a pool of `blocks` blocks: their answers are `alone`, with preemptions, kept
    proposals, and every block back in the pool (`load`: more load settings). Returns the closed pipeline."""
    pipe = small_pool(export, blocks=blocks, **load)
    out = generate_together(pipe, PROMPTS, config)
    assert [r.token_ids for r in out] == alone
    stats = pipe.engine.stats()
    assert stats["preemptions"] >= 1 and stats["accepted_tokens"] > 0 and stats["blocks_used"] == 0
    pipe.close()
    return pipe


def test_stop_strings_logprobs_and_cancel_with_proposals(pipes, oracle):
    pipe = pipes["llava-next"]
    config = GenerationConfig(max_new_tokens=40, logprobs=2)
    expected = plain(pipe, PROMPTS[3], config)
    stop = expected.text[len(expected.text) // 2 : len(expected.text) // 2 + 3]
    stopped = plain(pipe, PROMPTS[3], GenerationConfig(max_new_tokens=40, stop=[stop]))
    oracle([expected.token_ids], tokens=6)
    got = plain(pipe, PROMPTS[3], config)
    assert got.token_ids == expected.token_ids
    assert [(e.token_id, e.top[0][0]) for e in got.logprobs] == [(e.token_id, e.top[0][0]) for e in expected.logprobs]
    np.testing.assert_allclose([e.logprob for e in got.logprobs], [e.logprob for e in expected.logprobs], atol=1e-4)
    got_stop = plain(pipe, PROMPTS[3], GenerationConfig(max_new_tokens=40, stop=[stop]))
    assert (got_stop.text, got_stop.finish_reason) == (stopped.text, "stop")
    cancel = threading.Event()
    stream = pipe.stream(PROMPTS[3], [], GenerationConfig(max_new_tokens=40, ignore_eos=True), cancel)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled" and pipe.engine.pool.used == 0


# ----------------------------------------------------------------------------- grammar jump-forward

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "colour": {"enum": ["crimson red", "forest green"]},
                   "count": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["name", "colour", "count", "tags"],
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_jump_forward_answers_are_the_plain_ones(pipes, family, sampling):
    pipe = pipes[family]
    base = GenerationConfig(max_new_tokens=120, json_schema=SCHEMA, **({} if sampling == "greedy" else
                                                                       {"temperature": 0.8, "seed": 11}))  # fmt: skip
    off = plain(pipe, "Fill the form.", GenerationConfig(**{**base.__dict__, "jump_forward": False}))
    on = plain(pipe, "Fill the form.", base)
    assert on.token_ids == off.token_ids and on.text == off.text and on.finish_reason == off.finish_reason
    assert off.proposed_tokens == 0 and on.proposed_tokens >= 8  # keys, quotes, punctuation, the enum's tail
    assert on.accepted_tokens == on.proposed_tokens  # a forced token is the only one the mask allows


# ----------------------------------------------------------------------------- prompt lookup


def test_prompt_lookup_on_an_answer_that_copies_the_prompt(pipes):
    """Random weights never copy, so a regex makes the answer copy a sentence of the prompt (with jump-forward
    off, each token is the model's choice among the regex's continuations): lookup proposes the prompt's
    tokens, some are kept, and the answer is the plain one."""
    pipe = pipes["llava-next"]
    sentence = "the quick brown fox jumps over the lazy dog and the quick brown cat"
    prompt = f"Copy this sentence: {sentence}. Copy it exactly."
    config = GenerationConfig(max_new_tokens=60, regex=sentence.replace(" ", r"\s"), jump_forward=False,
                              logit_bias={int(t): 30.0 for t in set(pipe.model.tokenizer.encode(sentence).tolist())})  # fmt: skip
    off = plain(pipe, prompt, config)
    on = plain(pipe, prompt, GenerationConfig(**{**config.__dict__, "prompt_lookup": 6}))
    assert on.token_ids == off.token_ids and on.text == off.text
    assert on.accepted_tokens > 0, (on.proposed_tokens, on.accepted_tokens)


# ----------------------------------------------------------------------------- front ends


def test_the_server_reports_kept_proposals_in_usage_and_metrics(exports, pipes):
    from llava_ov.frontends.server.app import create_app
    from llava_ov.frontends.server.settings import ServerSettings
    from test_server import HTTP, assert_error, metric, running, wait_ready

    schema = {"name": "form", "schema": SCHEMA}
    body = {"messages": [{"role": "user", "content": "Fill the form."}], "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": schema}}  # fmt: skip
    expected = plain(pipes["llava-next"], "Fill the form.", GenerationConfig(max_new_tokens=120, json_schema=SCHEMA))
    settings = ServerSettings(model=str(exports["llava-next"]), prompt_lookup=2)
    with running(create_app(settings, lambda: pipes["llava-next"])) as base:
        wait_ready(base)
        answer = HTTP.post(f"{base}/v1/chat/completions", json=body).json()
        details = answer["usage"]["completion_tokens_details"]
        assert answer["choices"][0]["message"]["content"] == expected.text
        assert details["accepted_prediction_tokens"] >= 8 and details["rejected_prediction_tokens"] >= 0
        off = HTTP.post(f"{base}/v1/chat/completions", json={**body, "jump_forward": False, "prompt_lookup": 0}).json()
        assert off["choices"][0]["message"]["content"] == expected.text
        assert off["usage"]["completion_tokens_details"] == {"accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
        assert metric(base, "llava_ov_accepted_tokens_total") == details["accepted_prediction_tokens"]
        assert metric(base, "llava_ov_proposed_tokens_total") >= metric(base, "llava_ov_accepted_tokens_total")
        assert_error(HTTP.post(f"{base}/v1/chat/completions", json={**body, "prompt_lookup": 17}), 400)


def test_the_cli_takes_prompt_lookup_and_no_jump_forward(exports, tmp_path, capsys):
    import json

    from llava_ov.cli import main

    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    answers = []
    for flags in ([], ["--no-jump-forward", "--prompt-lookup", "4"]):
        argv = ["run", str(exports["llava"]), "--prompt", "Fill the form.", "--json-schema", str(path),
                "--max-new-tokens", "120", "--f32", "--json", *flags]  # fmt: skip
        assert main(argv) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["text"] == answers[1]["text"]
    assert answers[0]["accepted_tokens"] > 0 and answers[1]["accepted_tokens"] < answers[0]["accepted_tokens"]
    assert main(["run", str(exports["llava"]), "--prompt", "hi", "--prompt-lookup", "99"]) == 2


def test_the_incremental_lookup_equals_the_reference_as_the_context_grows():
    rng = np.random.default_rng(0)
    for trial in range(30):
        context = rng.integers(-2, 6, size=200)  # a small alphabet repeats often; negatives stand for images
        proposer = PromptLookup(5)
        for end in range(1, len(context) + 1, int(rng.integers(1, 4))):
            expected = lookup(context[:end], 5).tolist()
            assert proposer.propose(context[:end], 5) == expected, (trial, end)
            assert all(t >= 0 for t in expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_jump_forward_and_lookup_with_four_sequences_across_preemption(exports, pipes, family):
    """The real proposers, four schema-constrained answers at once (jump-forward on, lookup on) on a pool too
    small for all of them: each equals its plain answer decoded alone."""
    config = GenerationConfig(max_new_tokens=60, json_schema=SCHEMA, prompt_lookup=4)
    plain_config = GenerationConfig(**{**config.__dict__, "jump_forward": False, "prompt_lookup": 0})
    alone = [plain(pipes[family], p, plain_config).token_ids for p in PROMPTS]
    assert_together_as_alone(exports[family], 8, config, alone)


def test_a_failing_proposer_costs_only_its_proposals(pipes, monkeypatch):
    """Proposals are optional: a proposer that raises leaves the answer, and every other sequence, as they were."""
    pipe = pipes["llava"]
    expected = plain(pipe, PROMPTS[1], GREEDY)

    def broken(self, context, room):
        raise RuntimeError("proposer broke")

    monkeypatch.setattr(DecodeState, "proposals", broken)
    got = plain(pipe, PROMPTS[1], GREEDY)
    assert got.token_ids == expected.token_ids and got.proposed_tokens == 0
