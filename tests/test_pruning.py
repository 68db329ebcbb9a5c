"""CDPruner: the greedy DPP MAP against brute force, the selection's guarantees, and end to end
against transformers' language model fed the same kept tokens at the same positions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import F32, FAMILIES
from llava_ov.errors import ContextLengthError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from llava_ov.runtime.pruning import conditional_kernel, greedy_map, kept_count, relevance, select_tokens, tile_quotas
from reference import hf_inputs

QUESTION = "What is the cat looking at?"


def _logdet(kernel: np.ndarray, items) -> float:
    sign, value = np.linalg.slogdet(kernel[np.ix_(list(items), list(items))])
    return value if sign > 0 else -np.inf


def _naive_greedy(kernel: np.ndarray, k: int) -> list[int]:
    """Greedy MAP the slow way: each step, the item whose addition gives the largest log det."""
    picked: list[int] = []
    for _ in range(k):
        rest = [j for j in range(len(kernel)) if j not in picked]
        picked.append(max(rest, key=lambda j: _logdet(kernel, picked + [j])))
    return picked


def _random_kernel(rng, n, rank):
    b = rng.normal(size=(n, rank))
    return b @ b.T


@pytest.mark.parametrize("seed", range(5))
def test_fast_greedy_map_picks_what_naive_greedy_picks_step_by_step(seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(14, 20))
    rel = relevance(features, rng.normal(size=(3, 20)))
    kernel = conditional_kernel(features, rel)
    assert greedy_map(kernel, 7) == _naive_greedy(kernel, 7)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_map_is_within_the_greedy_bound_of_the_brute_force_optimum(seed):
    """For L = I + B B^T, log det(L_Y) is monotone submodular with f(empty) = 0, so greedy
    reaches at least (1 - 1/e) of the best k-subset's value (Nemhauser et al.)."""
    rng = np.random.default_rng(seed)
    kernel = np.eye(12) + _random_kernel(rng, 12, 6)
    k = 5
    best = max(_logdet(kernel, s) for s in itertools.combinations(range(12), k))
    ours = _logdet(kernel, greedy_map(kernel, k))
    assert ours >= (1 - 1 / math.e) * best - 1e-9
    assert ours <= best + 1e-9


def test_greedy_map_fills_past_the_kernel_rank_by_relevance():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 3))  # rank 3: only three tokens add volume
    rel = np.linspace(0.1, 1.0, 20)
    picked = greedy_map(conditional_kernel(features, rel), 10, fallback=rel)
    assert len(picked) == len(set(picked)) == 10
    rest = [j for j in range(20) if j not in picked[:3]]
    assert picked[3:] == sorted(rest, key=lambda j: -rel[j])[:7]


def test_the_first_pick_is_the_most_relevant_token():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 16))
    instruction = features[7:8] * 3.0
    rel = relevance(features, instruction)
    assert int(np.argmax(rel)) == 7
    assert greedy_map(conditional_kernel(features, rel), 1) == [7]


def test_tile_quotas_are_exact_and_proportional():
    assert tile_quotas([576, 288, 288], 288) == [144, 72, 72]
    assert sum(tile_quotas([576, 300, 301, 17], 333)) == 333
    assert tile_quotas([1, 1, 1], 2) == [1, 1, 0]


def _layout():
    """A packed LLaVA-NeXT layout: base tile of 16, then 2 rows x (6 grid tokens + newline)."""
    rows = [[1, 1, 1, 2, 2, 2, -1], [1, 1, 1, 2, 2, 2, -1]]
    return np.array([0] * 16 + sum(rows, []))


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9, 0.99])
def test_selection_keeps_exactly_the_ratio_the_newlines_and_is_deterministic(ratio):
    rng = np.random.default_rng(2)
    tiles = _layout()
    features = rng.normal(size=(len(tiles), 24)).astype(np.float32)
    instruction = rng.normal(size=(5, 24)).astype(np.float32)
    kept = select_tokens(features, tiles, instruction, ratio)
    visual = int((tiles >= 0).sum())
    assert len(kept) == kept_count(visual, ratio) + 2
    assert set(np.flatnonzero(tiles < 0)) <= set(kept.tolist())
    assert np.all(np.diff(kept) > 0) and kept[-1] < len(tiles)
    np.testing.assert_array_equal(kept, select_tokens(features, tiles, instruction, ratio))


def test_selection_depends_on_the_instruction():
    rng = np.random.default_rng(3)
    tiles = np.zeros(64, np.int64)
    features = rng.normal(size=(64, 32))
    picks = {tuple(select_tokens(features, tiles, features[i : i + 1], 0.9)) for i in range(0, 64, 8)}
    assert len(picks) > 1


def test_no_instruction_is_the_plain_dpp():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(40, 32))
    tiles = np.zeros(40, np.int64)
    kept = select_tokens(features, tiles, np.zeros((0, 32)), 0.5)
    np.testing.assert_array_equal(kept, np.sort(greedy_map(conditional_kernel(features, np.ones(40)), 20)))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pipes(exports):
    return {fam: Pipeline(exports[fam], properties=F32, cache_dir=None) for fam in FAMILIES}


