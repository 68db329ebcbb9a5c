"""The random checkpoints' real vocabularies (exporting/vocabularies.py) against their own reference encoders.

Qwen and Llama-3 are byte-level BPE vocabularies shipped as tiktoken files: our
Hugging Face tokenizers (built with transformers' TikTokenConverter from ranks we read
ourselves, with our copy of the pre-tokenizer regex) must encode exactly as the
packages' own tiktoken encoders (dashscope's QwenTokenizer, llama-models' Tokenizer:
their own file readers and regexes), and so must the saved-and-reloaded tokenizer and
the openvino_tokenizers model the export makes of it.
"""

from __future__ import annotations

import json

import pytest

from llava_ov.exporting import random_models, vocabularies
from llava_ov.exporting.random_models import RandomModelSpec, build_tokenizer, scaled_config_dict
from llava_ov.exporting.vocabularies import LLAMA3, MISTRAL_SPM, QWEN, YI_STAND_IN, vocabulary_for

pytest.importorskip("transformers")
pytest.importorskip("tiktoken")  # the [dev] extra has it: this file runs in CI

# English, contractions, code, CJK, emoji (multi-codepoint too), digits in runs, whitespace runs,
# tabs, CR/LF, other scripts, accents (NFC: Qwen's tokenizer normalises, tiktoken does not).
SAMPLE = [
    "Hello world! What's in this picture? It's a cat, isn't it? We'LL see; they'd've known.",
    "'tis 'Twas I'dn't DON'T 'Sup rock'n'roll 'quoted' O'Neill's ''double'' It'still we'very",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", a[i]); }  /* C */",
    "你好，世界！这是一只猫。日本語のテキストも。한국어 문장입니다.",
    "Emoji 🙂😀🎉 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✔️ ❤️",
    "Numbers 1234567890 3.14159 -42 1,000,000 2024-06-01 0x1F 007",
    "   leading spaces,    runs of     spaces, trailing   ",
    "\n\n\nnewlines\r\n\r\nCRLF\n \n\t\t tabs \t\n",
    "Привет, мир! Γειά σου κόσμε! مرحبا بالعالم! שלום עולם",
    "café naïve façade Ærøskøbing Straße résumé",
    "", " ", "a", "\n",
    "<image>-like text that is not a token: <im_start> <|notatoken|>",
]


@pytest.fixture(scope="module")
def references():
    """The packages' own tiktoken encoders (their own readers and regexes), as plain-text encoders."""
    from dashscope.tokenizers.qwen_tokenizer import QwenTokenizer
    from llama_models.llama3.tokenizer import Tokenizer

    qwen = QwenTokenizer(str(QWEN.file()))._tokenizer
    llama = Tokenizer(LLAMA3.file()).model
    return {QWEN.name: qwen.encode_ordinary, LLAMA3.name: llama.encode_ordinary}


def test_the_tiktoken_files_and_their_sizes():
    for vocab in (QWEN, LLAMA3):
        ranks = vocabularies.read_tiktoken_ranks(vocab.file())
        assert len(ranks) == vocab.base_size and sorted(ranks.values()) == list(range(vocab.base_size))
    assert len(vocabularies.LLAMA3_SPECIAL_TOKENS) == 256 == len(set(vocabularies.LLAMA3_SPECIAL_TOKENS))


@pytest.mark.parametrize("vocab", [QWEN, LLAMA3], ids=lambda v: v.name)
def test_encodes_as_the_reference_tiktoken_encoder(vocab, references, tmp_path):
    from transformers import AutoTokenizer

    tok = vocabularies.base_tokenizer(vocab)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    reference = references[vocab.name]
    text = "\n".join(SAMPLE)
    for sample in [*SAMPLE, text]:
        want = reference(sample)
        assert tok.encode(sample, add_special_tokens=False) == want, sample
        assert reloaded.encode(sample, add_special_tokens=False) == want, sample
        assert tok.decode(want) == sample
    # digits: one per token in Qwen (its ranks have no multi-digit token), up to three in Llama-3
    assert len(tok.encode("1234567890", add_special_tokens=False)) == (10 if vocab is QWEN else 4)


