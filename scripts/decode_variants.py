#!/usr/bin/env python
"""Decode-step variants on one export, interleaved in one process: where could our TPOT lose to genai?

    python scripts/decode_variants.py EXPORT [ROUNDS]

Variants: genai's VLMPipeline; Pipeline.generate; a loop of Pipeline.step; raw language-model
infer loops (embedding request or a numpy embedding table; tensors bound once or a dict per
call). Prints TPOT mean ± std over ROUNDS (default 3) after one warm-up round.
"""
import sys, time, statistics
from pathlib import Path
import numpy as np, openvino as ov
from llava_ov.runtime.pipeline import Pipeline, Message
from llava_ov.runtime.generate import GenerationConfig
from llava_ov.tools.bench import GenaiEngine
model = Path(sys.argv[1]); image = "examples/cat.jpg"; N = 24
pipe = Pipeline(model, device="CPU", cache_dir=None)
m = pipe.model
genai = GenaiEngine(model, "CPU", {})
gprompt = pipe.render([Message("user", "Describe this image.", [image])]).replace("<image>\n", "<image>")
cfg = GenerationConfig(max_new_tokens=N, ignore_eos=True)

def ours_generate():
    pipe.reset(); r = pipe.generate("Describe this image.", [image], config=cfg); return r.timings.tpot_s

def prefill_then(loop):
    pipe.reset(); r = pipe.generate("Describe this image.", [image], config=GenerationConfig(max_new_tokens=1, ignore_eos=True))
    return loop(r.token_ids[-1])

def step_loop(tok):
    times = []; t0 = time.perf_counter()
    for _ in range(N):
        logits = pipe.step(tok); tok = int(np.argmax(logits))
        t1 = time.perf_counter(); times.append(t1 - t0); t0 = t1
    return statistics.fmean(times[1:])

table = None
def raw_loop(tok, use_embed_request=False, reuse_tensors=True):
    lm = m._lm; L = m.kv_len
    mask = np.ones((1, m.max_context), np.int64); pos = np.zeros((1, 1), np.int64); beam = np.zeros(1, np.int32)
    emb = np.zeros((1, 1, m.hidden_size), np.float32)
    if reuse_tensors:
        lm.set_tensor("inputs_embeds", ov.Tensor(emb, shared_memory=True)); lm.set_tensor("position_ids", ov.Tensor(pos, shared_memory=True))
        lm.set_tensor("beam_idx", ov.Tensor(beam, shared_memory=True))
    times = []; t0 = time.perf_counter()
    for _ in range(N):
        e = m.embed_tokens(np.array([tok])) if use_embed_request else table[tok]
        emb[0, 0] = e; pos[0, 0] = L; L += 1
        if reuse_tensors:
            lm.set_tensor("attention_mask", ov.Tensor(mask[:, :L], shared_memory=True)); lm.infer()
        else:
            lm.infer({"inputs_embeds": emb, "attention_mask": mask[:, :L], "position_ids": pos, "beam_idx": beam})
        tok = int(np.argmax(lm.get_tensor("logits").data[0, -1]))
        t1 = time.perf_counter(); times.append(t1 - t0); t0 = t1
    m.kv_len = L
    return statistics.fmean(times[1:])

# the embedding table, computed by the embeddings model (exact)
table = np.concatenate([m.embed_tokens(np.arange(i, min(i + 4096, 32064))) for i in range(0, 32064, 4096)])
variants = {
    "genai": lambda: genai.run(Path(image), gprompt, N).tpot_s,
    "ours.generate": ours_generate,
    "ours.step loop": lambda: prefill_then(step_loop),
    "raw, embed request": lambda: prefill_then(lambda t: raw_loop(t, True)),
    "raw, numpy table": lambda: prefill_then(lambda t: raw_loop(t, False)),
    "raw, table, dict infer": lambda: prefill_then(lambda t: raw_loop(t, False, False)),
}
res = {k: [] for k in variants}
for k, f in variants.items(): f()  # warm-up
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    for k, f in variants.items(): res[k].append(f() * 1e3)
for k, v in res.items():
    print(f"{k:24s} {statistics.fmean(v):7.2f} ± {statistics.stdev(v):5.2f} ms  {[round(x,1) for x in v]}")
