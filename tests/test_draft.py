"""A draft model proposing tokens (runtime/draft.py): answers exactly those of plain decoding.

Three drafts of the tiny test models: the export itself (every proposal should be kept), a copy whose
second decoder layer writes 0.7x its output (some proposals kept, some not) and a truncated copy (the
first of its two decoder layers: with these large random weights, almost nothing is kept). The draft
prepares the prompt with its own vision pass, so image prompts run through both models' encoders.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import F32, FAMILIES, _build_once
from llava_ov.errors import LlavaOvError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from test_engine import PROMPTS
from test_speculative import assert_together_as_alone, pipes, plain  # noqa: F401 (pipes: a fixture)

GREEDY = GenerationConfig(max_new_tokens=40)


@pytest.fixture(scope="module")
def truncated(model_root, checkpoints) -> dict[str, str]:
    """family -> fp32 export of its checkpoint cut to the first decoder layer."""
    from llava_ov.exporting.convert import ConvertOptions, convert
    from llava_ov.exporting.random_models import truncated_copy

    def build(fam):
        def make(path):
            checkpoint = truncated_copy(checkpoints[fam], path.with_name(path.name + "-hf"), text_layers=1)
            convert(str(checkpoint), path, ConvertOptions(weight_format="fp32", overwrite=True, show_progress=False))
        return make

    return {fam: str(_build_once(model_root / f"ov-{fam}-draft-1layer", build(fam))) for fam in FAMILIES}


@pytest.fixture(scope="module")
def perturbed(model_root, checkpoints) -> dict[str, str]:
    """family -> fp32 export of its checkpoint with layer 1's attention and MLP outputs scaled by 0.7."""
    from safetensors.numpy import load_file, save_file

    from llava_ov.exporting.convert import ConvertOptions, convert
    from llava_ov.exporting.random_models import truncated_copy

    def build(fam):
        def make(path):
            checkpoint = truncated_copy(checkpoints[fam], path.with_name(path.name + "-hf"), text_layers=2)
            weights = load_file(checkpoint / "model.safetensors")
            for name in weights:
                if "language_model" in name and "layers.1." in name and name.endswith(("o_proj.weight", "down_proj.weight")):
                    weights[name] = weights[name] * np.float32(0.7)
            save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
            convert(str(checkpoint), path, ConvertOptions(weight_format="fp32", overwrite=True, show_progress=False))
        return make

    return {fam: str(_build_once(model_root / f"ov-{fam}-draft-perturbed", build(fam))) for fam in FAMILIES}


def drafted(export, draft, tokens: int = 4, **load) -> Pipeline:
    return Pipeline(export, properties=F32, cache_dir=None, draft=str(draft), draft_tokens=tokens, **load)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_as_its_own_draft_keeps_every_proposal(exports, pipes, photos, family):
    """Its own copy proposes what it would sample: the image answer is the plain one and (f32, same weights)
    every proposal is kept; the draft's KV blocks all come back."""
    expected = plain(pipes[family], "Describe the picture in detail.", GREEDY, [photos["chelsea"]])
    pipe = drafted(exports[family], exports[family])
    got = pipe.generate("Describe the picture in detail.", [photos["chelsea"]], GREEDY)
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.proposed_tokens >= 16 and got.accepted_tokens >= got.proposed_tokens - 1
    assert pipe.draft.pool.available == pipe.draft.pool.num_blocks and pipe.engine.pool.used == 0
    assert pipe.info()["draft"]["tokens_per_step"] == 4
    pipe.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_draft_that_agrees_sometimes_gives_the_plain_answers(exports, pipes, perturbed, photos, family):
    """Proposals are kept and dropped; answers (greedy, text and image prompts) are the plain ones."""
    pipe = drafted(exports[family], perturbed[family], tokens=3)
    proposed = accepted = 0
    for prompt, images in [(PROMPTS[2], []), ("Describe the picture in detail.", [photos["coffee"]])]:
        expected = plain(pipes[family], prompt, GREEDY, images)
        got = pipe.generate(prompt, images, GREEDY)
        assert got.token_ids == expected.token_ids and got.text == expected.text
        proposed, accepted = proposed + got.proposed_tokens, accepted + got.accepted_tokens
    assert 0 < accepted < proposed, (accepted, proposed)
    pipe.close()