def test_same_ranks_and_regex_as_the_reference(references, tmp_path):
    """Every rank decodes to the reference's bytes, and the split regex is the package's own."""
    from dashscope.tokenizers.qwen_tokenizer import PAT_STR
    from llama_models.llama3.tokenizer import Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    for vocab, pattern in ((QWEN, PAT_STR), (LLAMA3, Tokenizer.pat_str)):
        tok = vocabularies.base_tokenizer(vocab)
        encoding = references[vocab.name].__self__
        pieces = tok.convert_ids_to_tokens(list(range(vocab.base_size)))
        got = [bytes(to_byte[c] for c in piece) for piece in pieces]
        assert got == [encoding.decode_single_token_bytes(i) for i in range(vocab.base_size)]
        tok.save_pretrained(tmp_path / vocab.name)
        saved = json.loads((tmp_path / vocab.name / "tokenizer.json").read_text())
        split = saved["pre_tokenizer"]["pretokenizers"][0]
        assert split["type"] == "Split" and split["pattern"]["Regex"] == pattern


def test_special_tokens_and_bos():
    qwen = vocabularies.base_tokenizer(QWEN)
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert (qwen.bos_token, qwen.eos_token, qwen.pad_token) == (None, "<|im_end|>", "<|endoftext|>")
    assert qwen.encode("<|im_start|>user\nHi<|im_end|>")[:1] == [151644]  # no BOS; specials are one token
    assert len(qwen) == 151646

    llama = vocabularies.base_tokenizer(LLAMA3)
    named = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
             "<|end_header_id|>": 128007, "<|eot_id|>": 128009, "<|reserved_special_token_4|>": 128008,
             "<|reserved_special_token_250|>": 128255}  # fmt: skip
    assert llama.convert_tokens_to_ids(list(named)) == list(named.values())
    assert len(llama) == 128256
    ids = llama.encode("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    assert ids[:2] == [128000, 128006] and ids[-1] == 128009 and ids.count(128000) == 1  # BOS added once


def _config_folder(tmp_path, monkeypatch, name, config, added=None):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if added is not None:
        (folder / "added_tokens.json").write_text(json.dumps(added))
    real = random_models.model_config_dir
    monkeypatch.setattr(random_models, "model_config_dir", lambda n: folder if n == name else real(n))
    return folder


QWEN_ADDED = {"<image>": 151646, "<video>": 151647, "<|endoftext|>": 151643, "<|im_end|>": 151645,
              "<|im_start|>": 151644}  # fmt: skip


def test_checkpoint_tokens_land_on_their_ids_and_reload(tmp_path, monkeypatch, references):
    from transformers import AutoTokenizer

    config = {"image_token_index": 151646, "text_config": {"model_type": "qwen2", "vocab_size": 152000}}
    _config_folder(tmp_path, monkeypatch, "qwen-toy", config, QWEN_ADDED)
    tok = build_tokenizer(None, "qwen-toy")
    assert tok.convert_tokens_to_ids(["<image>", "<video>"]) == [151646, 151647]
    assert (tok.image_token, tok.video_token, tok.padding_side) == ("<image>", "<video>", "left")
    tok.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    text = "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"
    ids = reloaded.encode(text)
    assert ids == tok.encode(text) and ids.count(151646) == 1 and ids[0] == 151644
    assert reloaded.encode(SAMPLE[3], add_special_tokens=False) == references[QWEN.name](SAMPLE[3])

    config = {"image_token_index": 128256, "text_config": {"model_type": "llama", "vocab_size": 128320}}
    folder = _config_folder(tmp_path, monkeypatch, "llama3-toy", config, {"<image>": 128256, "<pad>": 128257})
    names = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|end_of_text|>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(names))  # named tokens set after the added ones
    tok = build_tokenizer(None, "llama3-toy")
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [128256, 128257]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<pad>")
    assert tok.encode("<image>\nHi") == [128000, 128256, *references[LLAMA3.name]("\nHi")]
    tok.save_pretrained(tmp_path / "saved-llama3")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved-llama3")
    assert reloaded.encode("<image>\nHi") == tok.encode("<image>\nHi") and reloaded.pad_token_id == 128257


def test_without_added_tokens_json_the_config_and_special_tokens_map_name_them(tmp_path, monkeypatch):
    """llama3-llava-next-8b-hf's files: <image> from the config's id, then special_tokens_map's <pad> after it."""
    config = {"image_token_index": 128256, "text_config": {"model_type": "llama", "vocab_size": 128320}}
    folder = _config_folder(tmp_path, monkeypatch, "llama3-no-added", config)
    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": {"content": "<pad>"}}
    (folder / "special_tokens_map.json").write_text(json.dumps(names))
    tok = build_tokenizer(None, "llama3-no-added")
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [128256, 128257] and tok.pad_token_id == 128257
    assert tok.eos_token_id == 128009 and len(tok) == 128258


