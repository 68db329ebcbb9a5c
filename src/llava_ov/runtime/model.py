"""An export directory loaded for inference: compiled models, tokenizer, and the KV state.

Owns everything that talks to OpenVINO at run time: the vision encoder, the text
embeddings, the stateful language model (its KV cache lives in the infer
request's state), and the tokenizer/detokenizer IRs.  No torch, no transformers.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from llava_ov.common import hardware, layout
from llava_ov.errors import InvalidTextError, LlavaOvError, ModelNotFoundError
from llava_ov.runtime.decode_choice import (
    DecodeChoices, GroupMeasured, choice_key, int4_group_size, time_decode_steps, time_group_choice,
)
from llava_ov.runtime.detokenize import PieceDecoder
from llava_ov.runtime.engine.paged import PagedLanguageModel, derive_paged_model
from llava_ov.runtime.export import ExportDir
from llava_ov.runtime.generate import IncrementalDetokenizer
from llava_ov.runtime.families import Family, family_for, load_family
from llava_ov.runtime.settings import LoadSettings

log = logging.getLogger(__name__)
F32_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
DQ_GROUP = "DYNAMIC_QUANTIZATION_GROUP_SIZE"


def default_cache_dir() -> Path:
    """The user's compiled-model cache: `$LLAVA_OV_HOME/compiled`, else `$XDG_CACHE_HOME/llava-ov/compiled`."""
    if os.environ.get("LLAVA_OV_HOME"):
        return Path(os.environ["LLAVA_OV_HOME"]) / "compiled"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llava-ov" / "compiled"


def cache_dir_for(option: str | None, device: str) -> str | None:
    """The compiled-model cache dir for a part on `device`, or None.

    The default cache covers GPU and NPU only, where compiling takes long. On CPU, compiling
    an export takes about a second, and a model imported from the cache decoded 1.8x slower
    (fp16 2-layer real-width export, OpenVINO 2026.4, AVX2 CPU: 108-119 ms vs 54-63 ms per
    token), so CPU parts are compiled fresh unless a cache dir is given explicitly.
    """
    if not option:
        return None
    if option != "default":
        return str(Path(option).expanduser())
    return str(default_cache_dir()) if device.upper().startswith(("GPU", "NPU")) else None


def check_export_dir(path: str | Path) -> Path:
    """An export directory with every required file, or a clear error (see `ExportDir.open`)."""
    return ExportDir.open(path).path


AUTO_DECODE_HEADROOM = 4 * 2**30  # besides 3x the LM file, for the KV pool, vision and activations


# Tiny graphs (string ops, a gather): one thread avoids thread-pool wake-ups that cost more than the work.
SMALL_GRAPH = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}


class Tokenizer:
    """openvino-tokenizers IRs: text -> ids (with BOS), ids -> text (special tokens skipped)."""

    def __init__(self, core: ov.Core, export: ExportDir):
        self._encoder = core.compile_model(export.tokenizer_path, "CPU", SMALL_GRAPH)
        self._decoder = core.compile_model(export.detokenizer_path, "CPU", SMALL_GRAPH)
        self._enc_req = self._encoder.create_infer_request()
        self._dec_req = self._decoder.create_infer_request()
        self._enc_lock = threading.Lock()  # one encode at a time on the one request
        self._dec_lock = threading.Lock()
        self.pieces = PieceDecoder.from_export(export)

    @property
    def max_piece_bytes(self) -> int:
        """The longest vocabulary piece in UTF-8 bytes (64 when the vocabulary is not readable)."""
        if self.pieces is None:
            return 64
        return max((len(p) for p in self.pieces.pieces if p), default=64)

    def stream(self):
        """A text stream for one generation: vocabulary table when possible, else the detokenizer IR."""
        return self.pieces.stream() if self.pieces is not None else IncrementalDetokenizer(self.decode)

    def encode(self, text: str) -> np.ndarray:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates ("\ud800" in JSON) have no UTF-8 form
            raise InvalidTextError(f"the text is not valid Unicode (character {exc.start}: a lone surrogate)") from None
        with self._enc_lock:
            self._enc_req.infer([text])
            return self._enc_req.get_tensor("input_ids").data[0].astype(np.int64)

    def decode(self, ids) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if arr.shape[1] == 0:
            return ""
        with self._dec_lock:
            self._dec_req.infer([arr])
            return self._dec_req.get_output_tensor(0).str_data[0]

    def token_bytes(self, token_id: int) -> bytes:
        """One token's text as bytes (b"" for special tokens; a piece may be part of a character)."""
        if self.pieces is not None:
            pieces = self.pieces.pieces
            return (pieces[token_id] if 0 <= token_id < len(pieces) else None) or b""
        return self.decode([token_id]).encode()


