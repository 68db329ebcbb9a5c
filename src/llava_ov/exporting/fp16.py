"""fp16 weight storage that keeps precision-sensitive constants in fp32.

`ov.save_model(..., compress_to_fp16=True)` stores every float constant in fp16,
weights and non-weights alike.  For the rotary position embedding that is fatal
at real prompt lengths: the angle of position p is p * inv_freq, and inv_freq
rounded to fp16 (relative error up to 2**-11) puts the angle off by p * 2**-11
radians: 2 rad at position 4,000.  A 3-layer model's last-position logits then
differ from transformers on the same fp16-rounded weights by 0.04 at 20 tokens and
8.8 at 4,000 (see docs/conversion.md, "fp16 fidelity").

So before saving, every float constant in the input cone of a Sin or Cos node (the
rotary frequencies: data, whatever the model family's op names are) is set aside,
the model's other float constants are compressed to fp16 in place (as
compress_to_fp16 would), and the set-aside constants are put back in fp32.
OpenVINO's own DisableFP16Compression mark would do this, but it cannot be set from
Python (a string rt_info entry of that name is not honoured).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TRIG_OPS = ("Sin", "Cos")


def trig_cone_constants(model) -> list[Any]:
    """Every Constant node in the input cone of a Sin/Cos node (the walk stops at ShapeOf: shapes only)."""
    stack = [op for op in model.get_ordered_ops() if op.get_type_name() in TRIG_OPS]
    seen: set[int] = set()
    found: list[Any] = []
    while stack:
        node = stack.pop()
        if node.get_instance_id() in seen:
            continue
        seen.add(node.get_instance_id())
        if node.get_type_name() == "Constant":
            found.append(node)
        elif node.get_type_name() not in ("ShapeOf", "Parameter"):
            stack.extend(port.get_source_output().get_node() for port in node.inputs())
    return found


def rotary_constants(model) -> list[tuple[np.ndarray, list[tuple[Any, int]]]]:
    """(fp32 copy, consumer inputs as (node, input index)) of every float constant that feeds a Sin/Cos node."""
    return [
        (np.array(node.get_data(), dtype=np.float32),
         [(port.get_node(), port.get_index()) for port in node.output(0).get_target_inputs()])
        for node in trig_cone_constants(model)
        if node.get_element_type().is_real()
    ]  # fmt: skip


def compress_keeping_rotary_f32(model) -> int:
    """Compress `model`'s float constants to fp16 in place, except the rotary ones; returns how many were kept.

    Each rotary constant's consumers are remembered before compressing; afterwards the decompression Convert
    each of them now reads is replaced by the original fp32 values (matched by consumer, never by name).
    """
    from openvino import opset13 as ops
    from openvino._offline_transformations import compress_model_transformation

    keep = rotary_constants(model)
    compress_model_transformation(model)  # each compressed constant becomes an f16 Constant + Convert
    kept = 0
    for values, consumers in keep:
        original = ops.constant(values)
        for node, index in consumers:
            source = node.input(index).get_source_output()
            convert = source.get_node()
            if convert.get_type_name() != "Convert" or list(source.get_shape()) != list(values.shape):
                continue  # not compressed (already f32 or out of fp16 range): nothing to restore
            node.input(index).replace_source_output(original.output(0))
            kept += 1
    return kept


def f16_rotary_constants(model) -> list[str]:
    """Names of rotary constants stored in fp16 (exports made before this fix, other converters)."""
    cone = trig_cone_constants(model)
    return [node.get_friendly_name() for node in cone if node.get_element_type().to_string() == "f16"]
