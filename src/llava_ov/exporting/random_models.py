"""Random-weight LLaVA checkpoints built from the real Hub config files.

No machine here reaches the Hugging Face Hub, so tests, the offline demo and the
benchmarks build checkpoints locally: the real `config.json` / processor files
shipped in `llava_ov/model_configs/`, scaled down ("tiny") or kept at real width
with fewer decoder layers ("real"), random weights, and the real Mistral v1
SentencePiece vocabulary from the `mistral-common` package plus `<image>`=32000
and `<pad>`=32001.  The answers of such a model are noise; its shapes, tokenizer,
preprocessing and numerics are real.

Needs the `[convert]` extra (torch, transformers).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

# The current Hub template of llava-v1.6-mistral ends assistant turns with `</s>`;
# the 2024 copy in model_configs still has the `<\s>` typo (see SOURCES.md).
MISTRAL_CHAT_TEMPLATE_FIX = ("'<\\\\s> '", "'</s> '")


@dataclass(frozen=True)
class RandomModelSpec:
    """Which real config to start from and how to shrink it."""

    config_name: str  # folder in llava_ov/model_configs
    scale: str = "tiny"  # "tiny" | "real"
    text_layers: int = 2
    vision_layers: int | None = None  # None: 3 for tiny, the real count for real
    initializer_range: float = 0.3  # large init keeps greedy decoding from collapsing
    seed: int = 0


RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.txt"

FAMILY_CONFIGS = {
    "llava-next": "llava-v1.6-mistral-7b-hf",
    "llava": "llava-1.5-7b-hf",
    "llava-next-video": "LLaVA-NeXT-Video-7B-hf",
    "vip-llava": "vip-llava-13b-hf",
}

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)


def model_config_dir(name: str) -> Path:
    """Folder of the shipped real config files for `name` (e.g. llava-v1.6-mistral-7b-hf)."""
    path = Path(str(resources.files("llava_ov") / "model_configs" / name))
    if not path.is_dir():
        known = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
        raise ValueError(f"unknown model config {name!r}; shipped: {', '.join(known)}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def scaled_config_dict(spec: RandomModelSpec) -> dict[str, Any]:
    """The real config.json of `spec.config_name`, scaled as `spec` asks."""
    cfg = _read_json(model_config_dir(spec.config_name) / "config.json")
    text, vision = cfg["text_config"], cfg["vision_config"]
    if spec.scale == "tiny":
        text.update(TINY_TEXT)
        vision.update(TINY_VISION)
        vision["num_hidden_layers"] = spec.vision_layers or 3
    elif spec.scale == "real":
        if spec.vision_layers:
            vision["num_hidden_layers"] = spec.vision_layers
    else:
        raise ValueError(f"scale must be 'tiny' or 'real', not {spec.scale!r}")
    text["num_hidden_layers"] = spec.text_layers
    text["initializer_range"] = spec.initializer_range
    cfg["initializer_range"] = spec.initializer_range
    for key in ("torch_dtype", "dtype"):
        cfg.pop(key, None)
        text.pop(key, None)
    return cfg


DEFAULT_ADDED_TOKENS = {"<image>": 32000, "<pad>": 32001}


def added_tokens(config_name: str) -> dict[str, int]:
    """The checkpoint's added special tokens (added_tokens.json), e.g. `<image>`=32000, `<pad>`=32001."""
    path = model_config_dir(config_name) / "added_tokens.json"
    return _read_json(path) if path.exists() else dict(DEFAULT_ADDED_TOKENS)


def build_tokenizer(out_dir: Path | None, config_name: str):
    """Mistral v1 SentencePiece vocabulary + the checkpoint's added tokens (`<image>`, `<pad>`, `<video>`)."""
    import mistral_common
    from transformers import AddedToken, LlamaTokenizer

    spm = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spm, Path(tmp) / "tokenizer.model")
        # LlamaTokenizerFast(vocab_file=...) silently gives a 3-token vocabulary in transformers 5.
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True)
    wanted = sorted(added_tokens(config_name).items(), key=lambda item: item[1])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t, _ in wanted], special_tokens=True)
    if tok.convert_tokens_to_ids([t for t, _ in wanted]) != [i for _, i in wanted]:
        raise RuntimeError(f"tokenizer build: the added tokens did not land on their ids {dict(wanted)}")
    tok.pad_token = "<pad>" if "<pad>" in dict(wanted) else "<unk>"  # Vicuna pads with <unk> (pad_token_id 0)
    tok.padding_side = "left"
    tok.image_token = "<image>"
    if "<video>" in dict(wanted):
        tok.video_token = "<video>"
    return tok


