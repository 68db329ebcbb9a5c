"""Random-weight LLaVA checkpoints built from the real Hub config files.

No machine here reaches the Hugging Face Hub, so tests, the offline demo and the
benchmarks build checkpoints locally: the real `config.json` / processor files
shipped in `llava_ov/model_configs/`, scaled down ("tiny") or kept at real width
with fewer decoder layers ("real"), random weights, and the backbone's real
vocabulary from a PyPI package (vocabularies.py: Mistral v1 SentencePiece, Qwen or
Llama-3 BPE; Yi-34B gets a stand-in with moved token ids) plus the checkpoint's
added tokens (`<image>`=32000 and `<pad>`=32001 for Mistral/Vicuna).  The answers
of such a model are noise; its shapes, tokenizer, preprocessing and numerics are real.

Needs the `[convert]` extra (torch, transformers).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.exporting import vocabularies

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
    "llava-onevision": "llava-onevision-qwen2-0.5b-ov-hf",
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
    return remap_token_ids(cfg, spec.config_name)


DEFAULT_ADDED_TOKENS = {"<image>": 32000, "<pad>": 32001}


def added_tokens(config_name: str) -> dict[str, int]:
    """The checkpoint's added special tokens (added_tokens.json), e.g. `<image>`=32000, `<pad>`=32001."""
    path = model_config_dir(config_name) / "added_tokens.json"
    return _read_json(path) if path.exists() else dict(DEFAULT_ADDED_TOKENS)


def build_tokenizer(out_dir: Path | None, config_name: str):
    """The checkpoint's real base vocabulary (see vocabularies.py) + its added tokens (`<image>`, `<pad>`, `<video>`).

    config.json's text_config picks the vocabulary: Qwen BPE for qwen2, Llama-3 BPE for a
    llama with >= 128000 tokens, the Yi stand-in (Mistral SPM, ids moved: remap_token_ids)
    for Yi-34B, the Mistral v1 SentencePiece vocabulary otherwise.  The added tokens
    (added_tokens.json) land on their ids, or a ValueError says which did not.
    """
    vocab, wanted = _vocabulary(config_name)
    tok = vocabularies.base_tokenizer(vocab)
    vocabularies.add_tokens_on_ids(tok, vocabularies.stand_in_added_tokens(vocab, wanted))
    if vocab in (vocabularies.MISTRAL_SPM, vocabularies.YI_STAND_IN):
        tok.pad_token = "<pad>" if "<pad>" in wanted else "<unk>"  # Vicuna pads with <unk> (pad_token_id 0)
    if vocab is vocabularies.YI_STAND_IN:
        tok.eos_token = "<|im_end|>"  # Yi-34B chat's eos (id 7 in Yi's own vocabulary)
    if vocab in (vocabularies.QWEN, vocabularies.LLAMA3):
        if vocab is vocabularies.LLAMA3 and "<pad>" in wanted:
            tok.pad_token = "<pad>"
        names = _special_tokens_map(config_name)  # the checkpoint's own bos/eos/pad/unk
        missing = [name for name in dict.fromkeys(names.values()) if name not in tok.get_vocab()]
        if missing and not (model_config_dir(config_name) / "added_tokens.json").exists():
            # no added_tokens.json: the named tokens follow the config's <image>/<video>
            # (llama3-llava-next-8b-hf: <image>=128256, then <pad>=128257, as on the Hub)
            vocabularies.add_tokens_on_ids(tok, {name: len(tok) + k for k, name in enumerate(missing)})
        for key, name in names.items():
            if name not in tok.get_vocab():
                raise ValueError(f"{config_name}: special_tokens_map.json's {key} {name!r} is not in the vocabulary")
            if getattr(tok, key) != name:
                setattr(tok, key, name)
    tok.padding_side = "left"
    tok.image_token = "<image>"
    if "<video>" in wanted:
        tok.video_token = "<video>"
    return tok


def _vocabulary(config_name: str) -> tuple[vocabularies.Vocabulary, dict[str, int]]:
    """The base vocabulary of `config_name` and its added tokens (token -> id in the real checkpoint)."""
    folder = model_config_dir(config_name)
    config = _read_json(folder / "config.json") if (folder / "config.json").exists() else {}
    vocab = vocabularies.vocabulary_for(config)
    if vocab is vocabularies.MISTRAL_SPM or (folder / "added_tokens.json").exists():
        return vocab, added_tokens(config_name)
    # no added_tokens.json: the image/video placeholder tokens on the ids the config gives them
    placeholders = (re.fullmatch(r"(image|video)_token_(?:index|id)", key) for key in config)
    return vocab, {f"<{m[1]}>": config[m[0]] for m in placeholders if m and isinstance(config[m[0]], int)}


def _special_tokens_map(config_name: str) -> dict[str, str]:
    """bos/eos/pad/unk of the checkpoint's special_tokens_map.json, if it has one."""
    path = model_config_dir(config_name) / "special_tokens_map.json"
    if not path.exists():
        return {}
    names = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = _read_json(path).get(key)
        if value is not None:
            names[key] = value["content"] if isinstance(value, dict) else value
    return names


def remap_token_ids(config: dict[str, Any], config_name: str) -> dict[str, Any]:
    """`config` with its token ids where build_tokenizer puts the tokens (changes only the Yi stand-in)."""
    vocab, wanted = _vocabulary(config_name)
    return vocabularies.remap_token_ids(config, vocab, wanted)


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
        generation = _read_json(folder / "generation_config.json")
        if remap_token_ids(generation, spec.config_name) == generation:
            shutil.copy(folder / "generation_config.json", out / "generation_config.json")
        else:  # the Yi stand-in's ids
            text = json.dumps(remap_token_ids(generation, spec.config_name), indent=2) + "\n"
            (out / "generation_config.json").write_text(text)
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
    # named_parameters lists a tied weight once (the embedding, not lm_head): a tied model stores it once
    stored = {*dict(model.named_parameters()), *dict(model.named_buffers())}
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name in stored}


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


_DECODER_LAYER = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")


def truncated_copy(checkpoint: str | Path, out_dir: str | Path, text_layers: int) -> Path:
    """A copy of a checkpoint keeping only the first `text_layers` decoder layers of its language model
    (embeddings, vision tower, projector, final norm and LM head unchanged): a draft model that agrees
    with its target often, for tests and benchmarks of speculative decoding with random weights."""
    from safetensors.numpy import load_file, save_file

    src, out = Path(checkpoint), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _read_json(src / "config.json")
    text = config["text_config"]
    if not 1 <= text_layers <= text["num_hidden_layers"]:
        raise ValueError(f"text_layers must be in [1, {text['num_hidden_layers']}]")
    text["num_hidden_layers"] = text_layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:text_layers]
    for path in src.iterdir():
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            kept = {k: v for k, v in tensors.items() if _layer_below(k, text_layers)}
            save_file(kept, out / path.name, metadata={"format": "pt"})
        elif path.name == "model.safetensors.index.json":
            index = _read_json(path)
            index["weight_map"] = {k: f for k, f in index["weight_map"].items() if _layer_below(k, text_layers)}
            (out / path.name).write_text(json.dumps(index, indent=2) + "\n")
        elif path.is_file() and path.name != "config.json":
            shutil.copy(path, out / path.name)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _layer_below(name: str, layers: int) -> bool:
    """A weight outside the decoder layers, or of one of the first `layers`."""
    found = _DECODER_LAYER.search(name)
    return found is None or int(found[1]) < layers
