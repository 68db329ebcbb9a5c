"""The language model as a PagedAttention model: derived at load time, run over many sequences.

The export on disk stays the stateful, optimum-compatible IR. At load time OpenVINO's own
`paged_attention_transformation` (the one openvino_genai applies to the same file) turns it
into a model whose KV cache is a pool of blocks passed in as `key_cache.N` / `value_cache.N`
tensors, and a Gather on a new `logits_indices` input picks the rows that need logits before
the LM head (a 2,000-token prefill computes one row of logits, not 2,000). The export's
text-embedding graph is moved inside too: the model takes token ids, and the image features
of a chunk are scattered over their rows, so a decode step is one OpenVINO call, not two.

`PagedLanguageModel.forward(batch)` runs one packed forward of any number of sequences:
tokens of all sequences side by side, each with its past length and block table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from openvino import opset13

from llava_ov.errors import LlavaOvError

LOGITS_INDICES = "logits_indices"
INPUT_IDS = "input_ids"
IMAGE_ROWS = "image_rows"
IMAGE_EMBEDS = "image_embeds"
_NO_ROWS = np.zeros(0, np.int64)


@dataclass
class ForwardBatch:
    """One packed forward: per sequence a chunk of tokens, its cached length and its blocks."""

    ids: np.ndarray  # [tokens] token ids, sequences one after the other
    positions: np.ndarray  # [tokens] position id of every token
    past_lens: list[int]  # per sequence: tokens already in its KV blocks
    chunk_lens: list[int]  # per sequence: tokens in this forward
    block_tables: list[list[int]]  # per sequence: its blocks, covering past + chunk
    logits_rows: list[int]  # rows (indices into tokens) whose logits are returned, in order
    image_rows: np.ndarray = field(default_factory=lambda: _NO_ROWS)  # rows (into tokens) embedded by...
    image_embeds: np.ndarray | None = None  # ...these features [len(image_rows), hidden] instead of their ids


def add_logits_indices(model: ov.Model) -> None:
    """Gather the LM head's input rows by a new `logits_indices` input (token axis 0), as genai does."""
    node = model.output(0).get_node().input_value(0).get_node()
    while node.get_type_name() in ("Convert", "Add", "Transpose", "Multiply"):  # what may follow the LM head
        node = node.input_value(0).get_node()
    if node.get_type_name() != "MatMul":
        raise LlavaOvError(f"cannot find the LM head in the language model (found {node.get_type_name()})")
    indices = _parameter(LOGITS_INDICES, [-1], ov.Type.i64)
    gathered = opset13.gather(node.input_value(0), indices, opset13.constant(np.int64(0)))
    node.input(0).replace_source_output(gathered.output(0))
    model.add_parameters([indices])
    model.validate_nodes_and_infer_types()


def embed_inside(model: ov.Model, embeddings: ov.Model) -> None:
    """Replace the LM's `inputs_embeds` by the text-embedding graph of `input_ids`, with image
    features scattered over rows `image_rows` (ScatterUpdate along the token axis)."""
    (old,) = [p for p in model.get_parameters() if "inputs_embeds" in p.output(0).get_names()]
    (source,) = embeddings.get_parameters()  # input_ids [batch, tokens]
    text = embeddings.output(0).get_node().input_value(0)  # [batch, tokens, hidden]
    hidden = text.get_partial_shape()[2]
    if old.get_partial_shape().rank.get_length() != 2 or not hidden.is_static:
        raise LlavaOvError(f"unexpected embedding shapes: LM {old.get_partial_shape()}, text {text.get_partial_shape()}")
    ids = _parameter(INPUT_IDS, [-1], ov.Type.i64)
    rows = _parameter(IMAGE_ROWS, [-1], ov.Type.i64)
    image = _parameter(IMAGE_EMBEDS, [-1, hidden.get_length()], old.get_element_type())
    batched = opset13.convert(opset13.unsqueeze(ids, opset13.constant(np.int64(0))), source.get_element_type())
    for target in list(source.output(0).get_target_inputs()):
        target.replace_source_output(batched.output(0))
    flat = opset13.squeeze(text, opset13.constant(np.int64(0)))
    if flat.get_output_element_type(0) != old.get_element_type():
        flat = opset13.convert(flat, old.get_element_type())
    merged = opset13.scatter_update(flat, rows, image, opset13.constant(np.int64(0)))
    for target in list(old.output(0).get_target_inputs()):
        target.replace_source_output(merged.output(0))
    model.remove_parameter(old)
    model.add_parameters([ids, rows, image])
    model.validate_nodes_and_infer_types()


def _parameter(name: str, shape: list[int], element_type: ov.Type) -> ov.Node:
    node = opset13.parameter(shape, element_type, name=name)
    node.output(0).get_tensor().set_names({name})
    return node


def derive_paged_model(core: ov.Core, xml: Path, embeddings_xml: Path) -> ov.Model:
    """Read the exported stateful LM and turn it into the PagedAttention form (in memory only)."""
    from openvino._offline_transformations import paged_attention_transformation

    model = core.read_model(xml)
    paged_attention_transformation(model, False, False)
    add_logits_indices(model)
    embed_inside(model, core.read_model(embeddings_xml))
    return model


DECODE_VARIANT_TOKENS = 32  # steps of at most this many tokens run on the decode variant (measured crossover)


