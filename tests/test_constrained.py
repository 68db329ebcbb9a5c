"""Structured output (JSON Schema via llguidance) and logprobs, on the random-weight test models.

Their unconstrained output is noise, so any JSON they produce is the grammar's doing."""

from __future__ import annotations

import json
import threading

import jsonschema
import numpy as np
import pytest

from conftest import F32, FAMILIES
from llava_ov.runtime.chat import ChatSession
from llava_ov.runtime.constrained import JSON_OBJECT, MAX_SCHEMA_BYTES, InvalidSchemaError, load_schema
from llava_ov.errors import InvalidImageError, LlavaOvError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from reference import hf_logprobs

SCHEMAS = {
    "enum_and_bounds": {
        "type": "object",
        "properties": {"kind": {"enum": ["cat", "dog", "bird"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                       "score": {"type": "number", "minimum": -1, "maximum": 1}},
        "required": ["kind", "legs", "score"], "additionalProperties": False,
    },
    "array_items": {
        "type": "object",
        "properties": {"objects": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                   "minItems": 2, "maxItems": 4}},
        "required": ["objects"], "additionalProperties": False,
    },
    "nested_optional": {
        "type": "object",
        "properties": {
            "caption": {"type": "string", "minLength": 3, "maxLength": 40},
            "has_text": {"type": "boolean"},
            "box": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 999},
                                                     "y": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["x", "y"], "additionalProperties": False},
            "note": {"type": ["string", "null"], "maxLength": 10},
        },
        "required": ["caption", "has_text", "box"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                   "count": {"type": "integer", "minimum": 1, "maximum": 20}},
                  "required": ["name", "count"], "additionalProperties": False},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def pipes(exports):
    return {fam: Pipeline(exports[fam], properties=F32, cache_dir=None) for fam in FAMILIES}


def ask(pipe, photo, **config):
    return pipe.generate([Message("user", "Describe the image as JSON.", [photo])], config=GenerationConfig(**config))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", SCHEMAS)
def test_answers_validate_against_the_schema(family, name, pipes, photos):
    schema = SCHEMAS[name]
    for seed in (None, 0, 1, 2):  # greedy, then sampled
        config = dict(temperature=0.0) if seed is None else dict(temperature=1.0, seed=seed)
        result = ask(pipes[family], photos["chelsea"], max_new_tokens=200, json_schema=schema, **config)
        assert result.finish_reason == "eos", result  # the JSON ended, nothing cut it
        jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.parametrize("family", FAMILIES)
def test_json_object_always_parses(family, pipes, photos):
    parsed = 0
    for seed in range(24):  # until two answers ended on their own (~30 % of them do on the random llava model)
        result = ask(pipes[family], photos["coffee"], max_new_tokens=300, json_schema=JSON_OBJECT,
                     temperature=0.7, seed=seed)  # fmt: skip
        if result.finish_reason == "length":  # an unbounded string may run on: then it is cut, and says so
            continue
        assert result.finish_reason == "eos" and isinstance(json.loads(result.text), dict)
        parsed += 1
        if parsed == 2:
            break
    assert parsed == 2  # not vacuous: answers that ended were parsed (fewer than 2 in 24: p < 0.3 %)
    free = ask(pipes[family], photos["coffee"], max_new_tokens=30)
    with pytest.raises(json.JSONDecodeError):  # without the grammar the model writes noise
        json.loads(free.text)


def test_cut_json_says_length(pipes, photos):
    result = ask(pipes["llava-next"], photos["chelsea"], max_new_tokens=4, json_schema=SCHEMAS["nested_optional"])
    assert result.finish_reason == "length" and len(result.token_ids) == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_stop_string_still_applies(pipes, photos):
    result = ask(pipes["llava"], photos["chelsea"], max_new_tokens=100, json_schema=SCHEMAS["array_items"],
                 stop=['",'])  # fmt: skip
    assert result.finish_reason == "stop" and '",' not in result.text and result.text.startswith('{"objects":["')


def test_concurrent_sequences_keep_their_own_grammar(pipes, photos):
    """Four sequences with different schemas decode together in the engine and match their solo runs."""
    pipe = pipes["llava-next"]
    jobs = list(SCHEMAS.items())
    solo = {name: ask(pipe, photos["rocket"], max_new_tokens=200, json_schema=s).token_ids for name, s in jobs}
    together: dict[str, object] = {}
    barrier = threading.Barrier(len(jobs))

    def run(name, schema):
        barrier.wait()
        together[name] = ask(pipe, photos["rocket"], max_new_tokens=200, json_schema=schema)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for name, schema in jobs:
        assert together[name].token_ids == solo[name]
        jsonschema.validate(json.loads(together[name].text), schema)