def test_seeded_samples_with_a_draft_are_the_plain_ones(exports, pipes, perturbed):
    pipe = drafted(exports["llava-next"], perturbed["llava-next"])
    accepted = 0
    for seed in range(3):
        config = GenerationConfig(max_new_tokens=40, temperature=0.9, top_p=0.95, seed=seed)
        expected = plain(pipes["llava-next"], PROMPTS[2], config)
        got = pipe.generate(PROMPTS[2], config=config)
        assert got.token_ids == expected.token_ids
        accepted += got.accepted_tokens
    assert accepted > 0
    pipe.close()


def test_a_truncated_draft_rarely_agrees_and_changes_nothing(exports, pipes, truncated, photos):
    """The first decoder layer alone (the cheap draft a truncated copy is): answers are the plain ones."""
    pipe = drafted(exports["llava-next"], truncated["llava-next"], tokens=2)
    expected = plain(pipes["llava-next"], "Describe the picture in detail.", GREEDY, [photos["coffee"]])
    got = pipe.generate("Describe the picture in detail.", [photos["coffee"]], GREEDY)
    assert got.token_ids == expected.token_ids and got.proposed_tokens > 0
    pipe.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_four_sequences_with_a_draft_across_preemption(exports, pipes, perturbed, family):
    """Four prompts at once on a target pool too small for all (preemptions), a draft that agrees sometimes:
    each answer is the plain one alone; the draft's blocks all come back."""
    config = GenerationConfig(max_new_tokens=60, ignore_eos=True)
    alone = [plain(pipes[family], p, config).token_ids for p in PROMPTS]
    pipe = assert_together_as_alone(exports[family], 6, config, alone, draft=perturbed[family], draft_tokens=3,
                                    draft_max_running=4)
    assert pipe.draft.pool.available == pipe.draft.pool.num_blocks


def test_a_request_may_go_without_the_draft_and_catch_up_is_chunked_and_cached(exports, pipes, photos, monkeypatch):
    """`use_draft=False` proposes nothing; with it, the draft prefills its prompt in chunks of CATCH_UP_TOKENS
    while the target prefills its own (chunks of max_step_tokens: 64 here), and proposes once it has all of
    it. The prompt's full blocks stay in the draft's prefix cache for the next request, until `clear_caches`."""
    from llava_ov.runtime import draft as draft_module

    pipe = drafted(exports["llava-next"], exports["llava-next"], max_step_tokens=64)
    off = pipe.generate(PROMPTS[3], config=GenerationConfig(max_new_tokens=20, use_draft=False))
    assert off.proposed_tokens == 0
    monkeypatch.setattr(draft_module, "CATCH_UP_TOKENS", 48)
    forwards: list[int] = []
    original = pipe.draft.lm.forward
    monkeypatch.setattr(pipe.draft.lm, "forward", lambda batch, **kw: forwards.append(len(batch.ids)) or original(batch, **kw))
    config = GenerationConfig(max_new_tokens=30)
    expected = plain(pipes["llava-next"], "Describe the picture in detail.", config, [photos["coffee"]])
    computed = []
    for clear in (False, False, True):
        if clear:
            pipe.clear_caches()
        forwards.clear()
        got = pipe.generate("Describe the picture in detail.", [photos["coffee"]], config)
        assert got.token_ids == expected.token_ids and got.accepted_tokens > 0
        assert max(forwards) <= 48
        computed.append(sum(forwards))
    prompt = got.prompt_tokens
    assert computed[0] >= prompt and computed[2] >= prompt  # the whole prompt, in 48-token chunks
    assert computed[1] < computed[0] - prompt + 2 * pipe.draft.pool.block_size  # all but the last blocks cached
    assert pipe.draft.pool.used == 0
    pipe.close()


