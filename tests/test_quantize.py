"""NNCF compression of exports: storage types, INT4 ratio, size, accuracy of the vision PTQ, errors.

Every test compresses a copy of the tiny fp32 exports (the session fixtures stay
untouched).  Tiny models are dominated by their 32k-row embeddings and lm_head
(both INT8 by design), so ratios are measured on the decoder MatMul weights.
"""

from __future__ import annotations


import shutil
import sys
import types

import numpy as np
import openvino as ov
import pytest
from PIL import Image

from conftest import F32
from llava_ov.common import layout
from llava_ov.errors import ExportExistsError, LlavaOvError
from llava_ov.families.llava.runtime import preprocess_clip
from llava_ov.families.llava_next.runtime import preprocess_anyres
from llava_ov.runtime.export import ImageConfig
from llava_ov.exporting.calibration import calibration_images
from llava_ov.exporting.quantize import QuantConfig, compress_export, resolve_config, weight_stats
from llava_ov.runtime.export import ExportDir

core = ov.Core()
VOCAB = 32064


@pytest.fixture(scope="module")
def src_next(exports, tmp_path_factory):
    """A private copy of the tiny LLaVA-NeXT export."""
    dst = tmp_path_factory.mktemp("src") / "next"
    shutil.copytree(exports["llava-next"], dst)
    return dst


@pytest.fixture(scope="module")
def int4_next(src_next, tmp_path_factory):
    """The classic INT4: int4_sym g64 r0.6 (+ INT8 backup, INT8 text embeddings), out of place."""
    out = tmp_path_factory.mktemp("int4") / "next-int4"
    compress_export(src_next, out, weight_format="int4", progress=False)
    return out


def decoder_matmuls(stats):
    """Decoder MatMul weights: lm_head (the vocab-sized MatMul NNCF keeps INT8) left out."""
    return [layer for layer in stats["layers"] if layer["op"] == "MatMul" and layer["shape"][0] != VOCAB]


def lm_logits(export, embeds):
    request = core.compile_model(export / layout.LANGUAGE_MODEL, "CPU", F32).create_infer_request()
    n = embeds.shape[1]
    inputs = dict(
        inputs_embeds=embeds,
        attention_mask=np.ones((1, n), np.int64),
        position_ids=np.arange(n, dtype=np.int64)[None],
        beam_idx=np.zeros(1, np.int32),
    )
    return request.infer(inputs)["logits"].ravel()


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_weight_stats_of_fp32_export(exports):
    stats = weight_stats(exports["llava-next"] / layout.LANGUAGE_MODEL)
    assert set(stats["weights"]) == {"f32"}
    assert stats["weights"]["f32"]["tensors"] == 15  # 2 layers x 7 linears + lm_head
    assert len(decoder_matmuls(stats)) == 14
    assert stats["fake_quantize"] == 0
    assert stats["weight_bytes"] <= stats["constant_bytes"] and stats["weight_bytes"] <= stats["bin_bytes"]


def test_int4_language_model_types_and_ratio(int4_next, src_next):
    stats = weight_stats(int4_next / layout.LANGUAGE_MODEL)
    assert set(stats["weights"]) == {"i4", "u8"}  # INT4_SYM weights + INT8_ASYM backup, no float weights left
    lm_head = [layer for layer in stats["layers"] if layer["op"] == "MatMul" and layer["shape"][0] == VOCAB]
    assert [layer["type"] for layer in lm_head] == ["u8"]  # NNCF keeps the last layer in the backup precision
    # Ratio = INT4 elements / all decoder MatMul weight elements (lm_head excluded, as NNCF's ratio-defining set).
    # NNCF fills INT4 by sensitivity until the next layer would reach the ratio: share < ratio, and it misses
    # by less than the largest layer's share.
    decoder = decoder_matmuls(stats)
    total = sum(layer["elements"] for layer in decoder)
    share = sum(layer["elements"] for layer in decoder if layer["type"] == "i4") / total
    largest = max(layer["elements"] for layer in decoder) / total
    print(f"INT4 share of decoder weights: {share:.3f} (ratio 0.6, granularity {largest:.3f})")
    assert 0.6 - largest < share < 0.6
    assert {layer["type"] for layer in decoder} == {"i4", "u8"}


