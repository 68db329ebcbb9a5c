"""A small random-weight demo model, so every tool can be tried offline.

Real tokenizer, real preprocessing and the real LLaVA-NeXT/LLaVA-1.5 config
scaled down — and random weights: its answers are noise.  Needs the
`[convert]` extra.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llava_ov.exporting.random_models import FAMILY_CONFIGS, RandomModelSpec, build_random_checkpoint
from llava_ov.runtime.export import ExportDir


def build_demo_model(out: Path, family: str = "llava-next", overwrite: bool = False) -> Path:
    from llava_ov.exporting.convert import ConvertOptions, convert

    spec = RandomModelSpec(FAMILY_CONFIGS[family], scale="tiny", text_layers=2)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_random_checkpoint(spec, Path(tmp) / "checkpoint")
        convert(str(checkpoint), out, ConvertOptions(weight_format="fp32", overwrite=overwrite))
    record = ExportDir(out).record()
    if record is not None:  # not the temporary folder it was built in (deleted by now)
        record.source = f"random weights on {spec.config_name}'s config, scaled down (llava-ov demo-model)"
        record.save(out)
    return out
