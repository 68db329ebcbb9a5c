"""`llava-ov bench` smoke test on the tiny model: fields present, numbers positive (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_smoke_with_comparisons(exports, checkpoints, photos, tmp_path):
    out = tmp_path / "bench.json"
    args = [sys.executable, "-m", "llava_ov.cli", "bench", str(exports["llava-next"]), "--image", str(photos["coffee"]),
            "--runs", "2", "--warmup", "1", "--max-new-tokens", "6", "--compare", "genai,transformers",
            "--source", str(checkpoints["llava-next"]), "--isolated-rss", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"ours", "genai", "transformers"}
    for name, engine in report["engines"].items():
        assert engine["ttft_s"]["mean"] > 0 and engine["tpot_s"]["mean"] > 0, name
        assert engine["ttft_s"]["n"] == 2 and engine["generated"] == 6, name
        assert engine["isolated_peak_rss_mb"] > 50, name
    ours = report["engines"]["ours"]
    assert ours["vision_s"]["mean"] > 0 and ours["image_tokens"] > 576
    assert 0 <= ours["python_overhead_share"]["mean"] < 1
    assert report["engines"]["genai"]["tpot_wall_s"]["mean"] > 0  # genai timed per token in Python, like ours
    assert report["ratios"]["tpot_genai_wall_over_ours"] > 0
    assert report["follow_up"]["follow_up_ttft"]["mean"] > 0
    bound = report["bound"]
    assert bound["bandwidth"]["gb_s"]["mean"] > 0 and bound["weight_bytes"] > 0 and bound["share_of_bound"] > 0
    assert "| ours |" in proc.stdout and "tokens/s" in proc.stdout


def test_bench_concurrency_smoke(exports, photos, tmp_path):
    """`--concurrency`: every engine and level reported, positive rates, ratios present (no timing assertions)."""
    out = tmp_path / "conc.json"
    args = [sys.executable, "-m", "llava_ov.cli", "bench", str(exports["llava"]), "--image", str(photos["coffee"]),
            "--runs", "1", "--max-new-tokens", "6", "--concurrency", "1,3", "--compare", "genai,ours-f32-decode", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"ours", "fifo", "genai", "ours-f32-decode"}
    assert report["machine"]["cpu_flags"] is not None
    for name, levels in report["engines"].items():
        assert set(levels) == {"1", "3"}, name
        for level in levels.values():
            assert level["steady_decode_tokens_per_s"]["mean"] > 0 and level["mean_ttft_s"]["mean"] > 0, name
    assert {"ours_over_fifo_at_3", "ours_over_genai_at_3", "ours_f32_decode_over_fifo_at_3"} <= set(report["ratios"])
    assert "| fifo | 3 |" in proc.stdout


def test_bench_json_schema_reports_the_grammar_cost(exports, photos, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"caption": {"type": "string", "maxLength": 400}},
                                  "required": ["caption"]}))  # fmt: skip
    out = tmp_path / "bench.json"
    args = [sys.executable, "-m", "llava_ov.cli", "bench", str(exports["llava"]), "--image", str(photos["coffee"]),
            "--runs", "2", "--warmup", "1", "--max-new-tokens", "12", "--no-bandwidth", "--json-schema", str(schema),
            "--json", str(out)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"ours", "ours+json", "ours+json-nojf"}
    constrained = report["engines"]["ours+json"]
    assert constrained["speculation"]["accepted"] > 0  # the keys and quotes the grammar forces: jump-forward
    assert "speculation" not in report["engines"]["ours+json-nojf"]
    assert constrained["grammar_per_token_s"]["mean"] > 0 and constrained["generated"]["mean"] > 1
    assert "grammar_per_token_s" not in report["engines"]["ours"]  # no schema: no grammar work at all
    assert report["ratios"]["tpot_json_over_plain"] > 0 and "JSON schema: grammar" in proc.stdout
    assert report["ratios"]["json_tokens_per_s_jump_forward_over_off"] > 0


def test_bench_image_token_variants_report_kept_tokens_and_plot(exports, photos, tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "ttft.png"
    args = [sys.executable, "-m", "llava_ov.cli", "bench", str(exports["llava-next"]), "--image", str(photos["coffee"]),
            "--runs", "2", "--warmup", "1", "--max-new-tokens", "4", "--no-bandwidth", "--max-image-tokens", "1200",
            "--visual-token-pruning", "0.75", "--plot", str(plot), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    engines = report["engines"]
    assert set(engines) == {"ours", "ours[max_image_tokens=1200]", "ours[pruning=0.75]"}
    full = engines["ours"]["image_tokens"]
    assert engines["ours[max_image_tokens=1200]"]["image_tokens"] <= 1200 < full
    pruned = engines["ours[pruning=0.75]"]
    assert pruned["image_tokens"] < full == pruned["image_tokens_total"] and pruned["prune_s"]["mean"] > 0
    assert all(e["prefill_s"]["mean"] > 0 for e in engines.values())
    assert report["ratios"]["prefill_ours[pruning=0.75]_over_ours"] > 0
    assert "| ours[pruning=0.75] |" in proc.stdout and plot.stat().st_size > 1000


def test_bench_with_a_draft_times_it_on_and_off(exports, photos, tmp_path):
    """`--draft`: ours proposes with it and `ours-nodraft` runs beside it; the report names the draft by its
    folder, not the machine's path."""
    from llava_ov.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", str(exports["llava"]), "--image", str(photos["coffee"]), "--runs", "1", "--warmup", "0",
            "--max-new-tokens", "12", "--draft", str(exports["llava"]), "--f32", "--no-bandwidth", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"ours", "ours-nodraft"}
    assert report["engines"]["ours"]["speculation"]["accepted"] > 0 and "speculation" not in report["engines"]["ours-nodraft"]
    assert report["options"]["load"]["draft"] == exports["llava"].name and not report["options"]["model"].startswith("/")
