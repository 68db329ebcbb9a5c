"""Families as folders: the registry by architecture, and nothing outside a family's folder reads its fields."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from llava_ov.errors import UnsupportedModelError
from llava_ov.runtime.budget import Resolution
from llava_ov.runtime.export import ImageConfig
from llava_ov.runtime import families
from llava_ov.runtime.families import family_for, registered

SRC = Path(importlib.import_module("llava_ov").__file__).parent
# config fields and flags that belong to a family (its folder) or to the export reader that parses the files
FAMILY_FIELDS = {"image_grid_pinpoints", "image_newline", "vision_feature_select_strategy", "vision_feature_layer",
                 "image_token_index", "packs_features", "preprocessing"}  # fmt: skip
ALLOWED = ("families/", "runtime/export.py")


def test_dispatch_by_architecture_with_model_type_fallback():
    assert family_for({"architectures": ["LlavaNextForConditionalGeneration"]}).model_type == "llava_next"
    assert family_for({"architectures": ["LlavaForConditionalGeneration"], "model_type": "x"}).model_type == "llava"
    assert family_for({"model_type": "llava_next"}).architecture == "LlavaNextForConditionalGeneration"


def test_the_architecture_decides_not_the_model_type():
    video = {"architectures": ["LlavaNextVideoForConditionalGeneration"], "model_type": "llava_next"}
    assert family_for(video).model_type == "llava_next_video"  # the Hub's first configs of LLaVA-NeXT-Video
    onevision = {"architectures": ["LlavaOnevisionForConditionalGeneration"], "model_type": "llava"}
    assert family_for(onevision).model_type == "llava_onevision"
    other = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "llava"}
    with pytest.raises(UnsupportedModelError, match="Qwen2VL.*not supported.*LlavaForConditionalGeneration"):
        family_for(other)
    with pytest.raises(UnsupportedModelError, match="model_type='bert' is not supported"):
        family_for({"model_type": "bert"})


def test_registry_is_lazy_and_every_entry_loads():
    assert set(registered()) == {"LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                                 "LlavaNextVideoForConditionalGeneration", "VipLlavaForConditionalGeneration",
                                 "LlavaOnevisionForConditionalGeneration"}
    for entry in registered().values():
        module = entry.runtime_module()
        assert module.FAMILY.architecture == entry.architecture and module.FAMILY.model_type == entry.model_type


def test_a_family_is_registered_by_adding_its_folder(tmp_path, monkeypatch):
    """A folder with MODEL_TYPE and ARCHITECTURES in its __init__.py is found; nothing else is edited."""
    import llava_ov.families as package

    folder = tmp_path / "toy_family"
    folder.mkdir()
    (folder / "__init__.py").write_text('MODEL_TYPE = "toy"\nARCHITECTURES = ("ToyForConditionalGeneration",)\n')
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(tmp_path)])
    families.registered.cache_clear()
    try:
        entry = family_for({"architectures": ["ToyForConditionalGeneration"]})
        assert (entry.model_type, entry.package) == ("toy", "llava_ov.families.toy_family")
        assert "ToyForConditionalGeneration" in families.supported_architectures()
    finally:
        families.registered.cache_clear()


def test_a_bound_family_answers_from_its_config():
    cfg = {"architectures": ["LlavaNextForConditionalGeneration"], "image_token_index": 7, "image_newline": [0.5] * 4,
           "vision_config": {"image_size": 336, "patch_size": 14}}  # fmt: skip
    image = ImageConfig(crop_size={"height": 336, "width": 336}, size={"shortest_edge": 336})
    nxt = family_for(cfg).load(cfg, image)
    assert nxt.image_token_id == 7 and nxt.tokens_per_tile == 576
    options = nxt.resolutions((672, 672))
    assert [(o.label, o.tokens) for o in options][-1] == ("base", 577)
    assert list(nxt.packed_tiles((672, 672), options[-1])) == [0] * 576 + [-1]
    one = family_for({"model_type": "llava"}).load({"vision_config": {}}, image)
    assert one.resolutions((10, 20)) == [Resolution(None, 576, (1, 1))] and one.image_token_id == 32000
    tiles = np.ones((1, 576, 4), np.float32)
    assert one.pack(tiles, None).shape == (576, 4)


def _names(tree: ast.AST) -> set[str]:
    """Identifiers, attributes, keywords and string constants of a module (docstrings and comments left out)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}  # fmt: skip
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.add(node.value)
    return out


def test_no_module_outside_the_family_folders_names_a_family_field():
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(ALLOWED):
            continue
        found = _names(ast.parse(path.read_text())) & FAMILY_FIELDS
        if found:
            offenders[rel] = sorted(found)
    assert offenders == {}


def test_the_field_check_can_fail():
    assert _names(ast.parse("cfg.get('image_newline')\nx.packs_features")) & FAMILY_FIELDS
    assert not _names(ast.parse('"""image_newline in a docstring"""')) & FAMILY_FIELDS
