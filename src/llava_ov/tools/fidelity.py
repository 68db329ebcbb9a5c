"""Numerical fidelity of an export's language model against transformers, by prompt length.

The reference is transformers' own decoder + lm_head, computed in float32 on the
*same* weight rounding as the export: every parameter rounded to fp16 as the IR
stores it, and each MatMul weight replaced by what the IR actually multiplies by
(its INT8/INT4 weights decompressed by OpenVINO itself).  What is left is what the
export adds beyond its weights: constants, graph rewrites, accumulation order.
Random `inputs_embeds` of a given length go through both; the figure is the largest
absolute difference of the last position's logits.

Needs the `[convert]` extra (torch, transformers).  Used by tests/test_fidelity.py
and scripts/fidelity_table.py.  Limits: the reference always rounds to fp16 (an fp32
export's figure is its fp16 rounding, not an error), and every weight is held in f32
at once, so it is for small models, not a 7B one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.common import layout

# Exact compute for a comparison: f32 everywhere, no dynamic int8 quantization of activations.
EXACT = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
MODULE_PREFIX = "__module."  # how OpenVINO's PyTorch frontend names the nodes of a traced submodule
WRAPPER_PARTS = {"decoder": ("model", "language_model"), "lm_head": ("lm_head",)}  # convert.language_module


def matmul_weights(ir_model) -> list[tuple[Any, str | None, np.ndarray]]:
    """(MatMul op, module path or None, f32 weight as stored) for every MatMul with a constant weight.

    The weight is what the op multiplies by: compressed INT8/INT4 weights decompressed by OpenVINO
    itself; [out, in] where the op has transpose_b, else [in, out].  The path comes from the node
    name ("decoder.layers.0.mlp.up_proj"); None where a graph rewrite renamed the node (lm_head,
    fused with the logits' Convert).
    """
    import openvino as ov

    core = ov.Core()
    found = []
    for op in ir_model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        try:
            sub = ov.Model([op.input(1).get_source_output()], [], "weight")  # raises if it depends on an input
        except RuntimeError:
            continue
        value = core.compile_model(sub, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request().infer({})
        name = op.get_friendly_name()
        module = name[len(MODULE_PREFIX):].split("/")[0] if name.startswith(MODULE_PREFIX) else None
        found.append((op, module, np.asarray(next(iter(value.values())), dtype=np.float32)))
    return found


def decompress_weights(weights: list[tuple[Any, str | None, np.ndarray]]) -> None:
    """Feed each MatMul of `weights` (from matmul_weights) its f32 value instead of its compressed weight.

    Separates what the CPU plugin's compressed-weight kernels add from the rest of the graph.
    """
    from openvino import opset13 as ops

    for op, _, weight in weights:
        op.input(1).replace_source_output(ops.constant(weight).output(0))


def _linear_modules(model) -> dict[str, Any]:
    """Module path in `model` -> nn.Linear, for the language model and lm_head."""
    import torch

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ("language_model" in name or name == "lm_head")
    }


def _model_path(path: str) -> str:
    """A node's module path as `model` names it: ours are relative to convert.language_module's wrapper
    (decoder.X, lm_head), other converters' (optimum-intel) to the model itself."""
    head, _, rest = path.partition(".")
    if head not in WRAPPER_PARTS:
        return path
    return ".".join([*WRAPPER_PARTS[head], *([rest] if rest else [])])


def _only_fit(linears: dict[str, Any], shape: tuple[int, ...]) -> str:
    """A renamed node's layer: the one unassigned Linear of that weight shape."""
    fits = [name for name, module in linears.items() if tuple(module.weight.shape) == shape]
    if len(fits) != 1:
        raise ValueError(f"cannot tell which layer an IR weight of shape {shape} belongs to ({len(fits)} fit)")
    return fits[0]


def rounded_reference(model, weights: list[tuple[Any, str | None, np.ndarray]]):
    """A float32 copy of transformers `model` with the export's weight rounding (see module docstring);
    `weights` from matmul_weights."""
    import copy

    import torch

    ref = copy.deepcopy(model).float().eval()
    linears = _linear_modules(ref)
    with torch.no_grad():
        for param in ref.parameters():
            param.copy_(param.half().float())
        for op, path, stored in weights:
            weight = stored if op.get_transpose_b() else stored.T
            key = _model_path(path) if path is not None else _only_fit(linears, weight.shape)
            if key not in linears:
                raise ValueError(f"IR weight {path} has no unassigned Linear {key} in the model")
            target = linears.pop(key).weight
            if tuple(target.shape) != weight.shape:
                raise ValueError(f"{key}: IR weight {weight.shape} vs transformers {tuple(target.shape)}")
            target.copy_(torch.from_numpy(weight))
    if linears:
        raise ValueError(f"no IR weight found for {', '.join(sorted(linears))}")
    return ref


def reference_last_logits(ref, embeds: np.ndarray) -> np.ndarray:
    """transformers' last-position logits (decoder + lm_head, no cache) for `embeds` [1, length, hidden]."""
    import torch

    with torch.no_grad():
        hidden = ref.model.language_model(inputs_embeds=torch.from_numpy(embeds)).last_hidden_state
        return ref.lm_head(hidden[:, -1]).float().numpy()[0]


def export_last_logits(compiled, embeds: np.ndarray) -> np.ndarray:
    """Last-position logits of a stateful language model (one fresh infer request, no cache)."""
    length = embeds.shape[1]
    request = compiled.create_infer_request()
    out = request.infer({
        "inputs_embeds": embeds,
        "attention_mask": np.ones((1, length), np.int64),
        "position_ids": np.arange(length, dtype=np.int64)[None],
        "beam_idx": np.zeros(1, np.int32),
    })
    return np.asarray(out["logits"])[0, -1]


def random_embeds(length: int, width: int, scale: float, seed: int = 0) -> np.ndarray:
    """[1, length, width] float32 N(0, scale) inputs: the same draw for the same arguments."""
    return (np.random.default_rng(seed).standard_normal((1, length, width)) * scale).astype(np.float32)


def logit_drift(model, lm_path: str | Path, lengths, *, decompress: bool = False, scale: float = 0.3,
                seed: int = 0) -> list[dict[str, Any]]:  # fmt: skip
    """Per length: max |export - reference| of the last position's logits, and the reference's span.

    decompress: run the IR with its weights decompressed in the graph (see decompress_weights).
    """
    import openvino as ov

    path = Path(lm_path)
    path = path / layout.LANGUAGE_MODEL if path.is_dir() else path
    core = ov.Core()
    ir_model = core.read_model(str(path))
    weights = matmul_weights(ir_model)  # decompressed once, for the reference and for decompress
    ref = rounded_reference(model, weights)
    if decompress:
        decompress_weights(weights)
    compiled = core.compile_model(ir_model, "CPU", EXACT)
    width = model.config.text_config.hidden_size
    rows = []
    for length in lengths:
        embeds = random_embeds(length, width, scale, seed)
        want = reference_last_logits(ref, embeds)
        got = export_last_logits(compiled, embeds)
        rows.append({"length": int(length), "max_abs_diff": float(np.abs(got - want).max()),
                     "logit_span": float(np.abs(want).max())})  # fmt: skip
    return rows