def _plain(value: Any) -> str:
    """OpenVINO property values as text: Type -> 'f32', lists joined."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return value.to_string() if isinstance(value, ov.Type) else str(value)


class ExportedModel:
    """Compiled parts of one export plus the language model's KV state."""

    def __init__(self, export_dir: str | Path, settings: LoadSettings | None = None):
        self.settings = (settings or LoadSettings()).validate()
        self.export = ExportDir.open(export_dir)
        self.dir = self.export.path
        self.config: dict[str, Any] = self.export.config
        self.family_entry = family_for(self.config)  # an unsupported architecture fails here, before compiling
        self._family: Family | None = None
        import openvino_tokenizers  # noqa: F401  (adds the tokenizer operations to Cores made after it)

        self.core = ov.Core()
        self.kv_backend = self.settings.kv_backend()
        self.decode_why = "the stateful KV cache: one compilation" if self.kv_backend != "paged" else ""
        self.decode_measured = None  # decode_choice.Measured, when "auto" measured (or remembered) the choice
        self.dq_why = "the plugin's: the stateful KV cache" if self.kv_backend != "paged" else ""
        self.dq_measured = None  # decode_choice.GroupMeasured, when "auto" measured (or remembered) the group
        self.language_props: dict[str, Any] = {}  # what the paged LM was compiled with (the f32 variant adds to it)
        self._warn_if_rotary_fp16()
        self.parts = self._parts()
        self._compiled = {part: self._compile(part) for part in self.parts}
        self.tokenizer = Tokenizer(self.core, self.export)
        self.vision_requests = self._vision_requests()
        # the free vision request sets: one infer request per vision stage ("vision", a family's projector, ...)
        self._vision: queue.SimpleQueue[dict[str, ov.InferRequest]] = queue.SimpleQueue()
        for _ in range(self.vision_requests):
            self._vision.put({part: self._compiled[part].create_infer_request() for part in self.vision_stages})
        self._embed = self._compiled["text_embeddings"].create_infer_request()
        self._embed_side = None  # for instruction embeddings (pruning), made on first use
        self._embed_side_lock = threading.Lock()
        self.paged = None  # the PagedLanguageModel, when kv_backend == "paged"
        if self.kv_backend == "paged":
            self.paged = PagedLanguageModel(self._compiled["language"], self._compile_decode_variant())
            self._paged_source = None  # derived for the compilations only
        else:
            self._lm = self._compiled["language"].create_infer_request()
        self.kv_len = 0
        self._mask = np.ones((1, self.max_context + 1), dtype=np.int64)
        self._beam_idx = np.zeros(1, dtype=np.int32)

    # ---------------------------------------------------------------- loading

    @property
    def vision_stages(self) -> tuple[str, ...]:
        return ("vision", *self.family.stages)

    def _parts(self) -> dict[str, str]:
        """Every model of the export to compile: the three parts plus the family's vision stages."""
        parts = dict(layout.MODEL_PARTS)
        for stage in self.family.stages:
            parts[stage] = layout.STAGE_PARTS[stage]
            if stage not in self.settings.part_paths and not self.export.part_path(stage).is_file():
                raise ModelNotFoundError(f"{self.dir} has no {parts[stage]} (the {stage} of a "
                                         f"{self.family.architecture} export); convert it again")  # fmt: skip
        return parts

    def part_path(self, part: str) -> Path:
        override = self.settings.part_paths.get(part)
        if not override and part == "vision":
            return self.dir / self.vision_choice()[0]
        if not override:
            return self.export.part_path(part)
        path = Path(override).expanduser()
        path = path / layout.ALL_PARTS[part] if path.is_dir() else path
        if not path.exists():
            raise ModelNotFoundError(f"{part} model not found: {path}")
        return path

    def _vision_requests(self) -> int:
        """Images encoded at once: the setting, else what the plugin calls optimal for the vision
        compilation (1 on CPU under its latency hint: one encode already uses every core; two at once
        made concurrent image requests' TTFT no better on 2 cores, docs/benchmarks.md)."""
        if self.settings.vision_requests is not None:
            return self.settings.vision_requests
        try:
            return max(1, int(self._compiled["vision"].get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        except RuntimeError:  # a plugin that does not report it
            return 1

    def vision_choice(self) -> tuple[str, str]:
        """(file, why) of the vision encoder to run: the INT8-PTQ one or the float one beside it."""
        mode = self.settings.vision_encoder
        float_file = self.export.vision_float_file
        if not float_file:
            precision = self.export.stored_precision("vision", "the export")
            if mode == "float" and precision == "int8_ptq":
                raise ModelNotFoundError(f"{self.dir} has only the INT8-PTQ vision encoder (no {layout.VISION_FLOAT_MODEL})")
            return layout.VISION_MODEL, f"the export's only vision encoder ({precision})"
        if mode != "auto":
            chosen = layout.VISION_MODEL if mode == "int8" else float_file
            return chosen, f"chosen with vision_encoder={mode}"
        device = self.settings.device_for("vision").upper()
        units = hardware.int8_matrix_units()
        if device != "CPU":
            return layout.VISION_MODEL, f"INT8-PTQ on {device}"
        if units:
            return layout.VISION_MODEL, f"INT8-PTQ: this CPU has {', '.join(units)}"
        return float_file, "float: this CPU has no int8 matrix units (VNNI/AMX), where the INT8 encoder is not faster"

    def _warn_if_rotary_fp16(self) -> None:
        """Exports made by older llava-ov versions stored the rotary frequencies in fp16: answers drift with length."""
        if self.export.rotary_in_fp16():
            log.warning("%s stores its rotary frequencies in fp16 (made by an older llava-ov): logits drift with "
                        "prompt length (0.04 at 20 tokens, 8.8 at 4,000 on a test model); convert it again",
                        self.dir)  # fmt: skip

    def _compile(self, part: str) -> ov.CompiledModel:
        device = self.settings.device_for(part)
        props = dict(SMALL_GRAPH) if part == "text_embeddings" and device == "CPU" else {}
        cache = cache_dir_for(self.settings.cache_dir, device)
        if cache:
            props["CACHE_DIR"] = cache
        props.update(self.settings.properties)
        if part == "vision" and self.settings.vision_threads:
            props["INFERENCE_NUM_THREADS"] = self.settings.vision_threads
        if part == "language":
            props = self._avoid_known_crash(device, props)
        source: Any = self.part_path(part)
        if part == "language" and self.kv_backend == "paged":
            source = self._paged_source = derive_paged_model(self.core, source, self.part_path("text_embeddings"))
            return self._compile_paged_language(source, device, props)
        return self._compile_source(part, source, device, props)

    def _compile_source(self, part: str, source: Any, device: str, props: dict[str, Any]) -> ov.CompiledModel:
        try:
            return self.core.compile_model(source, device, props)
        except RuntimeError as exc:
            raise LlavaOvError(f"cannot compile the {part} model on {device}: {self._reason(exc, device)}") from None

    def _compile_paged_language(self, source: ov.Model, device: str, props: dict[str, Any]) -> ov.CompiledModel:
        """The paged LM compiled with the activation group `dq_group_choice` gives (measured for "auto": both
        compilations timed at first load, the decision remembered)."""
        group, self.dq_why = self.dq_group_choice(device, props, source)
        grouped = {**props, DQ_GROUP: group} if group is not None else props
        compiled = None
        if self.dq_why == "measure":
            choices, key = DecodeChoices(self._choices_folder()), self._group_key(props)
            measured = choices.get(key, GroupMeasured)
            if measured is None:
                default = self._compile_source("language", source, device, props)
                variant = self._compile_source("language", source, device, grouped)
                measured = time_group_choice(default, variant, group)
                choices.put(key, measured)
                compiled = variant if measured.pays else default  # the other one is freed with its weights
            self.dq_measured = measured
            self.dq_why = measured.why(int(self.core.get_property("CPU", DQ_GROUP)))
            grouped = grouped if measured.pays else props
        self.language_props = grouped  # what the f32 decode variant starts from
        return compiled or self._compile_source("language", source, device, grouped)

    def dq_group_choice(self, device: str, props: dict[str, Any], source: ov.Model) -> tuple[int | None, str]:
        """(the activation group to compile the paged LM with (None: the plugin's), why); why "measure": time
        the plugin's group against the INT4 weights' one."""
        mode = self.settings.dq_group_size
        if mode == "plugin":
            return None, "the plugin's: chosen with dq_group_size=plugin"
        if device.upper() != "CPU":
            return None, f"the plugin's: the language model runs on {device}"
        if DQ_GROUP in props:
            return None, f"{props[DQ_GROUP]}: {DQ_GROUP} is set by the caller"
        group = int4_group_size(source)
        if group is None:
            return None, "the plugin's: the language model has no INT4 weights"
        plugin = int(self.core.get_property("CPU", DQ_GROUP))
        if plugin == group:
            return None, f"the plugin's group of {plugin}: the INT4 weights' group too"
        if mode == "weights":
            return group, f"the weights' group of {group}: chosen with dq_group_size=weights"
        short = self._short_of_memory_for_two()
        if short:
            return None, f"the plugin's group of {plugin}: timing a second compilation {short}"
        return group, "measure"

    def decode_choice(self) -> tuple[bool | None, str]:
        """(compile the f32 decode variant?, why) for the paged language model; None: measure which is faster.

        "auto" measures (decode_choice.py) wherever the variant can differ: the CPU plugin computing in a
        lower precision than f32 by default, no precision pinned by the caller, and room for a second copy
        of the weights (both compilations repack theirs on first use, so the memory available at load must
        hold 3x the LM file plus AUTO_DECODE_HEADROOM: pool, activations)."""
        mode = self.settings.decode_precision
        device = self.settings.device_for("language").upper()
        if mode == "same":
            return False, "same as prefill: chosen with decode_precision=same"
        if device != "CPU":
            if mode == "f32":
                raise LlavaOvError(f"decode_precision='f32' is for the CPU plugin; the language model runs on {device}")
            return False, f"same as prefill: the language model runs on {device}"
        main = self._compiled["language"].get_property("INFERENCE_PRECISION_HINT")
        if mode == "f32":
            if main == ov.Type.f32:
                log.warning("the language model already computes in f32: the f32 decode variant only costs memory")
            return True, "f32 decode steps: chosen with decode_precision=f32"
        if "INFERENCE_PRECISION_HINT" in self.settings.properties:
            return False, "same as prefill: INFERENCE_PRECISION_HINT is set by the caller"
        if main == ov.Type.f32:
            return False, "same as prefill: the CPU plugin computes in f32 here already"
        short = self._short_of_memory_for_two()
        if short:
            return False, f"same as prefill: a second copy {short}"
        return None, "measure"

    def _short_of_memory_for_two(self) -> str:
        """Why two compilations of the language model do not fit now ("" when they do): both repack their
        weights on first use, so the memory available must hold 3x the LM file plus AUTO_DECODE_HEADROOM."""
        weights_file = self.part_path("language").with_suffix(".bin")
        size = weights_file.stat().st_size if weights_file.exists() else 0
        need, room = 3 * size + AUTO_DECODE_HEADROOM, hardware.available_memory()
        if room >= need:
            return ""
        return (f"of the {size / 2**30:.1f} GiB language model needs {need / 2**30:.1f} GiB available at load, "
                f"{room / 2**30:.1f} GiB are")  # fmt: skip

    def _compile_decode_variant(self) -> ov.CompiledModel | None:
        """The language model compiled again for decode steps (`decode_choice`; measured for "auto"), or None."""
        wanted, self.decode_why = self.decode_choice()
        if wanted is False:
            return None
        main = self._compiled["language"]
        default_name = _plain(main.get_property("INFERENCE_PRECISION_HINT"))
        choices, key = DecodeChoices(self._choices_folder()), self._decode_key(main)
        known = choices.get(key) if wanted is None else None
        self.decode_measured = known
        if known is not None and not known.f32_pays:
            self.decode_why = known.why(default_name)
            return None
        variant = self._compile_f32_variant(main)
        if wanted is None:
            measured = self.decode_measured = known or time_decode_steps(main, variant)
            if known is None:
                choices.put(key, measured)
            self.decode_why = measured.why(default_name)
            if not measured.f32_pays:
                return None  # the variant is dropped with its weights
        return variant

    def _compile_f32_variant(self, main: ov.CompiledModel) -> ov.CompiledModel:
        device = self.settings.device_for("language")
        kv = main.get_property("KV_CACHE_PRECISION")  # the variant must keep the same block tensors
        props = {**self.language_props, "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": kv}
        try:
            return self.core.compile_model(self._paged_source, device, props)  # the main one's source
        except RuntimeError as exc:
            raise LlavaOvError(f"cannot compile the f32 decode variant: {self._reason(exc, device)}") from None

    def _choices_folder(self) -> Path | None:
        """Where measured choices are remembered: the compiled-model cache folder (None: not remembered)."""
        option = self.settings.cache_dir
        if not option:
            return None
        return default_cache_dir() if option == "default" else Path(option).expanduser()

    def _group_key(self, props: dict[str, Any]) -> str:
        """What the activation-group decision depends on (known before compiling): the decode key's parts with
        the compile properties as given (precision, threads, KV precision; the plugin's defaults when unset)."""
        given = ",".join(f"{k}={_plain(v)}" for k, v in sorted(props.items()) if k != "CACHE_DIR") or "defaults"
        weights = self.part_path("language").with_suffix(".bin")
        return f"dq-group|{choice_key(hardware.cpu_model(), ov.get_version(), weights, 'given', 'given')}|{given}"

    def _decode_key(self, main: ov.CompiledModel) -> str:
        props = {}
        for name in ("INFERENCE_NUM_THREADS", "KV_CACHE_PRECISION", DQ_GROUP):
            try:
                props[name] = _plain(main.get_property(name))
            except RuntimeError:
                props[name] = "?"
        return choice_key(hardware.cpu_model(), ov.get_version(), self.part_path("language").with_suffix(".bin"),
                          props["INFERENCE_NUM_THREADS"], props["KV_CACHE_PRECISION"]) + f"|dq {props[DQ_GROUP]}"  # fmt: skip

    def _avoid_known_crash(self, device: str, props: dict[str, Any]) -> dict[str, Any]:
        """OpenVINO 2026.4's CPU plugin dies with SIGFPE compiling the language model with
        INFERENCE_NUM_THREADS=1 at bf16, the default on CPUs with AVX-512-bf16/AMX (seen with both KV
        cache kinds; 2+ threads, f32 and f16 compile). Such a setting gets f32 compute for that part."""
        threads = props.get("INFERENCE_NUM_THREADS")
        if device.upper() != "CPU" or threads is None or int(threads) != 1 or "INFERENCE_PRECISION_HINT" in props:
            return props
        if self.core.get_property("CPU", "INFERENCE_PRECISION_HINT") != ov.Type.bf16:
            return props
        log.warning("one CPU thread at bf16 crashes OpenVINO's compiler for the language model: it runs at f32")
        return {**props, "INFERENCE_PRECISION_HINT": "f32"}

    def _reason(self, exc: RuntimeError, device: str) -> str:
        """OpenVINO's message without its source-location lines, and the devices this machine has."""
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("Exception from")]
        reason = lines[-1] if lines else type(exc).__name__
        available = self.core.available_devices
        name = device.split(":")[0].split(".")[0].upper()
        if name not in ("AUTO", "HETERO", "MULTI", "BATCH") and name not in {d.split(".")[0] for d in available}:
            reason += f" (devices on this machine: {', '.join(available) or 'none'})"
        return reason

    def stored_weights(self) -> dict[str, str]:
        """Per part: how the weights that run are stored (fp16, int4_sym g64 r0.6 + int8, ...), or where from."""
        stored = {part: self.export.stored_precision(part) for part in self.parts}
        if self.vision_choice()[0] != layout.VISION_MODEL and "vision" not in self.settings.part_paths:
            stored["vision"] = self.export.vision_float_precision
        for part, path in self.settings.part_paths.items():
            stored[part] = f"from {path}"
        return stored

    def runtime_info(self) -> dict[str, dict[str, str]]:
        """Per part: the device and precisions it actually runs with, as plain strings ('f32', 'u8', 'CPU')."""
        info = {}
        for part, compiled in self._compiled.items():
            props = {}
            for key in ("EXECUTION_DEVICES", "INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION",
                        "DYNAMIC_QUANTIZATION_GROUP_SIZE", "INFERENCE_NUM_THREADS"):  # fmt: skip
                try:
                    props[key] = _plain(compiled.get_property(key))
                except RuntimeError:  # not every device reports every property
                    pass
            if part != "language":
                props.pop("KV_CACHE_PRECISION", None)
            info[part] = props
        if self.paged is not None and self.paged.decode_request is not None:
            info["language"]["DECODE_STEPS"] = f"f32 (steps of at most {self.paged.decode_tokens} tokens)"
        return info

    # ---------------------------------------------------------------- config

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config", {})

    @property
    def max_context(self) -> int:
        return int(self.text_config.get("max_position_embeddings", 4096))

    @property
    def family(self) -> Family:
        """The export's model family (llava_ov/families), bound to its config and image settings."""
        if self._family is None:
            self._family = load_family(self.export)
        return self._family

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.get("hidden_size", 4096))

    # ---------------------------------------------------------------- parts

    def encode_image_tiles(self, pixel_values: np.ndarray) -> np.ndarray:
        """[tiles, 3, H, W] -> [tiles, tokens_per_tile, hidden] projected features.

        Thread-safe: runs on one of `vision_requests` request sets (waits for a free one)."""
        return self._run_vision(self.family.encode_tiles, pixel_values)

    def encode_frames(self, pixel_values: np.ndarray) -> np.ndarray:
        """[frames, 3, H, W] -> [frames, tokens_per_frame, hidden] video features (thread-safe, as above)."""
        return self._run_vision(self.family.encode_frames, pixel_values)

    def _run_vision(self, encode: Any, pixel_values: np.ndarray) -> np.ndarray:
        """`encode(run, pixels)` on one free request set; `run(stage, array)` infers one vision stage."""
        requests = self._vision.get()

        def run(stage: str, array: np.ndarray) -> np.ndarray:
            request = requests[stage]
            request.infer({0: np.ascontiguousarray(array, dtype=np.float32)})
            return request.get_output_tensor(0).data.copy()

        try:
            return encode(run, pixel_values)
        finally:
            self._vision.put(requests)

    def embed_instruction(self, ids: np.ndarray) -> np.ndarray:
        """[T] ids -> [T, hidden] on a request of its own (the engine thread owns `embed_tokens`'s)."""
        if len(ids) == 0:
            return np.zeros((0, self.hidden_size), np.float32)
        with self._embed_side_lock:
            if self._embed_side is None:
                self._embed_side = self._compiled["text_embeddings"].create_infer_request()
            self._embed_side.set_input_tensor(ov.Tensor(np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)))
            self._embed_side.infer()
            return self._embed_side.get_output_tensor(0).data[0].copy()

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """[T] token ids -> [T, hidden] embeddings."""
        self._embed.set_input_tensor(ov.Tensor(np.ascontiguousarray(ids, dtype=np.int64).reshape(1, -1)))
        self._embed.infer()
        return self._embed.get_output_tensor(0).data[0]

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """Run [T, hidden] embeddings after the cached prefix; returns the last position's logits.

        The stateful path only (kv_backend "stateful"); the paged one runs through the engine."""
        steps = embeds.shape[0]
        start, end = self.kv_len, self.kv_len + steps
        if end > self.max_context:
            raise LlavaOvError(f"sequence of {end} tokens exceeds the model's context of {self.max_context}")
        self._lm.set_tensor("inputs_embeds", ov.Tensor(np.ascontiguousarray(embeds[None], dtype=np.float32)))
        self._lm.set_tensor("attention_mask", ov.Tensor(self._mask[:, :end]))
        self._lm.set_tensor("position_ids", ov.Tensor(np.arange(start, end, dtype=np.int64)[None]))
        self._lm.set_tensor("beam_idx", ov.Tensor(self._beam_idx))
        self._lm.infer()
        self.kv_len = end
        return self._lm.get_tensor("logits").data[0, -1]

    def reset(self) -> None:
        """Forget the KV cache."""
        self._lm.reset_state()
        self.kv_len = 0

    def trim(self, length: int) -> None:
        """Keep only the first `length` cached positions."""
        if length >= self.kv_len:
            return
        if length == 0:
            self.reset()
            return
        for state in self._lm.query_state():
            kept = np.take(state.state.data, np.arange(length), axis=layout.KV_SEQ_AXIS)
            state.state = ov.Tensor(np.ascontiguousarray(kept))
        self.kv_len = length
