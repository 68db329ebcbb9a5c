"""Quality of a compressed export against its reference, measured with our own runtime.

For every (image, question) sample both exports answer greedily, and:

- **teacher-forced next-token agreement and KL**: both models are fed the same
  tokens - the prompt, then the REFERENCE's greedy continuation one token at a
  time (`Pipeline.prepare` / `prefill` / `step`) - and at each position the two
  next-token distributions are compared: top-1 agreement (argmax equal) and
  KL(ref || cand) = sum p_ref (log p_ref - log p_cand), softmax in float64.
  The position that predicted EOS is included when the reference stopped there.
- **identical greedy prefix**: free-running greedy answers of both, count of equal
  leading tokens (a compressed model that agrees for 30 tokens then drifts scores 30).
- **text similarity**: `difflib.SequenceMatcher(None, ref_text, cand_text,
  autojunk=False).ratio()` on the two greedy answers: 2 * matched characters /
  total characters, 1.0 for equal texts, 0.0 for nothing in common.
- **vision feature cosine** per image: cosine of the packed image features
  (flattened), and the lowest per-token cosine.

Both exports run with the same OpenVINO properties (default: the plugin's own,
i.e. bf16 and a compressed KV cache on CPUs with bf16; `F32_PROPERTIES` pins f32).
Those runtime numerics and the compressed weights are separate effects: compare
with f32 to see the weights alone.  Each KV cache is reset before every prefill,
so samples do not depend on their order.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llava_ov.common.layout import EXAMPLES_DIR
from llava_ov.errors import InvalidImageError, LlavaOvError
from llava_ov.runtime.settings import LoadSettings

# An export's INT8-PTQ vision encoder, if it has one, runs whatever the CPU: the compression is what is measured.
EVALUATE_SETTINGS = LoadSettings(vision_encoder="int8")
EXAMPLE_IMAGES = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")
DEFAULT_PROMPTS = (
    "Describe this image in one sentence.",
    "What is the main subject of this picture?",
    "What colours stand out in this photo?",
)
METRICS = {
    "top1_agreement": "share of teacher-forced positions where argmax(ref) == argmax(cand), along ref's greedy answer",
    "kl_mean": "mean over those positions of KL(ref || cand) of the next-token distributions (nats, float64 softmax)",
    "kl_max": "largest KL(ref || cand) at any position",
    "identical_prefix": "free-running greedy: number of equal leading tokens",
    "identical_prefix_share": "identical_prefix / number of ref tokens (1.0 when ref's answer is empty)",
    "similarity": "difflib.SequenceMatcher(None, ref_text, cand_text, autojunk=False).ratio() of the greedy texts",
    "vision_cosine": "cosine of the packed image features, flattened (per image)",
    "vision_min_token_cosine": "lowest cosine of one image token's feature vector (per image)",
}


def example_images() -> list[Path]:
    """The bundled example photos (examples/ in a source checkout)."""
    found = [EXAMPLES_DIR / name for name in EXAMPLE_IMAGES if (EXAMPLES_DIR / name).is_file()]
    if not found:
        raise InvalidImageError(f"the example photos are not in {EXAMPLES_DIR}; pass images explicitly (--images)")
    return found


@dataclass
class SampleResult:
    image: str
    prompt: str
    positions: int  # teacher-forced positions compared
    top1_agreement: float
    kl_mean: float
    kl_max: float
    identical_prefix: int
    identical_prefix_share: float
    similarity: float
    ref_tokens: list[int] = field(default_factory=list)
    cand_tokens: list[int] = field(default_factory=list)
    ref_text: str = ""
    cand_text: str = ""
    ref_finish: str = ""
    cand_finish: str = ""


# ---------------------------------------------------------------- metrics


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(cand)) per row, float64, clipped at 0 (rounding can give -1e-17)."""
    log_p, log_q = log_softmax(ref_logits), log_softmax(cand_logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of equal leading tokens."""
    n = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter
        if x != y:
            break
        n += 1
    return n


def text_similarity(a: str, b: str) -> float:
    """difflib ratio: 2 * matched characters / total characters (1.0 for two empty texts)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def feature_cosines(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(cosine of the flattened features, lowest per-token cosine)."""
    a, b = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    flat = float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0))
    rows = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return flat, float(rows.min())


# ---------------------------------------------------------------- running the models


def teacher_forced_logits(pipe, messages, tokens: Sequence[int], include_last: bool) -> np.ndarray:
    """[positions, vocab] next-token logits after the prompt and after each of `tokens`.

    Positions: after the prompt, then after tokens[0..n-2]; with `include_last` also after
    tokens[n-1] (the position that predicted EOS).
    """
    pipe.reset()
    return pipe.score(messages, list(tokens) if include_last else list(tokens)[:-1])


def greedy(pipe, messages, max_new_tokens: int):
    """Free-running greedy answer from a fresh KV cache."""
    from llava_ov.runtime.generate import GenerationConfig

    pipe.reset()
    return pipe.generate(messages, config=GenerationConfig(max_new_tokens=max_new_tokens))


def compare_sample(ref, cand, image: Path, prompt: str, max_new_tokens: int) -> SampleResult:
    """Every per-sample metric for one (image, question)."""
    from llava_ov.runtime.pipeline import Message

    messages = [Message("user", prompt, [image])]
    if not np.array_equal(ref.prepare(messages).token_ids, cand.prepare(messages).token_ids):
        raise LlavaOvError("the two exports tokenize the same prompt differently: CANDIDATE is not a compressed "
                           "copy of REF (different tokenizer, template or image settings)")  # fmt: skip
    ref_out, cand_out = greedy(ref, messages, max_new_tokens), greedy(cand, messages, max_new_tokens)
    with_eos = ref_out.finish_reason == "eos"
    ref_logits = teacher_forced_logits(ref, messages, ref_out.token_ids, with_eos)
    cand_logits = teacher_forced_logits(cand, messages, ref_out.token_ids, with_eos)
    kl = kl_divergence(ref_logits, cand_logits)
    prefix = identical_prefix(ref_out.token_ids, cand_out.token_ids)
    return SampleResult(
        image=image.name, prompt=prompt, positions=len(kl),
        top1_agreement=float(np.mean(ref_logits.argmax(-1) == cand_logits.argmax(-1))),
        kl_mean=float(kl.mean()), kl_max=float(kl.max()), identical_prefix=prefix,
        identical_prefix_share=prefix / len(ref_out.token_ids) if ref_out.token_ids else 1.0,
        similarity=text_similarity(ref_out.text, cand_out.text),
        ref_tokens=list(ref_out.token_ids), cand_tokens=list(cand_out.token_ids),
        ref_text=ref_out.text, cand_text=cand_out.text,
        ref_finish=ref_out.finish_reason, cand_finish=cand_out.finish_reason,
    )  # fmt: skip


def compare_vision(ref, cand, images: Sequence[Path]) -> list[dict[str, Any]]:
    """Per image: cosine of the two exports' packed image features."""
    rows = []
    for image in images:
        a, b = ref.prepare_image(image).features, cand.prepare_image(image).features
        flat, worst = feature_cosines(a, b)
        rows.append({"image": image.name, "tokens": len(a), "vision_cosine": flat,
                     "vision_min_token_cosine": worst})  # fmt: skip
    return rows


def aggregate(samples: Sequence[SampleResult], vision: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over samples (each sample counts once, whatever its length); kl_max is the maximum."""
    keys = ("top1_agreement", "kl_mean", "identical_prefix", "identical_prefix_share", "similarity")
    out = {k: float(np.mean([getattr(s, k) for s in samples])) for k in keys}
    out["kl_max"] = float(max(s.kl_max for s in samples))
    out["positions"] = int(sum(s.positions for s in samples))
    out["vision_cosine"] = float(np.mean([v["vision_cosine"] for v in vision]))
    out["vision_min_token_cosine"] = float(min(v["vision_min_token_cosine"] for v in vision))
    return out


def export_summary(pipe) -> dict[str, Any]:
    """Where an export is, how each part's weights are stored, and how each part runs."""
    info = pipe.info()
    return {"dir": info["model_dir"], "precision": info["weights"], "runtime": info["runtime"]}


def load(model: Any, settings: LoadSettings):
    """A Pipeline as given, or loaded from an export directory with `settings`."""
    from llava_ov.runtime.pipeline import Pipeline

    if isinstance(model, Pipeline):
        return model
    return Pipeline(model, settings)


def evaluate(
    ref_model: Any,
    cand_model: Any,
    *,
    images: Sequence[str | Path] | None = None,
    prompts: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    settings: LoadSettings = EVALUATE_SETTINGS,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Compare `cand_model` with `ref_model` on images x prompts; returns the JSON-ready report.

    Each model is an export directory (loaded with `settings`, fields overridden by keyword as in
    `Pipeline(path, properties=...)`) or a loaded Pipeline (reused, e.g. one reference for several
    candidates).  Two Pipelines loaded with different properties are compared as they are (that measures the runtime's own
    numerics, e.g. f32 vs the plugin defaults); the report then has "candidate_properties".
    """
    from llava_ov.runtime.image import load_image

    if max_new_tokens < 1:
        raise LlavaOvError("max_new_tokens must be >= 1")
    paths = [Path(p).expanduser() for p in images] if images else example_images()
    for path in paths:
        load_image(path)  # a bad image fails here, before any model is loaded
    questions = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    if not questions or not all(q.strip() for q in questions):
        raise LlavaOvError("prompts must not be empty")
    say = log or (lambda _: None)
    start = time.perf_counter()
    settings = settings.with_overrides(**overrides).validate()
    ref, cand = load(ref_model, settings), load(cand_model, settings)
    props, cand_props = ref.settings.properties, cand.settings.properties
    samples, total = [], len(paths) * len(questions)
    for path, question in ((p, q) for p in paths for q in questions):
        s = compare_sample(ref, cand, path, question, max_new_tokens)
        samples.append(s)
        say(f"[evaluate {len(samples)}/{total}] {path.name} | {question[:40]}: top-1 {s.top1_agreement:.3f}, "
            f"KL {s.kl_mean:.2e}, prefix {s.identical_prefix}/{len(s.ref_tokens)}, similarity {s.similarity:.3f}")
    vision = compare_vision(ref, cand, paths)  # after the samples: they check that the exports are comparable
    return {
        "reference": export_summary(ref),
        "candidate": export_summary(cand),
        "device": {"reference": ref.settings.device, "candidate": cand.settings.device},
        "properties": dict(props) or "plugin defaults",
        **({"candidate_properties": dict(cand_props) or "plugin defaults"} if cand_props != props else {}),
        "settings": {"max_new_tokens": max_new_tokens, "images": [str(p) for p in paths], "prompts": questions},
        "metrics": METRICS,
        "aggregate": aggregate(samples, vision),
        "vision": vision,
        "samples": [asdict(s) for s in samples],
        "seconds": round(time.perf_counter() - start, 2),
    }


# ---------------------------------------------------------------- reporting


LEGEND = [
    "what the columns mean (candidate against reference; identical exports give the ideal values):",
    "  pos     positions compared: the reference's greedy answer, teacher-forced into both models",
    "  top-1   share of positions where both pick the same next token (ideal 1.000; higher is better)",
    "  KL      KL divergence of the candidate's next-token distribution from the reference's "
    "(ideal 0; lower is better)",
    "  prefix  tokens the candidate's own greedy answer shares with the reference's before they differ (ideal: all)",
    "  sim     similarity of the two answers' texts, 0..1 (ideal 1.000)",
    "  vision cosine  image features of the two vision encoders (ideal 1.00000)",
]


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per sample, then the means."""
    head = f"{'image':<14} {'prompt':<32} {'pos':>4} {'top-1':>6} {'KL mean':>9} {'KL max':>9} {'prefix':>7} {'sim':>6}"
    lines = [head, "-" * len(head)]
    for s in report["samples"]:
        lines.append(
            f"{s['image'][:14]:<14} {s['prompt'][:32]:<32} {s['positions']:>4} {s['top1_agreement']:>6.3f} "
            f"{s['kl_mean']:>9.2e} {s['kl_max']:>9.2e} {s['identical_prefix']:>3}/{len(s['ref_tokens']):<3} "
            f"{s['similarity']:>6.3f}"
        )
    a = report["aggregate"]
    lines += ["-" * len(head), (
        f"{'mean':<14} {'':<32} {a['positions']:>4} {a['top1_agreement']:>6.3f} {a['kl_mean']:>9.2e} "
        f"{a['kl_max']:>9.2e} {a['identical_prefix']:>7.1f} {a['similarity']:>6.3f}"
    )]  # fmt: skip
    lines.append(f"vision features: cosine {a['vision_cosine']:.5f} (mean over images), "
                 f"lowest token cosine {a['vision_min_token_cosine']:.5f}")  # fmt: skip
    lines.append(f"properties: {json.dumps(report['properties'])}")
    lines += LEGEND
    if "candidate_properties" in report:
        lines.append(f"candidate properties (differ!): {json.dumps(report['candidate_properties'])}")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path