def test_a_token_off_its_id_is_a_clear_error(tmp_path, monkeypatch):
    config = {"text_config": {"model_type": "qwen2", "vocab_size": 152000}}
    _config_folder(tmp_path, monkeypatch, "qwen-gap", config, {"<image>": 151650})
    with pytest.raises(ValueError, match="did not land on their ids.*<image>"):
        build_tokenizer(None, "qwen-gap")
    _config_folder(tmp_path, monkeypatch, "qwen-moved", config, {"<|im_end|>": 151646})
    with pytest.raises(ValueError, match="already in the vocabulary on other ids.*im_end"):
        build_tokenizer(None, "qwen-moved")


def test_vocabulary_choice():
    assert vocabulary_for({"text_config": {"model_type": "qwen2", "vocab_size": 152064}}) is QWEN
    assert vocabulary_for({"text_config": {"model_type": "llama", "vocab_size": 128320}}) is LLAMA3
    assert vocabulary_for({"text_config": {"model_type": "llama", "vocab_size": 64064}}) is YI_STAND_IN
    assert vocabulary_for({"text_config": {"model_type": "mistral", "vocab_size": 32064}}) is MISTRAL_SPM
    assert vocabulary_for({"text_config": {"vocab_size": 32064}}) is MISTRAL_SPM
    for name in ("llava-1.5-7b-hf", "llava-v1.6-mistral-7b-hf", "LLaVA-NeXT-Video-7B-hf", "vip-llava-13b-hf"):
        config = json.loads((random_models.model_config_dir(name) / "config.json").read_text())
        assert vocabulary_for(config) is MISTRAL_SPM


def test_yi_stand_in_moves_the_config_ids():
    tok = build_tokenizer(None, "llava-v1.6-34b-hf")
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<image>"]) == [32000, 32001, 32002]
    assert tok.eos_token == "<|im_end|>" and tok.encode("<|im_start|>user")[0] == 32000  # no BOS, as Yi
    cfg = scaled_config_dict(RandomModelSpec("llava-v1.6-34b-hf"))
    assert cfg["image_token_index"] == 32002 and cfg["text_config"]["eos_token_id"] == 32001
    assert cfg["text_config"]["pad_token_id"] == tok.convert_tokens_to_ids("<unk>") == 0
    assert cfg["text_config"]["vocab_size"] >= len(tok)


def _shipped_configs():
    root = random_models.model_config_dir("llava-1.5-7b-hf").parent
    return sorted(p.name for p in root.iterdir() if (p / "config.json").exists())


@pytest.mark.parametrize("name", _shipped_configs())
def test_every_shipped_config_gets_a_tokenizer_that_fits_it(name):
    cfg = scaled_config_dict(RandomModelSpec(name))
    tok = build_tokenizer(None, name)
    assert tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    if "video_token_index" in cfg:
        assert tok.convert_tokens_to_ids("<video>") == cfg["video_token_index"]
    assert len(tok) <= cfg["text_config"]["vocab_size"]
    eos = cfg["text_config"].get("eos_token_id")
    if eos is not None:
        assert all(0 <= i < len(tok) for i in (eos if isinstance(eos, list) else [eos]))
    if vocabulary_for(cfg) is not MISTRAL_SPM:  # the chat models: the tokenizer's eos is the config's
        assert tok.eos_token_id == eos


@pytest.mark.parametrize("vocab", [QWEN, LLAMA3], ids=lambda v: v.name)
def test_openvino_tokenizer_gives_the_same_ids(vocab, tmp_path, monkeypatch):
    """The export's OV tokenizer/detokenizer (convert.write_tokenizers' call) agree with the HF tokenizer."""
    ov = pytest.importorskip("openvino")
    openvino_tokenizers = pytest.importorskip("openvino_tokenizers")

    added = QWEN_ADDED if vocab is QWEN else {"<image>": 128256, "<pad>": 128257}
    config = {"text_config": {"model_type": "qwen2" if vocab is QWEN else "llama", "vocab_size": 152000}}
    _config_folder(tmp_path, monkeypatch, f"{vocab.name}-ov", config, added)
    tok = build_tokenizer(None, f"{vocab.name}-ov")
    ov_tok, ov_detok = openvino_tokenizers.convert_tokenizer(tok, with_detokenizer=True, skip_special_tokens=True)
    core = ov.Core()
    encode, decode = core.compile_model(ov_tok, "CPU"), core.compile_model(ov_detok, "CPU")
    prompt = "<|im_start|>user <image>\nHi<|im_end|>" if vocab is QWEN else "<image>\nHi<|eot_id|>"
    for sample in [*[s for s in SAMPLE if s], prompt]:
        want = tok(sample)["input_ids"]
        got = encode([sample])["input_ids"][0].tolist()
        assert got == want, sample
        assert decode([got])["string_output"][0] == tok.decode(want, skip_special_tokens=True), sample
