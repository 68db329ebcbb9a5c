"""Regular expressions and Lark grammars (llguidance) constrain answers on both families, greedy and sampled,
from the Python API, the CLI, batch and the server (response_format, and vLLM's guided_regex / guided_grammar)."""

from __future__ import annotations

import json
import re

import openai
import pytest

from conftest import F32
from llava_ov.runtime.constrained import InvalidGrammarError
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Message, Pipeline
from test_server import openai_client

DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-[0-9]{2}"
LARK = """start: "It shows " count " " thing "."
count: "one" | "two" | "many"
thing: /[a-z]{3,10}/
"""
LARK_TEXT = re.compile(r"It shows (one|two|many) [a-z]{3,10}\.")
SAMPLED = dict(temperature=1.0, top_p=0.95, seed=7)


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def pipe(request, exports) -> Pipeline:
    return Pipeline(exports[request.param], properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def question(photos) -> list[Message]:
    return [Message("user", "When was this taken, and what does it show?", [photos["chelsea"]])]


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_regex_answers_match(pipe, question, sampling):
    result = pipe.generate(question, config=GenerationConfig(max_new_tokens=20, regex=DATE, **sampling))
    assert re.fullmatch(DATE, result.text) and result.finish_reason == "eos"


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_lark_answers_follow_the_grammar(pipe, question, sampling):
    result = pipe.generate(question, config=GenerationConfig(max_new_tokens=30, grammar=LARK, **sampling))
    assert LARK_TEXT.fullmatch(result.text) and result.finish_reason == "eos"


def test_unusable_grammars_are_clear_errors(pipe):
    for config, message in [
        (GenerationConfig(regex="([a-z"), "(?s)the regex cannot be used.*unclosed character class"),
        (GenerationConfig(grammar="start: nothing_defined"), "(?s)the grammar cannot be used.*unknown name"),
        (GenerationConfig(regex=""), "non-empty"),
    ]:
        with pytest.raises(InvalidGrammarError, match=message):
            pipe.generate("x", config=config)
    with pytest.raises(Exception, match="exclude each other"):
        pipe.generate("x", config=GenerationConfig(regex="a", json_schema={"type": "object"}))


def test_cli_regex_and_grammar(exports, tmp_path, photos, capsys):
    from llava_ov.cli import main

    base = ["run", str(exports["llava"]), "--image", str(photos["chelsea"]), "--prompt", "When?", "--json", "--f32",
            "--max-new-tokens", "30"]  # fmt: skip
    assert main([*base, "--regex", DATE]) == 0
    assert re.fullmatch(DATE, json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    grammar = tmp_path / "answer.lark"
    grammar.write_text(LARK)
    assert main([*base, "--grammar", str(grammar)]) == 0
    assert LARK_TEXT.fullmatch(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    assert main([*base, "--grammar", str(tmp_path / "missing.lark")]) == 2
    assert "cannot read the grammar" in capsys.readouterr().err


def test_batch_rows_follow_the_regex(exports, photos, tmp_path):
    from llava_ov.frontends.batch.local import run_batch
    from test_batch import read_output, write_table

    table = tmp_path / "rows.jsonl"
    write_table(table, [{"id": n, "image": str(photos[n])} for n in ("chelsea", "coffee")])
    pipe = Pipeline(exports["llava"], properties=F32, cache_dir=None)
    summary = run_batch(pipe, table, tmp_path / "out.jsonl", config=GenerationConfig(max_new_tokens=20, regex=DATE),
                        progress=False)  # fmt: skip
    assert (summary.succeeded, summary.failed) == (2, 0)
    assert all(re.fullmatch(DATE, r["answer"]) for r in read_output(tmp_path / "out.jsonl"))


@pytest.fixture(scope="module")
def client(exports):
    with openai_client(exports["llava"]) as client:
        yield client


def ask(client, stream: bool, **kwargs) -> str:
    request = dict(model="m", messages=[{"role": "user", "content": "When?"}], max_tokens=30, **kwargs)
    if not stream:
        return client.chat.completions.create(**request).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **request) if c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_server_response_format_regex_and_grammar(client, stream):
    assert re.fullmatch(DATE, ask(client, stream, response_format={"type": "regex", "regex": DATE}))
    assert LARK_TEXT.fullmatch(ask(client, stream, response_format={"type": "grammar", "grammar": LARK}))
    assert re.fullmatch(DATE, ask(client, stream, extra_body={"guided_regex": DATE}, temperature=0.9, seed=1))
    assert LARK_TEXT.fullmatch(ask(client, stream, extra_body={"guided_grammar": LARK}))


@pytest.mark.parametrize("kwargs, code", [
    (dict(response_format={"type": "regex", "regex": "([a-z"}), "invalid_grammar"),
    (dict(response_format={"type": "grammar", "grammar": "start: nothing_defined"}), "invalid_grammar"),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}), None),
])  # fmt: skip
def test_server_refuses_unusable_grammars(client, kwargs, code):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, False, **kwargs)
    error = caught.value.body
    assert error["param"] == "response_format" and (code is None or error["code"] == code)