def test_a_draft_of_another_family_sees_the_image_through_its_own_vision_pass(exports, pipes, photos):
    """LLaVA-1.5 (the same vocabulary here, 576 image tokens) drafting for LLaVA-NeXT (anyres tiles): the
    draft's prompt is its own, the answer is the target's plain one."""
    pipe = drafted(exports["llava-next"], exports["llava"], tokens=2)
    messages = [Message("user", "Describe the picture in detail.", [photos["rocket"]])]
    target, draft = pipe.prepare(messages), pipe.draft.prepare(messages, GREEDY)
    assert len(draft.ids) < len(target.token_ids) and len(draft.features) == 576
    expected = plain(pipes["llava-next"], "Describe the picture in detail.", GREEDY, [photos["rocket"]])
    got = pipe.generate("Describe the picture in detail.", [photos["rocket"]], GREEDY)
    assert got.token_ids == expected.token_ids and got.proposed_tokens > 0
    pipe.close()


def test_a_draft_with_another_vocabulary_or_without_the_paged_cache_is_refused(exports, matrix_model):
    _, qwen2 = matrix_model("llava-onevision-qwen2-0.5b-ov-hf")
    with pytest.raises(LlavaOvError, match="another vocabulary"):
        drafted(exports["llava-next"], qwen2)
    with pytest.raises(LlavaOvError, match="paged KV cache"):
        drafted(exports["llava"], exports["llava"], kv_cache="stateful")
    with pytest.raises(LlavaOvError, match="--draft-tokens"):
        drafted(exports["llava"], exports["llava"], tokens=17)


def test_draft_settings_have_flags(exports):
    import argparse

    from llava_ov.runtime.settings import MAX_DRAFT_TOKENS, LoadSettings
    from llava_ov.runtime.speculative import MAX_PROPOSED

    assert MAX_DRAFT_TOKENS == MAX_PROPOSED
    parser = argparse.ArgumentParser()
    LoadSettings.add_arguments(parser)
    settings = LoadSettings.from_args(parser.parse_args(["--draft", "d", "--draft-tokens", "6"]))
    assert (settings.draft, settings.draft_tokens) == ("d", 6)
    assert settings.to_argv() == ["--draft", "d", "--draft-tokens", "6"]


def test_a_draft_with_pruned_images_and_a_video(exports, pipes, video_export, photos):
    """Pruned image tokens (position ids with gaps, in both models' prompts) and a video (the video
    family's own copy drafting): the answers are the plain ones and proposals are kept."""
    from PIL import Image

    config = GenerationConfig(max_new_tokens=30, visual_token_pruning=0.5)
    expected = plain(pipes["llava-next"], "Describe the picture in detail.", config, [photos["astronaut"]])
    pipe = drafted(exports["llava-next"], exports["llava-next"])
    got = pipe.generate("Describe the picture in detail.", [photos["astronaut"]], config)
    assert got.token_ids == expected.token_ids and got.accepted_tokens >= got.proposed_tokens - 1 > 0
    pipe.close()
    photo = Image.open(photos["chelsea"]).convert("RGB")
    frames = [photo.crop((16 * i, 8 * i, 16 * i + 320, 8 * i + 240)) for i in range(4)]
    video = GenerationConfig(max_new_tokens=30, num_frames=4)
    alone = Pipeline(video_export, properties=F32, cache_dir=None)
    expected = alone.generate("What happens in this video?", config=video, videos=[frames])
    alone.close()
    pipe = drafted(video_export, video_export)
    got = pipe.generate("What happens in this video?", config=video, videos=[frames])
    assert got.token_ids == expected.token_ids and got.video_frames == 4 and got.accepted_tokens > 0
    pipe.close()


def test_the_draft_length_follows_what_the_target_keeps():
    """One more than kept, at most --draft-tokens; a full miss drafts one token, after a rest."""
    from types import SimpleNamespace

    from llava_ov.runtime.draft import DraftProposer
    from llava_ov.runtime.speculative import Backoff

    proposer = object.__new__(DraftProposer)
    proposer.draft = SimpleNamespace(tokens=4, learn=lambda proposed, accepted: None)
    proposer.backoff, proposer.length = Backoff(), 4
    lengths = []
    for proposed, accepted in [(4, 0), (1, 1), (2, 2), (3, 3), (4, 4), (4, 1), (0, 0)]:
        proposer.verified(proposed, accepted)
        lengths.append(proposer.length)
    assert lengths == [1, 2, 3, 4, 4, 2, 2]
    assert proposer.backoff.length == 1  # a kept proposal reset the rest that follows the next full miss