def chat_template(config_name: str) -> str:
    """The checkpoint's chat template (the current Hub form: assistant turns end with `</s>`)."""
    folder = model_config_dir(config_name)
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    template = _read_json(folder / "chat_template.json")["chat_template"]
    return template.replace(*MISTRAL_CHAT_TEMPLATE_FIX)


def _config_for(spec: RandomModelSpec) -> tuple[str, Any]:
    """(architecture name, transformers config) of `spec`."""
    import transformers

    cfg_dict = scaled_config_dict(spec)
    arch = cfg_dict["architectures"][0]
    cfg_dict.pop("model_type")  # the architecture's config class: old Hub configs name another model_type
    return arch, getattr(transformers, arch).config_class.from_dict(cfg_dict)


def build_random_checkpoint(
    spec: RandomModelSpec, out_dir: str | Path, dtype: str = "float32", *, streamed: bool = False,
    shard_bytes: int = 2_000_000_000,
) -> Path:  # fmt: skip
    """Write a transformers checkpoint (weights, config, tokenizer, processor) to `out_dir`.

    streamed: write the weights tensor by tensor into safetensors shards of at most
    `shard_bytes` (see write_streamed_weights) instead of building the model in memory;
    peak memory is about one shard, not the whole model (15 GB for the real 7B).
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Writing model shards" bars in demo-model's output
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch, config = _config_for(spec)
    if streamed:
        write_streamed_weights(arch, config, out, dtype, spec.seed, shard_bytes)
        config.dtype = dtype  # as the Hub's config.json says: dtype="auto" loads the stored precision
        config.save_pretrained(out)
    else:
        _write_initialised_model(arch, config, out, dtype, spec.seed)

    folder = model_config_dir(spec.config_name)
    tok = build_tokenizer(out, spec.config_name)
    preproc = _read_json(folder / "preprocessor_config.json")
    processor = _build_processor(arch, preproc, tok, chat_template(spec.config_name), config)
    processor.save_pretrained(out)
    # transformers 5 folds the image-processor settings into processor_config.json;
    # keep the classic file too, like the Hub checkpoints have it.
    (out / "preprocessor_config.json").write_text(json.dumps(preproc, indent=2) + "\n")
    (out / RANDOM_WEIGHTS_MARKER).write_text("This checkpoint has random weights: its answers are noise.\n")
    if (folder / "generation_config.json").exists():
        shutil.copy(folder / "generation_config.json", out / "generation_config.json")
    return out


def _write_initialised_model(arch: str, config, out: Path, dtype: str, seed: int) -> None:
    """transformers' own initialisation, saved with save_pretrained (whole model in memory)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialise in the target dtype: no fp32 copy of a big model
    try:
        model = getattr(transformers, arch)(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out)


def weight_shapes(arch: str, config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight the checkpoint stores (from a model on the meta device: no memory)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, arch)(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def random_tensor(name: str, shape: tuple[int, ...], std: float, rng, dtype: str) -> np.ndarray:
    """Norm weights 1, biases 0, everything else N(0, std): transformers' init for these families."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name
    if leaf == "bias":
        return np.zeros(shape, dtype=dtype)
    if is_norm and leaf == "weight":
        return np.ones(shape, dtype=dtype)
    out = np.empty(shape, dtype=dtype)
    flat = out.reshape(-1)
    step = 1 << 24  # fill in pieces: no float32 copy of a 0.5 GB tensor
    for start in range(0, flat.size, step):
        piece = rng.standard_normal(min(step, flat.size - start), dtype=np.float32)
        flat[start : start + piece.size] = piece * std
    return out


def write_streamed_weights(arch: str, config, out: Path, dtype: str, seed: int, shard_bytes: int) -> list[Path]:
    """Random weights written shard by shard (Hub layout: model-0000k-of-0000n.safetensors + index)."""
    from safetensors.numpy import save_file

    if dtype not in ("float16", "float32"):
        raise ValueError(f"streamed checkpoints are float16 or float32, not {dtype!r}")
    np_dtype = dtype
    itemsize = np.dtype(np_dtype).itemsize
    shapes = weight_shapes(arch, config)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    std = float(getattr(config, "initializer_range", 0.02))
    rng = np.random.default_rng(seed)
    files, weight_map = [], {}
    for index, names in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], std, rng, np_dtype) for name in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
        files.append(out / file)
    total = sum(int(np.prod(shape)) * itemsize for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def _build_processor(arch: str, preproc: dict, tok, template: str, config):
    """The family's transformers processor (its export hooks know which classes)."""
    from llava_ov.runtime.families import registered

    return registered()[arch].export_hooks().build_processor(preproc, tok, template, config)
