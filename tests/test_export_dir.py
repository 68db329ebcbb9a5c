"""The one reader of an export directory (runtime/export.py): clear errors, each file read once, tolerant export_info."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ov.common import layout
from llava_ov.errors import LlavaOvError, ModelNotFoundError
from llava_ov.runtime.export import REQUIRED_FILES, ExportDir

CONFIG = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "eos_token_id": 2,
          "text_config": {"eos_token_id": [2, 7]}}  # fmt: skip


def _export(folder: Path, **files: object) -> Path:
    """A folder with the required files (empty IRs) and `files` as JSON (or text for str values)."""
    folder.mkdir(exist_ok=True)
    for name in REQUIRED_FILES:
        (folder / name).write_text("{}" if name.endswith(".json") else "")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    for name, content in files.items():
        name = name.replace("__", ".")
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def test_missing_folder_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such model directory"):
        ExportDir.open(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match=r"not a llava-ov export \(missing .*openvino_language_model.xml"):
        ExportDir.open(tmp_path)
    export = ExportDir.open(_export(tmp_path / "ok"))
    with pytest.raises(ModelNotFoundError, match="preprocessor_config.json or processor_config.json"):
        export.image_config
    with pytest.raises(LlavaOvError, match="no chat template"):
        export.chat_template


def test_export_info_is_tolerant(tmp_path):
    absent = ExportDir(_export(tmp_path / "absent"))
    assert absent.info == {} and absent.record() is None and absent.notes == []
    assert absent.stored_precision("language") == "?" and not absent.rotary_in_fp16()
    broken = ExportDir(_export(tmp_path / "broken", export_info__json="{not json"))
    assert broken.info == {}
    info = {"source": "ckpt", "parts": {"language": {"precision": "fp16"}}, "notes": ["random weights"], "new": 1}
    good = ExportDir(_export(tmp_path / "good", export_info__json=info))
    assert good.record().source == "ckpt" and good.notes == ["random weights"]
    assert good.stored_precision("language") == "fp16" and good.rotary_in_fp16()  # no rotary_frequencies record


def test_each_file_is_read_once(tmp_path, monkeypatch):
    folder = _export(tmp_path / "e", generation_config__json={"eos_token_id": 5},
                     preprocessor_config__json={"crop_size": 336}, chat_template__jinja="{{ messages }}")  # fmt: skip
    reads: list[str] = []
    real = Path.read_text

    def counting(self, *args, **kwargs):
        reads.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    export = ExportDir(folder)
    for _ in range(3):
        assert export.eos_ids() == {2, 5, 7}
        assert export.image_config.crop_size == {"height": 336, "width": 336}
        assert export.chat_template == "{{ messages }}"
        export.info, export.config  # noqa: B018
    assert sorted(reads) == sorted(["config.json", "generation_config.json", "preprocessor_config.json",
                                    "chat_template.jinja"])  # fmt: skip


def test_image_settings_from_either_file_and_vision_float_file(tmp_path):
    proc = {"image_processor": {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}}}
    export = ExportDir(_export(tmp_path / "p", processor_config__json=proc))
    assert export.image_config.crop_size == {"height": 224, "width": 224}
    info = {"parts": {"vision": {"precision": "int8_ptq", "float_file": layout.VISION_FLOAT_MODEL,
                                 "float_precision": "fp16"}}}  # fmt: skip
    folder = _export(tmp_path / "v", export_info__json=info)
    assert ExportDir(folder).vision_float_file is None  # named but not there
    (folder / layout.VISION_FLOAT_MODEL).write_text("")
    assert ExportDir(folder).vision_float_file == layout.VISION_FLOAT_MODEL
    assert ExportDir(folder).vision_float_precision == "fp16"
