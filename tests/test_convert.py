"""Converter tests: every exported IR against transformers on the tiny random models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import openvino as ov
import openvino_tokenizers  # noqa: F401  (before ov.Core: registers tokenizer ops)
import pytest
import torch
from PIL import Image

from conftest import F32, FAMILIES
from llava_ov.common import layout
from llava_ov.exporting.convert import ConvertOptions, convert
from llava_ov.errors import DiskFullError, ExportExistsError, LlavaOvError, ModelNotFoundError, UnsupportedModelError
from llava_ov.runtime.export import ExportDir

core = ov.Core()


def compile_part(export, name):
    return core.compile_model(export / name, "CPU", F32)


def hf_tile_features(model, pixel_values):
    """Reference per-tile features: CLIP hidden state of vision_feature_layer, CLS dropped, projected."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        return model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:]).numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(336, 336), (480, 640), (900, 300), (200, 1000)])
def test_vision_embeddings_match_transformers(family, size, exports, hf_models, photos):
    model, processor = hf_models[family]
    image = Image.open(photos["astronaut"]).convert("RGB").resize(size[::-1])
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    ours = compile_part(exports[family], layout.VISION_MODEL)(pixel_values.numpy())[0]
    ref = hf_tile_features(model, pixel_values)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)  # observed max abs error ~1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_text_embeddings_exact(family, exports, hf_models):
    model, _ = hf_models[family]
    ids = np.array([[1, 733, 16289, 28793, 32000, 13, 3195, 32001, 31999, 0]], dtype=np.int64)
    ours = compile_part(exports[family], layout.TEXT_EMBEDDINGS_MODEL)(ids)[0]
    ref = model.get_input_embeddings()(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_array_equal(ours, ref)


TOKENIZER_CASES = [
    "Hello world",
    "[INST] <image>\nWhat is shown in this image? [/INST]",
    "USER: <image>\nDescribe the photo. ASSISTANT:",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦙🔥, Ελληνικά",
    "<image><image> two images",
    "numbers 1234567890 and symbols #$%^&*()[]{}",
    "",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_ir_matches_hf(family, exports, hf_models):
    _, processor = hf_models[family]
    tok = core.compile_model(exports[family] / layout.TOKENIZER_MODEL)
    detok = core.compile_model(exports[family] / layout.DETOKENIZER_MODEL)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What's this?"}]}]
    templated = processor.apply_chat_template(chat, add_generation_prompt=True)
    for text in [*TOKENIZER_CASES, templated]:
        ours = tok([text])["input_ids"][0].tolist()
        ref = processor.tokenizer(text)["input_ids"]
        assert ours == ref, text
        decoded = detok(np.array([ours], dtype=np.int64))[0][0]
        assert decoded == processor.tokenizer.decode(ref, skip_special_tokens=True), text


def hf_logits_steps(model, embeds, decode_ids):
    """transformers logits of the last position for a prefill, then one per decode id."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    out = []
    with torch.no_grad():
        res = model(inputs_embeds=torch.from_numpy(embeds)[None], cache=cache, use_cache=True)
        out.append(res.logits[0, -1].numpy())
        for token in decode_ids:
            res = model(input_ids=torch.tensor([[token]]), cache=res.cache, use_cache=True)
            out.append(res.logits[0, -1].numpy())
    return out


def lm_step(request, chunk: np.ndarray, pos: int) -> np.ndarray:
    """One stateful LM call on `chunk` (tokens x hidden) at position `pos`; the last position's logits."""
    end = pos + len(chunk)
    request.infer(
        {
            "inputs_embeds": chunk[None],
            "attention_mask": np.ones((1, end), np.int64),
            "position_ids": np.arange(pos, end)[None],
            "beam_idx": np.zeros(1, np.int32),
        }
    )
    return request.get_tensor("logits").data[0, -1]


def ov_logits_steps(export, embeds, decode_ids, table):
    request = compile_part(export, layout.LANGUAGE_MODEL).create_infer_request()
    request.reset_state()
    out, pos = [], 0
    for chunk in [embeds, *[table[[t]] for t in decode_ids]]:
        out.append(lm_step(request, chunk, pos).copy())
        pos += len(chunk)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_logits_prefill_and_decode(family, exports, hf_models):
    model, _ = hf_models[family]
    table = model.get_input_embeddings().weight.detach().numpy()
    rng = np.random.default_rng(0)
    embeds = table[rng.integers(0, 32000, 40)]
    decode_ids = rng.integers(0, 32000, 6).tolist()
    ours = ov_logits_steps(exports[family], embeds, decode_ids, table)
    ref = hf_logits_steps(model, embeds, decode_ids)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == (model.config.text_config.vocab_size,)
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_32_greedy_tokens_match_generate(family, exports, hf_models):
    model, _ = hf_models[family]
    table = model.get_input_embeddings().weight.detach().numpy()
    ids = torch.tensor([[1, 733, 16289, 28793, 1824, 349, 456, 28804, 733, 28748, 16289, 28793]])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    ref_tokens = ref[0, ids.shape[1] :].tolist()
    request = compile_part(exports[family], layout.LANGUAGE_MODEL).create_infer_request()
    tokens, pos, chunk = [], 0, table[ids[0].numpy()]
    for _ in range(32):
        tokens.append(int(lm_step(request, chunk, pos).argmax()))
        pos, chunk = pos + len(chunk), table[[tokens[-1]]]
    assert len(set(ref_tokens)) > 4, "reference collapsed into repeats; the comparison would mean little"
    assert tokens == ref_tokens


def test_language_model_is_stateful_with_beam_idx(exports):
    model = core.read_model(exports["llava-next"] / layout.LANGUAGE_MODEL)
    names = {n for port in model.inputs for n in port.get_names()}
    assert names == {"inputs_embeds", "attention_mask", "position_ids", "beam_idx"}
    assert [n for port in model.outputs for n in port.get_names()] == ["logits"]
    assert len(model.get_sinks()) == 2 * 2  # Assign per key and value of 2 layers
    assert model.output("logits").get_partial_shape()[1].get_max_length() == 1  # sliced before lm_head


def test_state_initialised_from_batch_size(exports):
    """A batch of 2 runs from a fresh state and each row equals its own batch-1 run."""
    request = compile_part(exports["llava-next"], layout.LANGUAGE_MODEL).create_infer_request()
    rng = np.random.default_rng(1)
    embeds = rng.normal(size=(2, 5, 64)).astype(np.float32)

    def run(batch):
        request.reset_state()
        n = len(batch)
        request.infer({"inputs_embeds": batch, "attention_mask": np.ones((n, 5), np.int64),
                       "position_ids": np.tile(np.arange(5), (n, 1)), "beam_idx": np.arange(n, dtype=np.int32)})  # fmt: skip
        return request.get_tensor("logits").data[:, -1].copy()

    both = run(embeds)
    np.testing.assert_allclose(both[1], run(embeds[1:])[0], atol=1e-5)
    assert request.query_state()[0].state.shape[0] == 1


def test_export_layout_and_info(exports):
    export = exports["llava-next"]
    for name in [*layout.MODEL_PARTS.values(), layout.TOKENIZER_MODEL, layout.DETOKENIZER_MODEL, "config.json",
                 "generation_config.json", "preprocessor_config.json", layout.CHAT_TEMPLATE, layout.EXPORT_INFO]:  # fmt: skip
        assert (export / name).exists(), name
    cfg = json.loads((export / "config.json").read_text())
    assert len(cfg["image_newline"]) == cfg["text_config"]["hidden_size"]
    info = ExportDir.open(export).record()
    assert info.family == "llava_next" and info.versions["openvino"]
    assert {p["precision"] for p in info.parts.values()} == {"fp32"}
    assert "</s>" in (export / layout.CHAT_TEMPLATE).read_text()


# ---------------------------------------------------------------- errors


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        convert(str(tmp_path / "nope"), tmp_path / "out")


def test_an_export_given_to_convert_is_a_clear_error(exports, tmp_path):
    with pytest.raises(ModelNotFoundError, match="already a llava-ov export"):
        convert(str(exports["llava"]), tmp_path / "out")


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """`models/nodemo` with a models/ folder here: a missing path at once, no download attempts."""
    from llava_ov.exporting.hub import looks_like_path, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_like_path("models/nodemo") and not looks_like_path("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(ModelNotFoundError, match="no such model directory: models/nodemo"):
        resolve_model("models/nodemo")
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        convert("models/nodemo", tmp_path / "out")


def test_non_llava_checkpoint_is_rejected(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedModelError, match="BertModel is not supported.*LlavaNextForConditionalGeneration"):
        convert(str(tmp_path / "bert"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, checkpoints):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportExistsError, match="--overwrite"):
        convert(str(checkpoints["llava"]), out, ConvertOptions(show_progress=False))
    assert (out / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_export_atomically(tmp_path, checkpoints):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(str(checkpoints["llava"]), out, ConvertOptions(overwrite=True, show_progress=False))
    assert not (out / "stale.txt").exists() and (out / layout.LANGUAGE_MODEL).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, checkpoints, monkeypatch):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ov, "save_model", no_space)
    with pytest.raises(DiskFullError, match="no space left"):
        convert(str(checkpoints["llava"]), tmp_path / "out", ConvertOptions(show_progress=False))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_mismatched_weights_fails_strictly(tmp_path, checkpoints):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["llava"], bad)
    weights = load_file(bad / "model.safetensors")
    key = next(k for k in weights if "vision_tower" in k and k.endswith("q_proj.weight"))
    weights[key.replace("vision_tower.", "vision_tower.renamed.")] = weights.pop(key)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlavaOvError, match="do not match"):
        convert(str(bad), tmp_path / "out", ConvertOptions(show_progress=False))


