"""Per-token cost of JSON-schema constrained decoding: llguidance (what llava-ov uses) vs outlines-core.

Both run on the export's own vocabulary with random logits (the cost does not depend on the model):
schema compile time, then mask + advance per token until the JSON ends or --tokens are done.
xgrammar is not compared: its wheel requires torch and triton, and the runtime stays torch-free.

    pip install outlines-core   # only for this comparison; not a dependency of llava-ov
    python scripts/grammar_overhead.py EXPORT SCHEMA.json [--tokens 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def llguidance_run(export: Path, schema: dict, n_vocab: int, eos: int, tokens: int, rng) -> tuple[float, list[float]]:
    from llava_ov.runtime.constrained import Grammars

    grammars = Grammars.from_export(export, n_vocab, [eos])
    start = time.perf_counter()
    constraint = grammars.constraint("json_schema", schema)
    compile_s = time.perf_counter() - start
    steps = []
    for _ in range(tokens):
        logits = rng.standard_normal(n_vocab).astype(np.float32)
        start = time.perf_counter()
        token = int(np.argmax(constraint.mask(logits)))
        if token == eos:
            break
        constraint.accept(token)
        steps.append(time.perf_counter() - start)
        if constraint.complete:
            break
    return compile_s, steps


def outlines_run(export: Path, schema: dict, n_vocab: int, eos: int, tokens: int, rng) -> tuple[float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from llava_ov.runtime.detokenize import PieceDecoder

    pieces = PieceDecoder.from_export(export).pieces
    vocab: dict[bytes, list[int]] = {}
    for i, piece in enumerate(pieces):
        if piece and i != eos:
            vocab.setdefault(piece, []).append(i)
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema)), Vocabulary(eos, vocab))
    guide = Guide(index)
    compile_s = time.perf_counter() - start
    steps = []
    for _ in range(tokens):
        logits = rng.standard_normal(n_vocab).astype(np.float32)
        start = time.perf_counter()
        allowed = np.fromiter(guide.get_tokens(), dtype=np.int64)
        masked = np.full_like(logits, -np.inf)
        masked[allowed] = logits[allowed]
        token = int(np.argmax(masked))
        if token == eos:
            break
        guide.advance(token)
        steps.append(time.perf_counter() - start)
        if guide.is_finished():
            break
    return compile_s, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("schema", type=Path)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    config = json.loads((args.export / "config.json").read_text())
    text = config.get("text_config", config)
    n_vocab, eos = int(text["vocab_size"]), int(text.get("eos_token_id", 2))
    schema = json.loads(args.schema.read_text())
    for name, run in (("llguidance", llguidance_run), ("outlines-core", outlines_run)):
        compiles, per_token, lengths = [], [], []
        try:
            for seed in range(args.repeats):
                compile_s, steps = run(args.export, schema, n_vocab, eos, args.tokens, np.random.default_rng(seed))
                compiles.append(compile_s)
                per_token.append(statistics.fmean(steps))
                lengths.append(len(steps))
        except Exception as exc:  # report and go on with the other library
            print(f"{name}: failed ({type(exc).__name__}: {exc})")
            continue
        sd = statistics.stdev(per_token) if len(per_token) > 1 else 0.0
        print(f"{name}: compile {statistics.fmean(compiles) * 1e3:.1f} ms; "
              f"{statistics.fmean(per_token) * 1e3:.3f} ± {sd * 1e3:.3f} ms per token "
              f"({statistics.fmean(lengths):.0f} tokens per answer, {args.repeats} answers)")  # fmt: skip


if __name__ == "__main__":
    main()