class PagedLanguageModel:
    """A compiled PagedAttention LM and its KV block pool tensors.

    `decode`: optionally a second compilation of the same model (another precision) that runs
    the steps of at most `decode_tokens` tokens; both share the KV block tensors."""

    def __init__(
        self, compiled: ov.CompiledModel, decode: ov.CompiledModel | None = None,
        decode_tokens: int = DECODE_VARIANT_TOKENS,
    ):  # fmt: skip
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.decode_request = decode.create_infer_request() if decode is not None else None
        self.decode_tokens = decode_tokens
        self.steps = {"main": 0, "decode": 0}  # forwards run by each compilation
        names = [port.get_any_name() for port in compiled.inputs]
        self.key_names = sorted((n for n in names if n.startswith("key_cache.")), key=_layer)
        self.value_names = sorted((n for n in names if n.startswith("value_cache.")), key=_layer)
        if not self.key_names or len(self.key_names) != len(self.value_names):
            raise LlavaOvError("the language model has no paged KV cache inputs")
        if decode is not None:
            self._check_same_cache(decode)
        self.num_blocks = 0
        self.hidden_size = self._port(IMAGE_EMBEDS).get_partial_shape()[1].get_length()

    def _port(self, name: str):
        return self.compiled.input(name)

    def _block_shape(self, name: str) -> list[int]:
        shape = self._port(name).get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape][1:]
        if None in dims:
            raise LlavaOvError(f"the device reports no static block shape for {name} ({shape})")
        return dims

    def _check_same_cache(self, other: ov.CompiledModel) -> None:
        """The decode variant must read and write the very same block tensors."""
        for name in self.key_names + self.value_names:
            ours, theirs = self._port(name), other.input(name)
            if (ours.get_partial_shape(), ours.get_element_type()) != (theirs.get_partial_shape(), theirs.get_element_type()):
                raise LlavaOvError(
                    f"the decode variant's KV cache differs from the main model's ({name}: "
                    f"{theirs.get_element_type()} {theirs.get_partial_shape()} vs {ours.get_element_type()} "
                    f"{ours.get_partial_shape()})"
                )

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
            for request in self._requests():
                request.set_tensor(name, tensor)
        self.num_blocks = num_blocks
        if self.decode_request is not None:
            self._warm_up_decode()

    def _warm_up_decode(self) -> None:
        """One token through the decode variant, so it repacks its weights at load and not during the
        first answer's decode (a stall of seconds at 7B). Writes block 0, which holds nothing yet."""
        one = ForwardBatch(np.zeros(1, np.int64), np.zeros(1, np.int64), [0], [1], [[0]], [0])
        self._run(self.decode_request, one, None)

    def forward(self, batch: ForwardBatch, while_running: Callable[[], None] | None = None) -> np.ndarray:
        """Run one packed forward; returns logits [len(logits_rows), vocab]: a view of the output,
        valid until the next forward (copy what must outlive it).

        `while_running` is called once the forward has started (OpenVINO computes meanwhile)."""
        return self._run(self._request_for(len(batch.ids)), batch, while_running)

    def _run(self, request: ov.InferRequest, batch: ForwardBatch, while_running: Callable[[], None] | None) -> np.ndarray:
        begins = np.concatenate([[0], np.cumsum(batch.chunk_lens)]).astype(np.int32)
        block_begins = np.concatenate([[0], np.cumsum([len(t) for t in batch.block_tables])]).astype(np.int32)
        blocks = np.concatenate([np.asarray(t, np.int32) for t in batch.block_tables]).astype(np.int32)
        context = max(p + c for p, c in zip(batch.past_lens, batch.chunk_lens))
        image = batch.image_embeds if batch.image_embeds is not None else np.zeros((0, self.hidden_size))
        inputs: dict[str, Any] = {
            INPUT_IDS: np.ascontiguousarray(batch.ids, dtype=np.int64),
            IMAGE_ROWS: np.ascontiguousarray(batch.image_rows, dtype=np.int64),
            IMAGE_EMBEDS: np.ascontiguousarray(image, dtype=np.float32),
            "position_ids": np.ascontiguousarray(batch.positions, dtype=np.int64),
            "past_lens": np.asarray(batch.past_lens, np.int32),
            "subsequence_begins": begins,
            "block_indices_begins": block_begins,
            "block_indices": blocks,
            "max_context_len": np.array(context, np.int32),
            LOGITS_INDICES: np.asarray(batch.logits_rows, np.int64),
        }
        for name, value in inputs.items():
            request.set_tensor(name, ov.Tensor(value))
        request.start_async()
        try:
            if while_running is not None:
                while_running()
        finally:
            request.wait()
        logits = request.get_tensor("logits").data  # [rows, 1, vocab]
        return logits[:, -1, :]

    def _requests(self) -> list[ov.InferRequest]:
        return [self.request] + ([self.decode_request] if self.decode_request is not None else [])

    def _request_for(self, tokens: int) -> ov.InferRequest:
        if self.decode_request is not None and tokens <= self.decode_tokens:
            self.steps["decode"] += 1
            return self.decode_request
        self.steps["main"] += 1
        return self.request


def _layer(name: str) -> int:
    return int(name.rsplit(".", 1)[1])