def _hf_merged_embeddings(model, processor, messages) -> torch.Tensor:
    """The [T, hidden] embeddings transformers feeds its language model for `messages` (unpruned)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"][0].clone()
        raise StopIteration

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(StopIteration):
            model(**hf_inputs(processor, messages))
    finally:
        hook.remove()
    return seen["embeds"]


def _hf_greedy_from_embeddings(model, embeds, positions, max_new_tokens) -> list[int]:
    """Greedy decoding of transformers' language model from given embeddings and position ids."""
    from transformers import DynamicCache

    cache, tokens = DynamicCache(), []
    x, pos = embeds[None], torch.tensor(positions)[None]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    nxt = int(pos[0, -1]) + 1
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model.model.language_model(inputs_embeds=x, position_ids=pos, cache=cache, use_cache=True)
            token = int(model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
            if token in eos:
                break
            tokens.append(token)
            x = model.get_input_embeddings()(torch.tensor([[token]]))
            pos, nxt = torch.tensor([[nxt]]), nxt + 1
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_pruned_generation_equals_transformers_fed_the_same_tokens_at_the_same_positions(
    family, ratio, pipes, hf_models, photos
):
    pipe = pipes[family]
    model, processor = hf_models[family]
    messages = [Message("user", QUESTION, [photos["chelsea"]])]
    config = GenerationConfig(max_new_tokens=24, visual_token_pruning=ratio)
    full = pipe.prepare(messages)
    prompt = pipe.prepare(messages, config)
    (job,) = pipe.prompts._plan([photos["chelsea"]], [QUESTION], [], [], GenerationConfig(), 0)
    newlines = int((job.tiles < 0).sum())
    assert prompt.image_tokens == newlines + kept_count(len(job.tiles) - newlines, ratio)
    assert prompt.image_tokens_total == full.image_tokens
    assert pipe.count_tokens(messages, config) == len(prompt.token_ids)
    # kept tokens hold their original positions; the text after the image keeps its own
    assert prompt.positions is not None and np.all(np.diff(prompt.positions) > 0)
    assert prompt.position_end == len(full.token_ids)
    text = prompt.keys >= 0
    np.testing.assert_array_equal(prompt.keys[text], full.keys[prompt.positions[text]])

    embeds = _hf_merged_embeddings(model, processor, messages)
    image_at = np.flatnonzero(full.keys < 0)
    hf_kept = select_tokens(
        embeds[image_at].double().numpy(), job.tiles,
        model.get_input_embeddings()(torch.tensor(pipe.prompts._instruction_ids(QUESTION))).detach().double().numpy(), ratio,
    )  # fmt: skip
    np.testing.assert_array_equal(image_at[hf_kept], prompt.positions[prompt.keys < 0])
    ref = _hf_greedy_from_embeddings(model, embeds[prompt.positions], prompt.positions.tolist(), 24)
    result = pipe.generate(messages, config=config)
    assert len(set(ref)) > 3, "reference collapsed into repeats"
    assert result.token_ids == ref
    assert result.image_tokens == prompt.image_tokens and result.image_tokens_total == full.image_tokens


def test_pruning_is_refused_on_the_stateful_cache(exports, photos):
    pipe = Pipeline(exports["llava"], properties=F32, cache_dir=None, kv_cache="stateful")
    with pytest.raises(Exception, match="paged KV cache"):
        pipe.generate([Message("user", QUESTION, [photos["chelsea"]])],
                      config=GenerationConfig(max_new_tokens=4, visual_token_pruning=0.5))  # fmt: skip


def test_a_follow_up_turn_reuses_the_pruned_image_from_the_cache(pipes, photos):
    from llava_ov.runtime.chat import ChatSession

    pipe = pipes["llava-next"]
    pipe.clear_caches()
    config = GenerationConfig(max_new_tokens=12, visual_token_pruning=0.75)
    session = ChatSession(pipe)
    first = session.ask(QUESTION, [photos["chelsea"]], config)
    second = session.ask("And the colours?", config=config)
    assert second.image_tokens == first.image_tokens < first.image_tokens_total
    assert second.cached_tokens >= first.prompt_tokens - pipe.engine.pool.block_size


def test_a_pruned_prompt_must_also_fit_the_context_in_positions(pipes, photos):
    """Pruned image tokens keep their position ids, so a prompt whose kept tokens fit the context
    can still span more positions than the model has: refused before encoding, not answered with
    zero room (it used to end after one token with finish_reason "length")."""
    pipe = pipes["llava-next"]
    pruned = GenerationConfig(max_new_tokens=4, visual_token_pruning=0.75)

    def prompt(words: int) -> list[Message]:
        return [Message("user", QUESTION + " word" * words, [photos["chelsea"]])]

    per_word = (pipe.count_tokens(prompt(200)) - pipe.count_tokens(prompt(0))) / 200
    gap = pipe.count_tokens(prompt(0)) - pipe.count_tokens(prompt(0), pruned)  # positions pruning leaves empty
    assert gap > 500
    words = int((pipe.model.max_context - gap // 2 - pipe.count_tokens(prompt(0), pruned)) / per_word)
    assert pipe.count_tokens(prompt(words), pruned) < pipe.model.max_context < pipe.count_tokens(prompt(words))
    with pytest.raises(ContextLengthError, match="positions"):
        pipe.generate(prompt(words), config=pruned)
    assert pipe.generate(prompt(0), config=pruned).finish_reason == "length"  # 4 new tokens: the pipeline goes on
