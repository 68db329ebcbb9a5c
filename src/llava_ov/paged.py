"""The language model as a PagedAttention model: derived at load time, run over many sequences.

The export on disk stays the stateful, optimum-compatible IR. At load time OpenVINO's own
`paged_attention_transformation` (the one openvino_genai applies to the same file) turns it
into a model whose KV cache is a pool of blocks passed in as `key_cache.N` / `value_cache.N`
tensors, and a Gather on a new `logits_indices` input picks the rows that need logits before
the LM head (a 2,000-token prefill computes one row of logits, not 2,000).

`PagedLanguageModel.forward(batch)` runs one packed forward of any number of sequences:
tokens of all sequences side by side, each with its past length and block table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from openvino import opset13

from .errors import LlavaOvError

LOGITS_INDICES = "logits_indices"


@dataclass
class ForwardBatch:
    """One packed forward: per sequence a chunk of tokens, its cached length and its blocks."""

    embeds: np.ndarray  # [tokens, hidden], sequences one after the other
    positions: np.ndarray  # [tokens] position id of every token
    past_lens: list[int]  # per sequence: tokens already in its KV blocks
    chunk_lens: list[int]  # per sequence: tokens in this forward
    block_tables: list[list[int]]  # per sequence: its blocks, covering past + chunk
    logits_rows: list[int]  # rows (indices into tokens) whose logits are returned, in order


def add_logits_indices(model: ov.Model) -> None:
    """Gather the LM head's input rows by a new `logits_indices` input (token axis 0), as genai does."""
    node = model.output(0).get_node().input_value(0).get_node()
    while node.get_type_name() in ("Convert", "Add", "Transpose", "Multiply"):  # what may follow the LM head
        node = node.input_value(0).get_node()
    if node.get_type_name() != "MatMul":
        raise LlavaOvError(f"cannot find the LM head in the language model (found {node.get_type_name()})")
    indices = opset13.parameter([-1], ov.Type.i64, name=LOGITS_INDICES)
    indices.output(0).get_tensor().set_names({LOGITS_INDICES})
    gathered = opset13.gather(node.input_value(0), indices, opset13.constant(np.int64(0)))
    node.input(0).replace_source_output(gathered.output(0))
    model.add_parameters([indices])
    model.validate_nodes_and_infer_types()


def derive_paged_model(core: ov.Core, xml: Path) -> ov.Model:
    """Read the exported stateful LM and turn it into the PagedAttention form (in memory only)."""
    from openvino._offline_transformations import paged_attention_transformation

    model = core.read_model(xml)
    paged_attention_transformation(model, False, False)
    add_logits_indices(model)
    return model


class PagedLanguageModel:
    """A compiled PagedAttention LM and its KV block pool tensors."""

    def __init__(self, compiled: ov.CompiledModel):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        names = [port.get_any_name() for port in compiled.inputs]
        self.key_names = sorted((n for n in names if n.startswith("key_cache.")), key=_layer)
        self.value_names = sorted((n for n in names if n.startswith("value_cache.")), key=_layer)
        if not self.key_names or len(self.key_names) != len(self.value_names):
            raise LlavaOvError("the language model has no paged KV cache inputs")
        self.num_blocks = 0

    def _port(self, name: str):
        return self.compiled.input(name)

    def _block_shape(self, name: str) -> list[int]:
        shape = self._port(name).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape][1:]
        if None in dims:
            raise LlavaOvError(f"the device reports no static block shape for {name} ({shape})")
        return dims

    @property
    def block_size(self) -> int:
        """Tokens per block: the value cache's [blocks, heads, block_size, head_size(+scales)]."""
        return self._block_shape(self.value_names[0])[1]

    @property
    def bytes_per_block(self) -> int:
        total = 0
        for name in self.key_names + self.value_names:
            total += int(np.prod(self._block_shape(name))) * self._port(name).get_element_type().size
        return total

    def allocate(self, num_blocks: int) -> None:
        """Allocate the block pool: one tensor per layer for keys and one for values."""
        for name in self.key_names + self.value_names:
            port = self._port(name)
            tensor = ov.Tensor(port.get_element_type(), ov.Shape([num_blocks, *self._block_shape(name)]))
            self.request.set_tensor(name, tensor)
        self.num_blocks = num_blocks

    def forward(self, batch: ForwardBatch) -> np.ndarray:
        """Run one packed forward; returns logits [len(logits_rows), vocab] (a copy)."""
        begins = np.concatenate([[0], np.cumsum(batch.chunk_lens)]).astype(np.int32)
        block_begins = np.concatenate([[0], np.cumsum([len(t) for t in batch.block_tables])]).astype(np.int32)
        blocks = np.concatenate([np.asarray(t, np.int32) for t in batch.block_tables]).astype(np.int32)
        context = max(p + c for p, c in zip(batch.past_lens, batch.chunk_lens))
        inputs: dict[str, Any] = {
            "inputs_embeds": np.ascontiguousarray(batch.embeds, dtype=np.float32),
            "position_ids": np.ascontiguousarray(batch.positions, dtype=np.int64),
            "past_lens": np.asarray(batch.past_lens, np.int32),
            "subsequence_begins": begins,
            "block_indices_begins": block_begins,
            "block_indices": blocks,
            "max_context_len": np.array(context, np.int32),
            LOGITS_INDICES: np.asarray(batch.logits_rows, np.int64),
        }
        for name, value in inputs.items():
            self.request.set_tensor(name, ov.Tensor(value))
        self.request.infer()
        logits = self.request.get_tensor("logits").data  # [rows, 1, vocab]
        return logits[:, -1, :].copy()


def _layer(name: str) -> int:
    return int(name.rsplit(".", 1)[1])
