"""Streaming detokenisation at O(1) per token.

The detokenizer IR costs about a millisecond a call; streaming with it means two
calls per token.  For the two tokenizer kinds LLaVA checkpoints use —
SentencePiece-style BPE with byte fallback (Llama, Mistral, Vicuna, Yi) and
GPT-2 byte-level BPE (Llama 3) — the text of a token is a fixed byte string, so
a stream is the UTF-8 decoding of concatenated bytes.  `PieceDecoder` builds
that table from the export's tokenizer.json; tests check it against the IR.
Tokenizers it does not recognise fall back to `generate.IncrementalDetokenizer`.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from llava_ov.runtime.export import ExportDir

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_table() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = dict.fromkeys(keep), 0
    table = {}
    for b in range(256):
        if b in chars:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_kind(spec: dict | None) -> str | None:
    """'metaspace' for Replace(▁)+ByteFallback(+Strip) decoders, 'bytelevel' for ByteLevel, else None."""
    if not spec:
        return None
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = [p.get("type") for p in parts]
    if "ByteLevel" in types:
        return "bytelevel"
    if "ByteFallback" in types and any(p.get("type") in ("Replace", "Metaspace") for p in parts):
        return "metaspace"
    if spec.get("type") == "Metaspace":
        return "metaspace"
    return None


class PieceDecoder:
    """id -> bytes table; decodes token streams exactly like the tokenizer's decoder (special tokens skipped)."""

    def __init__(self, pieces: list[bytes | None], strip_first_space: bool):
        self.pieces = pieces
        self.strip_first_space = strip_first_space

    @classmethod
    def from_export(cls, export: ExportDir | Path) -> PieceDecoder | None:
        """The vocabulary table of the export's tokenizer.json (None when absent or of another kind)."""
        spec = ExportDir.of(export).tokenizer_json
        if spec is None:
            return None
        kind = _decoder_kind(spec.get("decoder"))
        vocab = spec.get("model", {}).get("vocab")
        if kind is None or not isinstance(vocab, dict):
            return None
        size = max([*vocab.values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
        pieces: list[bytes | None] = [None] * size
        convert = _metaspace_bytes if kind == "metaspace" else _bytelevel_converter()
        for piece, idx in vocab.items():
            pieces[idx] = convert(piece)
        for token in spec.get("added_tokens", []):
            pieces[token["id"]] = None if token.get("special") else token["content"].encode()
        strip = kind == "metaspace" and _strips_first_space(spec.get("decoder"))
        return cls(pieces, strip)

    def stream(self) -> PieceStream:
        return PieceStream(self)

    def decode(self, ids) -> str:
        stream = self.stream()
        return "".join(stream.push(int(i)) for i in ids) + stream.flush()


def _metaspace_bytes(piece: str) -> bytes:
    match = _BYTE_PIECE.match(piece)
    return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()


def _bytelevel_converter():
    table = _byte_level_table()
    return lambda piece: bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()


def _strips_first_space(spec: dict) -> bool:
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    return any(p.get("type") == "Strip" and p.get("start", 0) >= 1 for p in parts) or any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in parts
    )


class PieceStream:
    """Incremental UTF-8 decoding of one generation; never emits a partial character."""

    def __init__(self, decoder: PieceDecoder):
        self.decoder = decoder
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False

    def push(self, token_id: int) -> str:
        pieces = self.decoder.pieces
        piece = pieces[token_id] if 0 <= token_id < len(pieces) else None
        if not piece:
            return ""
        text = self._utf8.decode(piece)
        if not self._started and text:
            self._started = True
            if self.decoder.strip_first_space and text.startswith(" "):
                text = text[1:]
        return text

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