def test_bad_compression_settings_fail_before_converting(tmp_path, checkpoints, monkeypatch):
    from llava_ov.exporting import convert as convert_module
    from llava_ov.exporting.quantize import QuantConfig

    monkeypatch.setattr(convert_module, "load_checkpoint", lambda *a, **k: pytest.fail("should not load weights"))
    with pytest.raises(LlavaOvError, match="group size 48 does not divide"):
        convert(str(checkpoints["llava"]), tmp_path / "out",
                ConvertOptions(weight_format="int4", quant=QuantConfig(group_size=48), show_progress=False))  # fmt: skip
    with pytest.raises(LlavaOvError, match="ratio must be in"):
        convert(str(checkpoints["llava"]), tmp_path / "out",
                ConvertOptions(weight_format="int4", quant=QuantConfig(ratio=2.0), show_progress=False))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config_name", list(FAMILIES.values()))
def test_streamed_random_checkpoint_loads_strictly_in_shards(config_name, tmp_path):
    """The shard-by-shard builder (the 32-layer 7B one: peak ~ one shard) writes a checkpoint transformers
    loads with no missing or unexpected weight, in the Hub's sharded layout."""
    from llava_ov.exporting.convert import checkpoint_size, load_checkpoint, read_source_config
    from llava_ov.runtime.families import family_for
    from llava_ov.exporting.random_models import RandomModelSpec, build_random_checkpoint

    shard = 3_000_000
    out = build_random_checkpoint(RandomModelSpec(config_name), tmp_path / "ckpt", dtype="float16", streamed=True,
                                  shard_bytes=shard)  # fmt: skip
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    cfg, _ = read_source_config(str(out))
    model, _ = load_checkpoint(str(out), family_for(cfg))  # strict: raises on any missing / unexpected weight
    assert model.dtype == torch.float16
    stored, per_value, lm_share = checkpoint_size(str(out), cfg)
    assert per_value == 2 and stored == pytest.approx(index["metadata"]["total_size"], rel=0.01)
    assert 0.5 < lm_share < 1
    norms = [p for n, p in model.named_parameters() if "norm" in n and n.endswith("weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    linear = model.model.language_model.layers[0].mlp.up_proj.weight.detach().float()
    assert abs(float(linear.std()) - 0.3) < 0.03  # N(0, initializer_range)
