"""Grammar-constrained decoding via llguidance: answers valid under a JSON Schema, a regular expression or
a Lark grammar (llguidance's dialect: https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md).

`Grammars` is built once per export from its tokenizer.json (llguidance reads it with
the Hugging Face tokenizers library, byte-fallback pieces included) and turns a grammar into
a `GrammarConstraint`, one per sequence: `mask(logits)` before each sample lets through only
tokens that keep the text a valid prefix, `accept(token)` advances the grammar, and
`complete` says when the grammar has ended (nothing but the end can follow).

The JSON is compact (no free whitespace between tokens): a weak or random-weight model
cannot then loop on blanks, and parsers do not care.  Schemas llguidance does not support
or that cannot be satisfied are refused with its message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.errors import LlavaOvError
from llava_ov.runtime.export import ExportDir

MAX_SCHEMA_BYTES = 64 * 1024  # a schema (or regex, or grammar) larger than this is refused before it is compiled
MAX_SCHEMA_DEPTH = 64  # nesting of a schema (json.dumps and the compiler recurse)
GRAMMAR_KINDS = ("json_schema", "regex", "grammar")  # GenerationConfig fields; "grammar" is Lark
JSON_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's json_object: any JSON object
GRAMMAR_OPTIONS = {"whitespace_flexible": False}


class InvalidGrammarError(LlavaOvError):
    """A regular expression or Lark grammar that cannot constrain decoding."""


class InvalidSchemaError(InvalidGrammarError):
    """A JSON Schema that cannot constrain decoding (malformed, unsupported or unsatisfiable)."""


def check_grammar_text(kind: str, text: Any) -> None:
    """Cheap checks of a regex or Lark grammar before compiling: non-empty text of bounded size."""
    if not isinstance(text, str) or not text:
        raise InvalidGrammarError(f"the {kind} must be a non-empty string")
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidGrammarError(f"the {kind} is {len(text.encode()):,} bytes; the limit is {MAX_SCHEMA_BYTES:,}")


def check_schema(schema: Any) -> None:
    """Cheap checks before compiling: a JSON object of bounded depth and size."""
    if not isinstance(schema, dict):
        raise InvalidSchemaError("the JSON schema must be a JSON object, e.g. {\"type\": \"object\"}")
    if nesting(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise InvalidSchemaError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    try:
        size = len(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidSchemaError(f"the JSON schema is not plain JSON ({exc})") from None
    if size > MAX_SCHEMA_BYTES:
        raise InvalidSchemaError(f"the JSON schema is {size:,} bytes; the limit is {MAX_SCHEMA_BYTES:,}")


def nesting(value: Any, stop: int) -> int:
    """How deep `value` nests lists and dicts, counted without recursion (stops past `stop`)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= stop:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def load_schema(path: str | Path) -> dict[str, Any]:
    """A schema file for the command line (clear errors for a missing or malformed file)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidSchemaError(f"cannot read the JSON schema {path}: {exc.strerror or exc}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidSchemaError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise InvalidSchemaError(f"{path} nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    check_schema(schema)
    return schema


def load_grammar(path: str | Path) -> str:
    """A Lark grammar file for the command line (a clear error for a missing one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidGrammarError(f"cannot read the grammar {path}: {exc.strerror or exc}") from None
    check_grammar_text("grammar", text)
    return text


def parse_answer(text: str, finish_reason: str, tokens: int) -> tuple[Any, str | None]:
    """(parsed JSON, None) for an answer under a schema, or (None, why it is not complete JSON)."""
    if finish_reason == "length":
        return None, f"the JSON was cut at {tokens} tokens by the token limit: raise --max-new-tokens"
    try:
        return json.loads(text), None
    except json.JSONDecodeError:
        how = "a stop string" if finish_reason == "stop" else f"finish reason {finish_reason!r}"
        return None, f"the answer ended by {how} before its JSON did"


class Grammars:
    """Compiles JSON Schemas, regular expressions and Lark grammars for one tokenizer vocabulary
    (thread-safe; one per pipeline)."""

    def __init__(self, tokenizer_json: str, n_vocab: int, eos_ids: Iterable[int]):
        from llguidance import LLTokenizer

        self.n_vocab = n_vocab
        eos = sorted(eos_ids)
        self.tokenizer = LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=eos or None)

    @classmethod
    def from_export(cls, export: ExportDir | Path, n_vocab: int, eos_ids: Iterable[int]) -> Grammars:
        export = ExportDir.of(export)
        if export.tokenizer_json_text is None:
            raise LlavaOvError(f"structured output needs the export's tokenizer.json, which {export.path} lacks")
        return cls(export.tokenizer_json_text, n_vocab, eos_ids)

    def constraint(self, kind: str, value: Any) -> GrammarConstraint:
        """A fresh grammar state for one sequence; `kind` one of GRAMMAR_KINDS (InvalidGrammarError naming
        the problem: InvalidSchemaError for a schema)."""
        from llguidance import LLMatcher

        error, what = (InvalidSchemaError, "the JSON schema") if kind == "json_schema" else (InvalidGrammarError, f"the {kind}")
        if kind == "json_schema":
            check_schema(value)
        else:
            check_grammar_text(kind, value)
        try:
            if kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(value, defaults=GRAMMAR_OPTIONS)
            elif kind == "regex":
                grammar = LLMatcher.grammar_from_regex(value)
            else:
                grammar = LLMatcher.grammar_from_lark(value)
        except (ValueError, TypeError) as exc:
            raise error(f"{what} cannot be used: {exc}") from None
        matcher = LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise error(f"{what} cannot be used: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.n_vocab)


class GrammarConstraint:
    """One sequence's grammar state: masks logits and follows the sampled tokens."""

    def __init__(self, matcher: Any, n_vocab: int):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.spent_s = 0.0  # in mask() and accept(): the grammar's cost, for benchmarks

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens the grammar allows next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids at -inf."""
        start = time.perf_counter()
        allowed = self.allowed()[: logits.shape[-1]]
        if not allowed.any():  # cannot happen for a valid grammar: fail loudly rather than emit junk
            raise LlavaOvError(f"the grammar allows no token here ({self.matcher.get_error() or 'no extension'})")
        masked = np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)
        self.spent_s += time.perf_counter() - start
        return masked

    def accept(self, token: int) -> None:
        start = time.perf_counter()
        ok = self.matcher.consume_token(int(token))
        self.spent_s += time.perf_counter() - start
        if not ok:
            raise LlavaOvError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next, whatever the model would say (empty when it allows a choice)."""
        start = time.perf_counter()
        forced = self.matcher.compute_ff_tokens()
        self.spent_s += time.perf_counter() - start
        return [int(t) for t in forced]

    @property
    def complete(self) -> bool:
        """The grammar has ended: nothing but the end of the answer may follow."""
        return bool(self.matcher.is_stopped())

