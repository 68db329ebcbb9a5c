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


def trig_cone_constants(model) -> dict[str, Any]:
    """friendly name -> Constant node, for every constant in the input cone of a Sin/Cos node."""
    stack = [op for op in model.get_ordered_ops() if op.get_type_name() in TRIG_OPS]
    seen: set[str] = set()
    found: dict[str, Any] = {}
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        if node.get_type_name() == "Constant":
            found[name] = node
            continue
        stack.extend(port.get_source_output().get_node() for port in node.inputs())
    return found


def rotary_constants(model) -> dict[str, np.ndarray]:
    """friendly name -> fp32 copy of every float constant that feeds a Sin/Cos node."""
    return {
        name: np.array(node.get_data(), dtype=np.float32)
        for name, node in trig_cone_constants(model).items()
        if node.get_element_type().is_real()
    }


def compress_keeping_rotary_f32(model) -> list[str]:
    """Compress `model`'s float constants to fp16 in place, except the rotary ones; returns those kept."""
    from openvino import opset13 as ops
    from openvino._offline_transformations import compress_model_transformation

    keep = rotary_constants(model)
    compress_model_transformation(model)  # each compressed constant becomes f16 + a Convert of the same name
    restored: list[str] = []
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() != "Convert" or name not in keep:
            continue
        if op.input(0).get_source_output().get_node().get_type_name() != "Constant":
            continue
        original = ops.constant(keep[name])
        original.set_friendly_name(name)
        op.output(0).replace(original.output(0))
        restored.append(name)
    return restored


def f16_rotary_constants(model) -> list[str]:
    """Names of rotary constants stored in fp16 (exports made before this fix, other converters)."""
    return [name for name, node in trig_cone_constants(model).items() if node.get_element_type().to_string() == "f16"]