def test_the_server_takes_use_draft(exports, pipes):
    """A server loaded with a draft: its proposals show in usage and metrics; `use_draft: false` turns it off."""
    from llava_ov.frontends.server.app import create_app
    from llava_ov.frontends.server.settings import ServerSettings
    from test_server import HTTP, metric, running, wait_ready

    expected = plain(pipes["llava"], PROMPTS[2], GenerationConfig(max_new_tokens=30))
    pipe = drafted(exports["llava"], exports["llava"])
    body = {"messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 30}
    with running(create_app(ServerSettings(model=str(exports["llava"])), lambda: pipe)) as base:
        wait_ready(base)
        on = HTTP.post(f"{base}/v1/chat/completions", json=body).json()
        off = HTTP.post(f"{base}/v1/chat/completions", json={**body, "use_draft": False}).json()
        for answer in (on, off):
            assert answer["choices"][0]["message"]["content"] == expected.text
        assert on["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] >= 10
        assert off["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] == 0
        assert metric(base, "llava_ov_accepted_tokens_total") >= 10
    pipe.close()


def test_a_draft_that_keeps_missing_makes_new_answers_rest():
    """Misses in a row are counted over answers: a new answer waits 1, 2, 4 ... 256 steps before its first
    proposal while they last; one kept proposal ends the streak."""
    from llava_ov.runtime.draft import LONGEST_REST, DraftModel

    draft = object.__new__(DraftModel)
    draft.misses = 0
    rests = []
    for proposed, accepted in [(1, 0), (1, 0), (1, 0), (0, 0), (2, 1), (1, 0)] + [(1, 0)] * 20:
        draft.learn(proposed, accepted)
        rests.append(draft.first_rest())
    assert rests[:6] == [1, 2, 4, 4, 0, 1] and rests[-1] == LONGEST_REST


def test_the_draft_rests_while_more_answers_use_it_than_draft_max_running(exports, pipes):
    """Drafting is one sequence after another: past --draft-max-running answers at once it proposes nothing
    (answers unchanged), within it, it proposes."""
    from test_engine import generate_together

    config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    alone = [plain(pipes["llava"], p, config).token_ids for p in PROMPTS]
    kept = {}
    for limit in (1, 4):
        pipe = drafted(exports["llava"], exports["llava"], draft_max_running=limit)
        out = generate_together(pipe, PROMPTS, config)
        assert [r.token_ids for r in out] == alone and pipe.draft.running == 0
        kept[limit] = sum(r.accepted_tokens for r in out)
        pipe.close()
    assert kept[4] >= 4 * 20 and kept[1] < kept[4] / 2, kept


def test_proposing_again_after_a_step_that_kept_nothing_new(exports):
    """A step whose proposals never ran (the target was preempted) leaves the target's context as it was: the
    draft proposes the same tokens again, recomputing its last position (never an empty forward)."""
    pipe = drafted(exports["llava-next"], exports["llava-next"])
    messages = [Message("user", PROMPTS[2])]
    target, draft_prompt = pipe.prepare(messages), pipe.draft.prepare(messages, GREEDY)
    proposer = pipe.draft.proposer(draft_prompt, len(target.keys))
    chunks: list[int] = []
    original = pipe.draft.lm.forward
    pipe.draft.lm.forward = lambda batch, **kw: chunks.append(len(batch.ids)) or original(batch, **kw)
    context = np.concatenate([target.keys, [1234]])
    first = proposer.propose(context, 4)
    again = proposer.propose(context, 4)
    assert len(first) == 4 and again == first and min(chunks) >= 1
    longer = proposer.propose(np.concatenate([context, first[:2]]), 4)  # two kept, then the target's own token
    assert longer[:2] == first[2:4] and min(chunks) >= 1
    proposer.release()
    assert pipe.draft.running == 0 and pipe.draft.pool.used == 0
    pipe.close()
