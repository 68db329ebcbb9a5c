#!/usr/bin/env python
"""Checkpoints for measuring a draft model with random weights (docs/speed.md, "A draft model").

Random weights give a draft nothing to agree on: an independent small model, or the first decoder layer
of the target, predicts its argmax almost never. So two checkpoints are made from one (a transformers
LLaVA checkpoint, e.g. the real-width 4-layer bench model):

- `OUT/draft`: the first `--draft-layers` decoder layers of it (embeddings, vision tower, projector,
  norm and LM head unchanged): the cheap draft;
- `OUT/damped`: the checkpoint itself with the attention and MLP output projections of every later
  layer scaled by `--scale`: a target whose later layers change its predictions only sometimes, so the
  truncated draft agrees with it often — what a trained draft of a trained target does.

Convert both (`llava-ov convert OUT/damped -o ...`), then time the target with and without the draft:
`python scripts/speculation_bench.py TARGET_EXPORT --draft DRAFT_EXPORT --cases draft`.

    python scripts/draft_bench_models.py CHECKPOINT OUT --draft-layers 1 --scale 0.2
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

LAYER = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")
OUTPUTS = ("o_proj.weight", "down_proj.weight")


def damped_copy(checkpoint: Path, out: Path, keep: int, scale: float) -> None:
    """`checkpoint` with layers from `keep` on writing `scale` times their attention and MLP outputs."""
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for path in checkpoint.iterdir():
        if path.suffix != ".safetensors":
            if path.is_file():
                shutil.copy(path, out / path.name)
            continue
        weights = load_file(path)
        for name, value in weights.items():
            found = LAYER.search(name)
            if found and int(found[1]) >= keep and name.endswith(OUTPUTS):
                weights[name] = (value.astype("float32") * scale).astype(value.dtype)
        save_file(weights, out / path.name, metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    from llava_ov.exporting.random_models import truncated_copy

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--scale", type=float, default=0.2, help="of the later layers' output projections in the target")
    args = p.parse_args(argv)
    truncated_copy(args.checkpoint, args.out / "draft", args.draft_layers)
    damped_copy(args.checkpoint, args.out / "damped", args.draft_layers, args.scale)
    print(f"wrote {args.out / 'draft'} and {args.out / 'damped'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