def test_schema_on_the_last_chat_turn_only(pipes, photos):
    session = ChatSession(pipes["llava-next"])
    free = session.ask("What is this?", [photos["coffee"]], GenerationConfig(max_new_tokens=12))
    structured = session.ask("Now as JSON.", config=GenerationConfig(max_new_tokens=200, json_schema=SCHEMAS["array_items"]))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)
    jsonschema.validate(json.loads(structured.text), SCHEMAS["array_items"])
    assert [m.role for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_stateful_path_is_constrained_too(exports, photos):
    pipe = Pipeline(exports["llava"], properties=F32, cache_dir=None, kv_cache="stateful")
    schema = SCHEMAS["enum_and_bounds"]
    result = ask(pipe, photos["chelsea"], max_new_tokens=100, json_schema=schema, temperature=1.0, seed=3)
    jsonschema.validate(json.loads(result.text), schema)


@pytest.mark.parametrize(
    "schema, message",
    [
        ({"type": "string", "format": "no-such-format"}, "Unknown format"),
        ({"$ref": "#/definitions/missing"}, "does not exist"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
        ([{"type": "object"}], "must be a JSON object"),
        ({"enum": ["x" * 1000] * (MAX_SCHEMA_BYTES // 1000 + 1)}, "the limit is"),
    ],
)
def test_bad_schemas_are_refused_before_any_image_work(schema, message, pipes, tmp_path):
    missing = tmp_path / "no-such-image.png"  # the image would fail too, but the schema is checked first
    with pytest.raises(InvalidSchemaError, match=message):
        pipes["llava"].generate([Message("user", "JSON?", [missing])], config=GenerationConfig(json_schema=schema))
    with pytest.raises(InvalidImageError):  # the same request with a good schema reaches the image
        pipes["llava"].generate([Message("user", "JSON?", [missing])], config=GenerationConfig(json_schema=JSON_OBJECT))


def test_schema_files(tmp_path):
    good = tmp_path / "s.json"
    good.write_text(json.dumps(SCHEMAS["array_items"]))
    assert load_schema(good) == SCHEMAS["array_items"]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidSchemaError, match="is not JSON"):
        load_schema(bad)
    with pytest.raises(InvalidSchemaError, match="cannot read"):
        load_schema(tmp_path / "missing.json")


# ---------------------------------------------------------------- logprobs


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_transformers_softmax(family, pipes, hf_models, photos):
    model, processor = hf_models[family]
    messages = [Message("user", "Describe this image.", [photos["astronaut"]])]
    for config in (GenerationConfig(max_new_tokens=12, logprobs=5),
                   GenerationConfig(max_new_tokens=12, logprobs=3, temperature=1.0, seed=7)):  # fmt: skip
        result = pipes[family].generate(messages, config=config)
        ref = hf_logprobs(model, processor, messages, result.token_ids)
        assert [e.token_id for e in result.logprobs] == result.token_ids
        for entry, row in zip(result.logprobs, ref):
            assert entry.logprob == pytest.approx(row[entry.token_id], abs=2e-3)
            assert len(entry.top) == config.logprobs
            top_ids = np.argsort(-row, kind="stable")[: config.logprobs]
            np.testing.assert_allclose([lp for _, lp in entry.top], row[top_ids], atol=2e-3)
            if config.greedy:  # the chosen token is the most likely one
                assert entry.logprob == entry.top[0][1] and entry.token_id == entry.top[0][0]


def test_logprobs_off_by_default_and_zero_top(pipes, photos):
    plain = ask(pipes["llava"], photos["chelsea"], max_new_tokens=5)
    assert plain.logprobs is None
    zero = ask(pipes["llava"], photos["chelsea"], max_new_tokens=5, logprobs=0)
    assert [e.top for e in zero.logprobs] == [[]] * 5 and zero.token_ids == plain.token_ids


def test_logprobs_bounds():
    for bad in (-1, 21):
        with pytest.raises(LlavaOvError, match="logprobs"):
            GenerationConfig(logprobs=bad).validate()
