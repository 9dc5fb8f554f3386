"""Where a one-token step goes (issue 18 item 6): the llama.cpp engine's one-token decode against a
plain llama.cpp context on the same GGUF file, one setting changed at a time.

    python bench/step_gap.py [--model qwen2.5-coder-1.5b] [--threads 2] [--steps 64] [--rounds 3]

Each variant is a fresh llama.cpp context (the same loaded model) that decodes a 300-token random
prompt and then ``--steps`` one-token steps; the variants run interleaved ``--rounds`` times and the
median ms per step is printed. ``engine`` is ``LlamaCppLM`` itself (its session's forward, logits
copied out, as the verifier runs it); ``plain`` is llama.cpp's own defaults (flash attention auto, a
4096-cell KV cache, one sequence, no embeddings) through the same low-level calls; the others are
``plain`` with one of the engine's settings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dovetail_rt import lm  # noqa: E402
from dovetail_rt.config import dovetail_home  # noqa: E402

VARIANTS = {  # name: context settings over llama.cpp's defaults
    "plain": {},
    "flash-off": {"flash": False},
    "kv-65536": {"n_ctx": 65536},
    "unified-256seq": {"kv_unified": True, "n_seq": 256},
    "embeddings-ctx": {"embeddings": True},
    "batch-256": {"n_batch": 256},
    "all-engine-settings": {"flash": False, "n_ctx": 65536, "kv_unified": True, "n_seq": 256, "embeddings": True,
                            "n_batch": 256},
}


def plain_steps(L, model, threads: int, prompt: list[int], steps: int, vocab: int, flash=True, n_ctx=4096,
                kv_unified=False, n_seq=1, embeddings=False, n_batch=512) -> float:
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_batch, n_seq
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = kv_unified
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO if flash else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.embeddings, cp.pooling_type = embeddings, L.LLAMA_POOLING_TYPE_NONE
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if embeddings:
        L.llama_set_embeddings(ctx, False)  # as the engine does for steps without features
    batch = L.llama_batch_init(max(n_batch, 1), 0, 1)
    try:
        def decode(tokens, start):
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + i, 1, i == len(tokens) - 1
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            assert L.llama_decode(ctx, batch) == 0
            return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, len(tokens) - 1), shape=(vocab,)).copy()

        for lo in range(0, len(prompt), n_batch):
            decode(prompt[lo : lo + n_batch], lo)
        times, tok = [], 1000
        for k in range(steps + 2):
            t0 = time.perf_counter()
            tok = int(decode([tok], len(prompt) + k).argmax())
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def engine_steps(target, prompt: list[int], steps: int) -> float:
    s = target.session()
    try:
        s.forward(prompt, logits_for=1)
        s.keep(list(range(len(prompt))))
        times, tok = [], 1000
        for _ in range(steps + 2):
            t0 = time.perf_counter()
            out = s.forward([tok])
            tok = int(out.logits[-1].argmax())
            s.keep([0])
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])
    finally:
        s.close()


def cpu_name() -> str:
    """Model name, family / model and the vector extensions that pick llama.cpp's kernels."""
    info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return f"{info.get('model name', '?')} (family {info.get('cpu family')} model {info.get('model')}; {' '.join(vector)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    target = lm.open_lm(args.model, dovetail_home(), "llamacpp", threads=args.threads)
    L, vocab = target.L, target.info.vocab_size
    prompt = np.random.default_rng(0).integers(100, vocab - 100, 300).tolist()
    print(f"{cpu_name()}; {target.info.weight_format} {target.info.path}; {args.threads} threads; "
          f"kernels: {target.info.kernels}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    results: dict[str, list[float]] = {name: [] for name in ["engine", *VARIANTS]}
    for _ in range(args.rounds):
        results["engine"].append(engine_steps(target, prompt, args.steps))
        for name, settings in VARIANTS.items():
            results[name].append(plain_steps(L, target.model, args.threads, prompt, args.steps, vocab, **settings))
    base = statistics.median(results["plain"])
    for name, ms in results.items():
        m = statistics.median(ms)
        print(f"{name:22s} {1000 * m:7.2f} ms per one-token step  ({m / base:5.3f}x plain; rounds: "
              + ", ".join(f"{1000 * x:.2f}" for x in ms) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
