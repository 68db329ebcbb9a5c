#!/usr/bin/env python
"""Several tokens per forward, measured side by side in one process (issue 30's three cases).

Each case runs its two arms on the same loaded pipeline, interleaved run by run (a warm-up first),
greedy; the prompt's KV comes from the prefix cache after the warm-up (decode is what is measured:
every answer token is still computed); decode tokens/s = generated tokens after the first /
the time after the first token. The answers of the two arms must be equal (checked: speculation
may only change the speed).

- catalogue: the docs' catalogue JSON schema over a photo, grammar jump-forward on vs off;
- copy: an answer that copies a sentence of the prompt, prompt lookup (8 tokens) vs none. Random
  weights never copy, so a regex makes the answer that sentence and a logit bias on its tokens
  makes the model choose the prompt's own tokenization (jump-forward off in both arms, so each token
  is still sampled); with a trained model no regex is needed;
- lookup: a plain description, prompt lookup on vs off (random weights repeat themselves: some
  proposals are kept);
- rejected: the same with every proposal made wrong (each proposed token id + 1): the worst case,
  what lookup costs when none of its proposals is ever kept;
- draft (with `--draft DRAFT_EXPORT`): the plain description with the draft model proposing vs not.
  The other cases run without the draft.

    python scripts/speculation_bench.py EXPORT --runs 5 --json docs/results/speculation.json
    python scripts/speculation_bench.py EXPORT --draft DRAFT --draft-tokens 3 --cases draft
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk, lit the great lamp, "
            "and watched the fishing boats return safely to the harbour below.")  # fmt: skip


def literal(text: str) -> str:
    """A regex matching `text` exactly (its metacharacters escaped)."""
    return "".join("\\" + c if c in ".^$*+?()[]{}|\\" else c for c in text)


def cases(pipe: Any, max_new: int) -> dict[str, tuple[Any, Any, str, list[str]]]:
    """name -> (config of arm A, config of arm B, prompt, images); A is the speculating arm."""
    from llava_ov.runtime.generate import GenerationConfig

    schema = json.loads((ROOT / "docs" / "examples" / "catalogue.schema.json").read_text())
    photo = str(ROOT / "examples" / "coffee.jpg")
    catalogue = GenerationConfig(max_new_tokens=400, json_schema=schema, use_draft=False)
    copy_bias = {int(t): 30.0 for t in set(pipe.model.tokenizer.encode(SENTENCE).tolist())}
    copy = GenerationConfig(max_new_tokens=max_new, regex=literal(SENTENCE), jump_forward=False, logit_bias=copy_bias,
                            use_draft=False)  # fmt: skip
    plain = GenerationConfig(max_new_tokens=max_new, ignore_eos=True, use_draft=False)
    drafted = {"draft": (replace(plain, use_draft=True), plain, "Describe this image in detail.", [photo])}
    return {
        **(drafted if pipe.draft is not None else {}),
        "catalogue": (catalogue, replace(catalogue, jump_forward=False), "Describe this photo for a catalogue.", [photo]),
        "copy": (replace(copy, prompt_lookup=8), copy, f"Copy this sentence exactly: {SENTENCE}", []),
        "lookup": (replace(plain, prompt_lookup=8), plain, "Describe this image in detail.", [photo]),
        "rejected": (replace(plain, prompt_lookup=8), plain, "Describe this image in detail.", [photo]),
    }


def one_run(pipe: Any, config: Any, prompt: str, images: list[str], wrong: bool = False) -> dict[str, Any]:
    from llava_ov.runtime import speculative

    propose = speculative.PromptLookup.propose
    if wrong:  # every proposal off by one token id: none is ever kept
        speculative.PromptLookup.propose = lambda self, *a: [t + 1 for t in propose(self, *a)]  # type: ignore[method-assign]
    try:
        result = pipe.generate(prompt, images, config)
    finally:
        speculative.PromptLookup.propose = propose  # type: ignore[method-assign]
    t = result.timings
    decode_s = sum(t.token_s)
    return {"tokens": len(result.token_ids), "decode_tokens_per_s": len(t.token_s) / decode_s if decode_s else 0.0,
            "proposed": result.proposed_tokens, "accepted": result.accepted_tokens, "ids": result.token_ids}  # fmt: skip


def stat(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def measure(pipe: Any, runs: int, warmup: int, max_new: int, only: list[str] | None = None, log=print) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for name, (on, off, prompt, images) in cases(pipe, max_new).items():
        if only and name not in only:
            continue
        arms: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for i in range(warmup + runs):
            for arm, config in (("on", on), ("off", off)):
                got = one_run(pipe, config, prompt, images, wrong=name == "rejected" and arm == "on")
                if i >= warmup:
                    arms[arm].append(got)
        same = all(a["ids"] == b["ids"] for a, b in zip(arms["on"], arms["off"]))
        speeds = {arm: stat([r["decode_tokens_per_s"] for r in rs]) for arm, rs in arms.items()}
        proposed, accepted = sum(r["proposed"] for r in arms["on"]), sum(r["accepted"] for r in arms["on"])
        report[name] = {
            "decode_tokens_per_s": speeds, "ratio_on_over_off": speeds["on"]["mean"] / speeds["off"]["mean"],
            "tokens": arms["on"][0]["tokens"], "proposed": proposed, "accepted": accepted,
            "accepted_per_token": accepted / sum(r["tokens"] for r in arms["on"]), "same_answers": same,
        }  # fmt: skip
        log(f"{name}: on {speeds['on']['mean']:.2f} ± {speeds['on']['sd']:.2f} tok/s, off {speeds['off']['mean']:.2f} "
            f"± {speeds['off']['sd']:.2f} tok/s, ratio {report[name]['ratio_on_over_off']:.2f}, {proposed} proposed, "
            f"{accepted} kept, {arms['on'][0]['tokens']} tokens per answer, same answers: {same}")  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    from llava_ov.runtime.pipeline import Pipeline
    from llava_ov.runtime.settings import LoadSettings
    from llava_ov.tools.bench import machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="export directory")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=96, help="for the copy and never cases")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    LoadSettings.add_arguments(p)
    args = p.parse_args(argv)
    started = time.perf_counter()
    pipe = Pipeline(args.model, LoadSettings.from_args(args).validate())
    report = {"machine": machine_info(), "model": Path(args.model).name, "runs": args.runs,
              "draft": Path(args.draft).name if args.draft else None,
              "cases": measure(pipe, args.runs, args.warmup, args.max_new_tokens, [c for c in args.cases.split(",") if c])}  # fmt: skip
    report["wall_s"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all(c["same_answers"] for c in report["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