def test_int4_sizes_shrink(int4_next, src_next):
    before = weight_stats(src_next / layout.LANGUAGE_MODEL)
    after = weight_stats(int4_next / layout.LANGUAGE_MODEL)
    dec_before = sum(layer["bytes"] for layer in decoder_matmuls(before))
    dec_after = sum(layer["bytes"] for layer in decoder_matmuls(after))
    bin_ratio = before["bin_bytes"] / after["bin_bytes"]
    print(f"LM .bin {before['bin_bytes']} -> {after['bin_bytes']} ({bin_ratio:.2f}x); "
          f"decoder MatMul weights {dec_before} -> {dec_after} ({dec_before / dec_after:.2f}x)")  # fmt: skip
    assert dec_before / dec_after > 4  # fp32 -> a mix of 4- and 8-bit: between 4x and 8x
    assert bin_ratio > 3  # scales, zero points and the INT8 lm_head keep it under 4x
    text = weight_stats(int4_next / layout.TEXT_EMBEDDINGS_MODEL)
    assert set(text["weights"]) == {"u8"}
    assert text["bin_bytes"] < weight_stats(src_next / layout.TEXT_EMBEDDINGS_MODEL)["bin_bytes"] / 3
    vision = weight_stats(int4_next / layout.VISION_MODEL)
    assert set(vision["weights"]) == {"f32"}  # vision_mode "none": untouched


def test_int4_export_files_and_info(int4_next, src_next):
    for name in (layout.TOKENIZER_MODEL, layout.DETOKENIZER_MODEL, "config.json", layout.CHAT_TEMPLATE,
                 layout.VISION_MODEL, "preprocessor_config.json"):  # fmt: skip
        assert (int4_next / name).read_bytes() == (src_next / name).read_bytes(), name
    assert set(weight_stats(src_next / layout.LANGUAGE_MODEL)["weights"]) == {"f32"}  # source untouched
    assert not list(int4_next.parent.glob(".*partial*"))
    info = ExportDir.open(int4_next).record()
    assert info.parts["language"]["precision"] == "int4_sym g64 r0.6 + int8"
    assert info.parts["text_embeddings"]["precision"] == "int8_asym"
    assert info.parts["vision"]["precision"] == "fp32"
    comp = info.compression
    assert comp["weight_format"] == "int4" and comp["float_weights"] == "fp32" and comp["source_dtype"] == "float32"
    assert (comp["lm_mode"], comp["group_size"], comp["ratio"], comp["awq"]) == ("int4_sym", 64, 0.6, False)
    assert comp["nncf"] and comp["openvino"] and "calibration" not in comp
    assert comp["parts"]["language"]["weight_bytes_after"] < comp["parts"]["language"]["weight_bytes_before"] / 3


def test_int4_still_runs_and_agrees(int4_next, src_next):
    embeds = np.random.default_rng(0).standard_normal((1, 7, 64)).astype(np.float32)
    ref, ours = lm_logits(src_next, embeds), lm_logits(int4_next, embeds)
    assert ours.shape == ref.shape == (VOCAB,) and np.isfinite(ours).all()
    print(f"INT4 LM logits cosine vs fp32: {cosine(ref, ours):.4f}")
    assert cosine(ref, ours) > 0.8  # observed ~0.96 on the tiny random model
    ids = np.array([[1, 32000, 13, 3195]], np.int64)
    emb = core.compile_model(int4_next / layout.TEXT_EMBEDDINGS_MODEL, "CPU", F32)(ids)[0]
    ref_emb = core.compile_model(src_next / layout.TEXT_EMBEDDINGS_MODEL, "CPU", F32)(ids)[0]
    assert cosine(ref_emb, emb) > 0.99


