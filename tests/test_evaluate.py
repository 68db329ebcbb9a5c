"""`llava_ov.tools.evaluate`: compressed exports against their reference, and compressed exports still run.

The tiny fp32 LLaVA-NeXT export is compressed into module-scoped copies (INT8 LM,
INT4 g64 r0.6 LM, INT4 LM + INT8-PTQ vision).  Comparisons pin f32 inference so
that only the compressed weights differ.  The tiny model's answers are noise;
what is tested is the mechanics: a model compared with itself is identical,
compressed ones give bounded numbers, and INT8 stays closer than INT4.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import openvino as ov
import pytest
from PIL import Image

from conftest import F32
from llava_ov.errors import InvalidImageError, LlavaOvError
from llava_ov.tools.evaluate import LEGEND, METRICS, evaluate, format_table, identical_prefix, kl_divergence, text_similarity
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.runtime.pipeline import Pipeline
from llava_ov.exporting.quantize import QuantConfig, compress_export, weight_stats

PROMPT = ["Describe this image."]
TOKENS = 16


@pytest.fixture(scope="module")
def ref_dir(exports):
    return exports["llava-next"]


@pytest.fixture(scope="module")
def compressed(ref_dir, photos, tmp_path_factory):
    """name -> compressed copy of the tiny LLaVA-NeXT export."""
    root = tmp_path_factory.mktemp("compressed")
    calib = [photos[name] for name in ("astronaut", "coffee", "motorcycle_left")]
    out = {
        "int8": compress_export(ref_dir, root / "int8", QuantConfig(lm_mode="int8"), progress=False),
        "int4": compress_export(ref_dir, root / "int4", QuantConfig(lm_mode="int4_sym"), progress=False),
    }
    ptq = QuantConfig(lm_mode="none", vision_mode="int8_ptq", vision_calib_images=len(calib))
    out["int4+ptq"] = compress_export(out["int4"], root / "int4-ptq", ptq, calibration=calib, progress=False)
    return out


@pytest.fixture(scope="module")
def ref_pipe(ref_dir):
    return Pipeline(ref_dir, properties=F32, cache_dir=None)


@pytest.fixture(scope="module")
def images(photos):
    return [photos["chelsea"], photos["rocket"]]


def run_eval(ref, cand, images, tokens=TOKENS):
    return evaluate(ref, cand, images=images, prompts=PROMPT, max_new_tokens=tokens, properties=F32, cache_dir=None)


def test_metric_helpers():
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert np.allclose(kl_divergence(a, a), 0.0)
    kl = kl_divergence(a, a[::-1])
    p, q = np.exp(a[0]) / np.exp(a[0]).sum(), np.full(3, 1 / 3)
    assert kl[0] == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-12) and kl[1] > 0
    assert identical_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and identical_prefix([], [1]) == 0
    assert text_similarity("abcd", "abcd") == 1.0 and text_similarity("abcd", "wxyz") == 0.0
    assert text_similarity("ab", "abcd") == pytest.approx(2 * 2 / 6)


def test_reference_against_itself_is_identical(ref_dir, images):
    report = run_eval(ref_dir, ref_dir, images)  # two separately loaded copies of the same export
    agg = report["aggregate"]
    assert agg["top1_agreement"] == 1.0 and agg["kl_max"] < 1e-6 and agg["similarity"] == 1.0
    assert agg["identical_prefix_share"] == 1.0 and agg["vision_cosine"] == pytest.approx(1.0, abs=1e-6)
    for sample in report["samples"]:
        assert sample["cand_tokens"] == sample["ref_tokens"] and sample["identical_prefix"] == len(sample["ref_tokens"])
        assert sample["positions"] == len(sample["ref_tokens"]) + (sample["ref_finish"] == "eos")
    assert report["properties"] == F32


@pytest.fixture(scope="module")
def lm_reports(ref_pipe, compressed, images):
    return {name: run_eval(ref_pipe, compressed[name], images) for name in ("int8", "int4")}


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_compressed_numbers_are_bounded(name, lm_reports):
    report = lm_reports[name]
    agg = report["aggregate"]
    assert 0.0 <= agg["top1_agreement"] <= 1.0 and 0.0 <= agg["similarity"] <= 1.0
    assert 0.0 < agg["kl_mean"] <= agg["kl_max"] and math.isfinite(agg["kl_max"])  # weights did change
    assert agg["vision_cosine"] == pytest.approx(1.0, abs=1e-6)  # the vision encoder is untouched
    assert report["candidate"]["precision"]["language"] != report["reference"]["precision"]["language"]
    for s in report["samples"]:
        assert 0 <= s["identical_prefix"] <= min(len(s["ref_tokens"]), len(s["cand_tokens"]))


def test_greedy_answers_equal_pipeline_generate(lm_reports, ref_pipe, compressed, images):
    sample = lm_reports["int8"]["samples"][0]
    cfg = GenerationConfig(max_new_tokens=TOKENS)
    assert sample["image"] == images[0].name
    assert sample["ref_tokens"] == ref_pipe.generate(PROMPT[0], images[:1], cfg).token_ids
    cand = Pipeline(compressed["int8"], properties=F32, cache_dir=None)
    assert sample["cand_tokens"] == cand.generate(PROMPT[0], images[:1], cfg).token_ids


def test_int8_is_closer_than_int4(lm_reports):
    # Holds with a wide margin on the tiny model: KL 3.6e-3 (INT8 per channel) vs 0.31 (INT4 g64 r0.6).
    int8, int4 = lm_reports["int8"]["aggregate"], lm_reports["int4"]["aggregate"]
    assert int8["kl_mean"] < int4["kl_mean"]
    assert int8["top1_agreement"] >= int4["top1_agreement"]


def test_report_json_and_table(lm_reports, tmp_path):
    report = json.loads(json.dumps(lm_reports["int4"]))  # JSON-serialisable as it is
    assert {"reference", "candidate", "device", "properties", "settings", "metrics", "aggregate", "vision",
            "samples"} <= report.keys()  # fmt: skip
    assert set(METRICS) <= set(report["aggregate"])
    sample_keys = {"image", "prompt", "positions", "top1_agreement", "kl_mean", "kl_max", "identical_prefix",
                   "similarity", "ref_text", "cand_text", "ref_tokens", "cand_tokens"}  # fmt: skip
    assert all(sample_keys <= s.keys() for s in report["samples"])
    assert report["candidate"]["runtime"]["language"]["INFERENCE_PRECISION_HINT"] == "f32"
    table = format_table(report)
    assert "top-1" in table and "mean" in table and len(table.splitlines()) == 2 + len(report["samples"]) + 4 + len(LEGEND)
    assert "higher is better" in table and "lower is better" in table  # says which values are good


def test_vision_ptq_changes_features_a_little(ref_pipe, compressed, images):
    report = run_eval(ref_pipe, compressed["int4+ptq"], images[:1], tokens=4)
    assert report["candidate"]["precision"] == {"vision": "int8_ptq", "text_embeddings": "int8_asym",
                                                "language": "int4_sym g64 r0.6 + int8"}  # fmt: skip
    vision = report["vision"][0]
    assert 0.9 < vision["vision_cosine"] < 1.0 and vision["vision_min_token_cosine"] <= vision["vision_cosine"]


def test_bad_inputs(ref_dir, exports, tmp_path):
    with pytest.raises(InvalidImageError):
        evaluate(ref_dir, ref_dir, images=[tmp_path / "missing.png"], cache_dir=None)
    with pytest.raises(LlavaOvError, match="max_new_tokens"):
        evaluate(ref_dir, ref_dir, max_new_tokens=0, cache_dir=None)
    with pytest.raises(LlavaOvError, match="tokenize the same prompt differently"):
        evaluate(ref_dir, exports["llava"], prompts=PROMPT, max_new_tokens=2, cache_dir=None)


# ---------------------------------------------------------------- compressed exports still run


def test_compressed_export_runs_in_pipeline_and_cli(compressed, photos, tmp_path):
    export = compressed["int4+ptq"]
    stats = weight_stats(export / "openvino_language_model.xml")
    assert {"i4", "u4"} & set(stats["weights"]) and weight_stats(export / "openvino_vision_embeddings_model.xml")[
        "fake_quantize"] > 0  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "llava_ov.cli", "run", str(export), "--image", str(photos["coffee"]), "--prompt",
         "What is it?", "--max-new-tokens", "8", "--json"], capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    expected = Pipeline(export, cache_dir=None).generate("What is it?", [photos["coffee"]], GenerationConfig(8))
    assert out["token_ids"] == expected.token_ids and len(expected.token_ids) > 0


def test_compressed_export_runs_in_genai(compressed, photos):
    og = pytest.importorskip("openvino_genai")
    vlm = og.VLMPipeline(str(compressed["int4+ptq"]), "CPU", ATTENTION_BACKEND="SDPA")
    cfg = og.GenerationConfig()
    cfg.max_new_tokens, cfg.do_sample, cfg.apply_chat_template = 6, False, False
    pixels = np.array(Image.open(photos["rocket"]).convert("RGB"))
    result = vlm.generate("[INST] <image>What is this? [/INST]", images=[ov.Tensor(pixels[None])],
                          generation_config=cfg)  # fmt: skip
    assert result.perf_metrics.get_num_generated_tokens() > 0
