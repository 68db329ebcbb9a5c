"""OpenVINO graph surgery that turns a traced decoder into a stateful one.

After tracing, the language model has explicit `past_key_values.{i}.key/value`
inputs and `present.{i}.key/value` outputs.  Here they become internal state
(ReadValue/Assign pairs), a `beam_idx` input reorders the cache along the batch
axis before use, and each state starts as zeros shaped from the batch size of
`inputs_embeds` with an empty sequence axis.  This is the layout optimum-intel
produces and openvino_genai reads (it finds the sequence axis as the dimension
that is 0 in the state initialiser).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
from openvino import opset13

from llava_ov.common.layout import KV_BATCH_AXIS as BATCH_AXIS


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the key/value tensors, in layer order."""
    inputs, outputs = [], []
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


def name_ports(model: ov.Model, input_names: list[str], output_names: list[str]) -> None:
    """Give the traced model's inputs and outputs stable tensor names, in order."""
    for port, name in zip(model.inputs, input_names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, output_names, strict=True):
        port.get_tensor().set_names({name})


def fuse_beam_idx(model: ov.Model, kv_inputs: list[str]) -> None:
    """Add an i32 `beam_idx` input and gather every cache input by it on the batch axis."""
    beam_idx = opset13.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([-1]))
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    model.add_parameters([beam_idx])
    axis = opset13.constant(np.int64(BATCH_AXIS))
    for name in kv_inputs:
        port = model.input(name)
        consumers = port.get_target_inputs()
        gathered = opset13.gather(port, beam_idx, axis)
        for consumer in consumers:
            consumer.replace_source_output(gathered.output(0))
    model.validate_nodes_and_infer_types()


def init_states_from_batch(model: ov.Model, batch_source: str = "inputs_embeds") -> None:
    """Make every state start as zeros of shape [batch, heads, 0, head_dim]."""
    shape = opset13.shape_of(model.input(batch_source), output_type="i64")
    batch = opset13.gather(shape, opset13.constant(np.array([0], np.int64)), opset13.constant(np.int64(0)))
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims = [d.min_length for d in op.get_output_partial_shape(0)]
        parts = [opset13.constant(np.array([d], np.int64)) for d in dims]
        parts[BATCH_AXIS] = batch
        zero = opset13.constant(np.array(0, dtype=op.get_output_element_type(0).to_dtype()))
        op.set_arguments([opset13.broadcast(zero, opset13.concat(parts, axis=0))])
    model.validate_nodes_and_infer_types()


def make_stateful(model: ov.Model, num_layers: int) -> None:
    """Move the KV cache inside `model` (in place): beam_idx, state, state initialiser."""
    from openvino._offline_transformations import apply_make_stateful_transformation

    kv_in, kv_out = kv_names(num_layers)
    fuse_beam_idx(model, kv_in)
    apply_make_stateful_transformation(model, dict(zip(kv_in, kv_out)))
    init_states_from_batch(model)