def test_int8_in_place(src_next, tmp_path, capsys):
    export = tmp_path / "next"
    shutil.copytree(src_next, export)
    before = (export / layout.LANGUAGE_MODEL).stat().st_size
    compress_export(export, weight_format="int8", in_place=True)
    stats = weight_stats(export / layout.LANGUAGE_MODEL)
    assert set(stats["weights"]) == {"u8"}  # INT8_ASYM everywhere, lm_head included
    assert stats["bin_bytes"] < weight_stats(src_next / layout.LANGUAGE_MODEL)["bin_bytes"] / 3
    assert set(weight_stats(export / layout.TEXT_EMBEDDINGS_MODEL)["weights"]) == {"u8"}
    assert not [p.name for p in export.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert (export / layout.LANGUAGE_MODEL).stat().st_size != before
    info = ExportDir.open(export).record()
    assert info.parts["language"]["precision"] == "int8_asym" and info.compression["weight_format"] == "int8"
    assert "[compress 1/2] compressing language model (int8_asym) ..." in capsys.readouterr().err
    embeds = np.random.default_rng(1).standard_normal((1, 5, 64)).astype(np.float32)
    sim = cosine(lm_logits(src_next, embeds), lm_logits(export, embeds))
    print(f"INT8 LM logits cosine vs fp32: {sim:.5f}")
    assert sim > 0.99
    with pytest.raises(LlavaOvError, match="already compressed"):
        compress_export(export, weight_format="int8", in_place=True, progress=False)


@pytest.mark.parametrize("family", ["llava", "llava-next"])
def test_vision_int8_ptq_close_to_fp32(family, exports, photos, tmp_path):
    src = exports[family]
    calib = [Image.open(photos[name]) for name in ("astronaut", "chelsea", "coffee")]
    out = compress_export(
        src, tmp_path / "ptq", QuantConfig(lm_mode="none", vision_mode="int8_ptq", vision_calib_images=3),
        calibration=calib, progress=False,
    )  # fmt: skip
    stats = weight_stats(out / layout.VISION_MODEL)
    assert stats["fake_quantize"] > 0 and "i8" in stats["weights"]
    assert set(weight_stats(out / layout.LANGUAGE_MODEL)["weights"]) == {"f32"}  # lm_mode none
    info = ExportDir.open(out).record()
    assert info.parts["vision"]["precision"] == "int8_ptq"
    cfg, preprocess = ImageConfig.from_export(src), preprocess_clip if family == "llava" else preprocess_anyres
    tiles = sum(preprocess(img, cfg).pixel_values.shape[0] for img in calib)  # each tile one NNCF sample
    assert info.compression["calibration"] == {"source": "3 given images", "images": 3, "augmented": 0,
                                               "tiles": tiles}  # fmt: skip
    fp32 = core.compile_model(src / layout.VISION_MODEL, "CPU", F32)
    int8 = core.compile_model(out / layout.VISION_MODEL, "CPU", F32)
    sims = {}
    for name, path in photos.items():  # calibrated on 3 photos, measured on all 6
        pixels = preprocess(path, cfg).pixel_values
        sims[name] = cosine(fp32(pixels)[0], int8(pixels)[0])
    print(f"{family} int8_ptq feature cosine vs fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in sims.items()))
    assert min(sims.values()) > 0.9  # observed > 0.99
    # the float encoder stays beside it, byte for byte the source's
    assert (out / layout.VISION_FLOAT_MODEL).read_bytes() == (src / layout.VISION_MODEL).read_bytes()
    assert info.parts["vision"]["float_file"] == layout.VISION_FLOAT_MODEL
    assert info.parts["vision"]["float_precision"] == "fp32"
    if family == "llava":
        _check_vision_encoder_choice(out, photos)


def _check_vision_encoder_choice(export, photos):
    """auto runs the INT8-PTQ encoder only where the CPU has int8 units; info says which and why."""
    from unittest import mock

    from llava_ov.common import hardware
    from llava_ov.runtime.pipeline import Pipeline

    features = {}
    for flags, expected in ((frozenset({"avx2", "amx_int8"}), "int8_ptq"), (frozenset({"avx2", "fma"}), "fp32")):
        with mock.patch.object(hardware, "cpu_flags", lambda flags=flags: flags):
            pipe = Pipeline(export, properties=F32, cache_dir=None)
            info = pipe.info()
            assert info["weights"]["vision"] == expected, info["vision_encoder"]
            assert ("amx_int8" in info["vision_encoder"]) == (expected == "int8_ptq")
            features[expected] = pipe.prepare_image(photos["chelsea"]).features
            pipe.close()
    assert not np.array_equal(features["int8_ptq"], features["fp32"])
    forced = Pipeline(export, properties=F32, cache_dir=None, vision_encoder="float")
    np.testing.assert_array_equal(forced.prepare_image(photos["chelsea"]).features, features["fp32"])
    forced.close()


def test_vision_int8_weights_only(exports, tmp_path):
    out = compress_export(exports["llava"], tmp_path / "w8", QuantConfig(lm_mode="none", vision_mode="int8"),
                          progress=False)  # fmt: skip
    stats = weight_stats(out / layout.VISION_MODEL)
    assert stats["fake_quantize"] == 0 and set(stats["weights"]) <= {"u8", "f32"} and "u8" in stats["weights"]
    assert ExportDir.open(out).record().parts["vision"]["precision"] == "int8_asym"


def test_awq_int4_asym_with_folder_calibration(exports, photos, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for name in ("chelsea", "rocket"):
        shutil.copy(photos[name], folder)
    (folder / "notes.txt").write_text("not an image")
    # ratio 1: NNCF's AWQ only corrects the MLP down projections, which ratio 0.6 leaves INT8 here.
    q = QuantConfig(lm_mode="int4_asym", awq=True, calib_samples=2, ratio=1.0, group_size=32)
    out = compress_export(exports["llava"], tmp_path / "awq", q, calibration=folder, progress=False)
    stats = weight_stats(out / layout.LANGUAGE_MODEL)
    assert {layer["type"] for layer in decoder_matmuls(stats)} == {"u4"}
    info = ExportDir.open(out).record()
    assert info.parts["language"]["precision"] == "int4_asym g32 r1 + int8 awq+se"
    assert info.compression["parts"]["language"]["awq_layers"] == 2  # one down_proj per decoder layer
    calib = info.compression["calibration"]
    assert calib["images"] == 2 and calib["language_samples"] == 2 and str(folder) in calib["source"]
    assert min(calib["language_tokens"]) > 576  # the base tile's 576 image tokens + text
    embeds = np.random.default_rng(2).standard_normal((1, 6, 64)).astype(np.float32)
    assert np.isfinite(lm_logits(out, embeds)).all()


# ---------------------------------------------------------------- settings and errors


def test_weight_format_shortcut():
    assert resolve_config(None, "int4") == QuantConfig()  # classic INT4_SYM g64 r0.6
    assert resolve_config(None, "int8").lm_mode == "int8"
    assert resolve_config(QuantConfig(lm_mode="int8"), "int4").lm_mode == "int4_sym"
    assert resolve_config(QuantConfig(lm_mode="int4_asym", group_size=128), "int4").group_size == 128
    with pytest.raises(LlavaOvError, match="int4, int8"):
        resolve_config(None, "int3")


@pytest.mark.parametrize(
    "quant, match",
    [
        (QuantConfig(lm_mode="int4"), "valid modes: int4_sym, int4_asym, int8, none"),
        (QuantConfig(vision_mode="int4"), "valid modes: none, int8, int8_ptq"),
        (QuantConfig(group_size=0), "group size must be"),
        (QuantConfig(ratio=1.5), "ratio"),
        (QuantConfig(lm_mode="int8", awq=True), "awq needs an int4"),
        (QuantConfig(lm_mode="none"), "nothing to compress"),
    ],
)
def test_bad_settings(quant, match, exports, tmp_path):
    with pytest.raises(LlavaOvError, match=match):
        compress_export(exports["llava"], tmp_path / "out", quant, progress=False)
    assert not (tmp_path / "out").exists()


def test_group_size_must_divide_hidden_size(exports, tmp_path):
    match = r"group size 128 does not divide .* \[64\].*valid group sizes .*16, 32, 64, -1"
    with pytest.raises(LlavaOvError, match=match):
        compress_export(exports["llava"], tmp_path / "out", QuantConfig(group_size=128), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_bad_calibration_and_paths(exports, tmp_path, monkeypatch):
    src = exports["llava"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    ptq = QuantConfig(lm_mode="none", vision_mode="int8_ptq")
    with pytest.raises(LlavaOvError, match="holds no image files"):
        compress_export(src, tmp_path / "out", ptq, calibration=empty, progress=False)
    with pytest.raises(LlavaOvError, match="no such calibration folder"):
        compress_export(src, tmp_path / "out", ptq, calibration=tmp_path / "missing", progress=False)
    with pytest.raises(LlavaOvError, match="empty"):
        compress_export(src, tmp_path / "out", ptq, calibration=[], progress=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(LlavaOvError, match="pip install datasets"):
        compress_export(src, tmp_path / "out", ptq, calibration="conceptual_captions", progress=False)
    with pytest.raises(LlavaOvError, match="in_place=True"):
        compress_export(src, src, progress=False)
    with pytest.raises(LlavaOvError, match="in_place=True compresses src_dir"):
        compress_export(src, tmp_path / "out", in_place=True, progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ExportExistsError):
        compress_export(src, tmp_path / "taken", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- calibration sources


def test_offline_calibration_photos_and_augmentations():
    calib = calibration_images(None, 20)
    assert len(calib.images) == 20 and calib.augmented == 7 and calib.source == "scikit-image photos (13 + 7 augmentations)"
    assert all(img.mode == "RGB" for img in calib.images)
    again = calibration_images(None, 20)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(calib.images, again.images))
    assert len(calibration_images(None, 3).images) == 3


def test_list_and_dataset_calibration(photos, monkeypatch):
    calib = calibration_images([photos["coffee"], Image.open(photos["rocket"]).convert("L")], 5)
    assert len(calib.images) == 2 and all(img.mode == "RGB" for img in calib.images)
    rows = [{"image": Image.open(photos["chelsea"]), "caption": "a cat"}, {"image_url": "file:///etc/passwd"}]
    fake = types.SimpleNamespace(load_dataset=lambda name, split, streaming: iter(rows * 3))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    calib = calibration_images("conceptual_captions", 2)
    assert len(calib.images) == 2 and calib.captions == ["a cat", "a cat"]  # the file:// URL is refused
    assert "google-research-datasets/conceptual_captions" in calib.source


def test_auto_decode_precision_is_measured_where_it_can_differ(int4_next, exports, monkeypatch, tmp_path):
    """decode_precision='auto' times both compilations where the f32 variant can differ (a CPU that computes
    below f32 by default, nothing pinned, room for a second copy of the weights), keeps the faster one, and
    remembers the decision in the cache folder: the next load measures nothing."""
    from llava_ov.common import hardware
    from llava_ov.exporting import resources
    from llava_ov.runtime import decode_choice
    from llava_ov.runtime.pipeline import Pipeline

    bf16_cpu = resources.cpu_inference_precision() == "bf16"
    pipe = Pipeline(int4_next, cache_dir=str(tmp_path))
    why = pipe.info()["decode_steps"]
    if bf16_cpu:
        measured = pipe.model.decode_measured
        assert "measured at load" in why and f"{measured.f32_s * 1e3:.2f} ms per step at f32 vs" in why, why
        chosen = pipe.model.paged.decode_request is not None
        assert chosen == (measured.f32_s < (1 - decode_choice.MARGIN) * measured.default_s)
        assert why.startswith("f32" if chosen else "same")
        assert (tmp_path / decode_choice.CHOICES_FILE).exists()
        monkeypatch.setattr(decode_choice, "time_decode_steps", lambda *a: pytest.fail("measured again"))
        again = Pipeline(int4_next, cache_dir=str(tmp_path))
        assert "remembered for this CPU" in again.info()["decode_steps"]
        assert (again.model.paged.decode_request is not None) == chosen
        again.close()
    else:
        assert pipe.model.paged.decode_request is None and "computes in f32 here already" in why
    pipe.close()
    pinned = Pipeline(int4_next, cache_dir=None, properties={"INFERENCE_PRECISION_HINT": "f32"}, dq_group_size="plugin")
    assert pinned.model.paged.decode_request is None and "set by the caller" in pinned.info()["decode_steps"]
    pinned.close()
    same = Pipeline(int4_next, cache_dir=None, decode_precision="same", dq_group_size="plugin")
    assert same.model.paged.decode_request is None and "decode_precision=same" in same.info()["decode_steps"]
    same.close()
    if bf16_cpu:  # the memory check needs a CPU where the variant would otherwise be considered
        monkeypatch.setattr(hardware, "available_memory", lambda: 2**30)
        tight = Pipeline(int4_next, cache_dir=None)
        assert tight.model.paged.decode_request is None and "needs" in tight.info()["decode_steps"]
        assert "needs" in tight.info()["dq_group"]  # two compilations of the activation group do not fit either
        tight.close()


def test_the_measured_choice_keeps_the_faster_compilation(tmp_path):
    """Whichever compilation the measurement finds faster (beyond the margin) is the one kept, and a
    remembered decision is keyed by what it depends on."""
    from llava_ov.runtime.decode_choice import MARGIN, DecodeChoices, Measured, choice_key

    assert Measured(0.040, 0.030).f32_pays and not Measured(0.040, 0.040 * (1 - MARGIN / 2)).f32_pays
    assert not Measured(0.030, 0.040).f32_pays
    choices = DecodeChoices(tmp_path)
    weights = tmp_path / "lm.bin"
    weights.write_bytes(b"x" * 10)
    key = choice_key("Some CPU", "2026.4", weights, 2, "u8")
    assert choices.get(key) is None
    choices.put(key, Measured(0.040, 0.030))
    got = choices.get(key)
    assert got is not None and got.cached and got.f32_pays and "remembered" in got.why("bf16")
    weights.write_bytes(b"y" * 11)  # another export (or the same one converted again): measured again
    assert choice_key("Some CPU", "2026.4", weights, 2, "u8") != key
    assert choice_key("Other CPU", "2026.4", weights, 2, "u8") != choice_key("Some CPU", "2026.4", weights, 2, "u8")
    (tmp_path / "decode-choices.json").write_text("{broken")
    assert DecodeChoices(tmp_path).get(key) is None  # a damaged file is ignored (and replaced on the next put)
    assert DecodeChoices(None).get(key) is None


def test_the_activation_group_is_measured_and_remembered(int4_next, exports, monkeypatch, tmp_path):
    """dq_group_size='auto' compiles the INT4 language model with the plugin's activation group and with the
    weights' group (64 here), times both, keeps the one `GroupMeasured.pays` picks and remembers it; 'weights'
    and 'plugin' force one; a caller's property, another device or float weights measure nothing."""
    import openvino as ov

    from llava_ov.runtime import decode_choice, model as model_module
    from llava_ov.runtime.pipeline import Pipeline

    group = "DYNAMIC_QUANTIZATION_GROUP_SIZE"
    plugin = int(ov.Core().get_property("CPU", group))
    assert decode_choice.int4_group_size(ov.Core().read_model(int4_next / "openvino_language_model.xml")) == 64

    def compiled_group(pipe):
        return int(pipe.model.paged.compiled.get_property(group))

    for mode, expected in (("weights", 64), ("plugin", plugin)):
        pipe = Pipeline(int4_next, cache_dir=None, dq_group_size=mode, decode_precision="same")
        assert compiled_group(pipe) == expected and f"dq_group_size={mode}" in pipe.info()["dq_group"]
        pipe.close()
    if plugin == 64:  # nothing to choose between on this CPU
        pipe = Pipeline(int4_next, cache_dir=None, decode_precision="same")
        assert "the INT4 weights' group too" in pipe.info()["dq_group"]
        pipe.close()
        return
    for pays in (True, False):  # whichever the measurement favours is the one compiled
        fake = decode_choice.GroupMeasured(0.040, 0.030 if pays else 0.050, 0.1, 0.1, 64)
        monkeypatch.setattr(model_module, "time_group_choice", lambda *a, fake=fake: fake)
        folder = tmp_path / f"pays-{pays}"
        pipe = Pipeline(int4_next, cache_dir=str(folder), decode_precision="same")
        assert compiled_group(pipe) == (64 if pays else plugin) and "measured at load" in pipe.info()["dq_group"]
        pipe.close()
        monkeypatch.setattr(model_module, "time_group_choice", lambda *a: pytest.fail("measured again"))
        again = Pipeline(int4_next, cache_dir=str(folder), decode_precision="same")
        assert compiled_group(again) == (64 if pays else plugin) and "remembered" in again.info()["dq_group"]
        again.close()
    monkeypatch.setattr(model_module, "time_group_choice", lambda *a: pytest.fail("nothing to measure"))
    pinned = Pipeline(int4_next, cache_dir=None, properties={group: 16}, decode_precision="same")
    assert compiled_group(pinned) == 16 and "set by the caller" in pinned.info()["dq_group"]
    pinned.close()
    floats = Pipeline(exports["llava-next"], cache_dir=None, decode_precision="same")
    assert "no INT4 weights" in floats.info()["dq_group"]
    floats.close()


def test_the_group_rule_trusts_prefill_and_guards_decode():
    from llava_ov.runtime.decode_choice import GroupMeasured

    def pays(decode, prefill):
        return GroupMeasured(1.0, decode, 1.0, prefill, 64).pays

    assert pays(1.0, 0.85) and pays(1.05, 0.85) and not pays(1.08, 0.85)  # prefill gain, decode not clearly worse
    assert pays(0.9, 1.0) and pays(0.9, 1.02) and not pays(0.9, 1.05)  # decode gain, prefill not worse
    assert not pays(0.99, 0.99) and not pays(1.0, 1.0)
    record = GroupMeasured(0.04, 0.03, 0.2, 0.1, 64).record()
    again = GroupMeasured.from_record(record)
    assert again.cached and (again.grouped_s, again.group) == (0.03, 64)
