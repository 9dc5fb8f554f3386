"""GPU checks for the draft head (run where a GPU is lent; `bash bench/gpu_check.sh OUT_DIR [TAU]`).

(a) lossless: the head drafts on CUDA, a tiny target verifies on the CPU in another process over
    tcp://127.0.0.1; the output must equal the target's own greedy output (chains and trees).
(b) timing: one draft proposal (catch-up + dynamic tree) of a 7B-shaped and a 13B-shaped head on
    the GPU (random weights of the real shapes), and the CPU verification curve of a 7B-shaped
    target (random weights) on this machine's cores, bfloat16 and float32.
(c) projection: Dovetail tokens/s for LLaMA-2-7B here = tau / (T_draft + T_verify(tree) + T_link),
    with tau as measured on the development machine (argument) or a range of tau values.
Writes gpu_check.json and prints a summary.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
LLAMA_13B = dict(LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                 num_attention_heads=40, num_key_value_heads=40)
# DRY_RUN=1: the same script on the CPU with small shapes, to check it before spending GPU time
DRY = os.environ.get("DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
if DRY:
    LLAMA_7B = dict(LLAMA_7B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4)
    LLAMA_13B = dict(LLAMA_7B, hidden_size=320, num_attention_heads=4, num_key_value_heads=4)


def sync():
    if not DRY:
        torch.cuda.synchronize()


def check_lossless() -> dict:
    from conftest import VerifierProcess, save_model, tiny_target, tiny_tokenizer
    from dovetail_rt import Client
    from dovetail_rt.config import DraftConfig
    from dovetail_rt.draft_head import DraftHead, HeadConfig, shared_weights
    from transformers import AutoConfig

    tmp = Path(tempfile.mkdtemp())
    target = tiny_target(0, sharpen=30)
    folder = save_model(target, tiny_tokenizer(), tmp / "tiny")
    embed, lm_head = shared_weights(folder)
    torch.manual_seed(0)
    head = DraftHead(AutoConfig.from_pretrained(folder), HeadConfig(str(folder), 2, "dgf"), embed, lm_head)
    results = {}
    proc = VerifierProcess(folder)
    try:
        fixed = dict(p_min=0.0, adaptive=False)  # fixed sizes: every step drafts
        cases = {"chain": (DraftConfig(tree_top_k=1, draft_max=4, **fixed), None),
                 "tree": (DraftConfig(tree_top_k=3, tree_depth=4, tree_tokens=10, **fixed), None),
                 "tree-cost-model": (DraftConfig(tree_top_k=3, tree_depth=4, tree_tokens=10), None),
                 "tree-draft-vocab": (DraftConfig(tree_top_k=3, tree_depth=4, tree_tokens=10, **fixed),
                                      torch.arange(0, target.config.vocab_size, 2))}  # last: it stays set
        for name, (cfg, vocab) in cases.items():
            same, drafted = [], 0
            if vocab is not None:
                head.set_draft_vocab(vocab)
            with Client(verifier=proc.endpoint, draft=head, device=DEVICE, draft_config=cfg, timeout_s=60) as client:
                for prompt in ([5], [5, 7, 9, 11], list(range(1, 30))):
                    out = client.generate(prompt, 30)
                    ref = target.generate(torch.tensor([prompt]), max_new_tokens=30, min_new_tokens=30, do_sample=False)
                    same.append(out.token_ids == ref[0, len(prompt):].tolist())
                    drafted += out.stats.n_drafted
            results[name] = {"prompts": len(same), "identical": sum(same), "drafted": drafted}
    finally:
        proc.stop()
    results["head_device"] = str(next(head.parameters()).device)
    return results


def time_head(shape: dict, layers: int, top_k: int, depth: int, tokens: int, reps: int = 20) -> dict:
    from transformers import LlamaConfig

    from dovetail_rt.config import DraftConfig
    from dovetail_rt.draft_head import DraftHead, HeadConfig
    from dovetail_rt.drafter import Feedback, HeadDrafter

    cfg = LlamaConfig(**shape)
    d, v = cfg.hidden_size, cfg.vocab_size
    dev, dt = DEVICE, (torch.float32 if DRY else torch.float16)
    head = DraftHead(cfg, HeadConfig("random", layers, "dgf"), torch.randn(v, d) * 0.02, torch.randn(v, d) * 0.02)
    head = head.to(device=dev, dtype=dt).eval()
    drafter = HeadDrafter(head, DraftConfig(tree_top_k=top_k, tree_depth=depth, tree_tokens=tokens))
    committed = torch.randint(0, v, (400,)).tolist()
    times = []
    for rep in range(reps + 3):
        drafter.reset()
        drafter.observe(Feedback(torch.randn(399, d, dtype=dt, device=dev)))
        drafter.propose(committed[:398], 32)  # prefill the head cache with the prompt
        drafter.observe(Feedback(torch.randn(1, d, dtype=dt, device=dev)))
        sync()
        t0 = time.perf_counter()
        drafter.propose(committed[:399], 32)  # one step: catch up one pair + grow the tree
        sync()
        if rep >= 3:
            times.append(time.perf_counter() - t0)
    return {"layers": layers, "top_k": top_k, "depth": depth, "tree_tokens": tokens,
            "draft_ms_median": 1000 * statistics.median(times), "draft_ms_min": 1000 * min(times)}


def cpu_curve(shape: dict, dtype: torch.dtype, qs=(1, 2, 4, 8, 16, 32)) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dovetail_rt.bench.curve import measure

    torch.set_num_threads(os.cpu_count())
    t0 = time.time()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    init_s = time.time() - t0
    curve = measure(model, qs, context=300, reps=2)
    del model
    return {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "init_s": init_s,
            "chain_ms": {q: 1000 * t for q, t in curve["chain"].items()},
            "tree_ms": {q: 1000 * t for q, t in curve["tree"].items()}}


def interp(curve_ms: dict, q: int) -> float:
    pts = sorted((int(k), v) for k, v in curve_ms.items())
    for (q0, t0), (q1, t1) in zip(pts, pts[1:]):
        if q0 <= q <= q1:
            return t0 + (t1 - t0) * (q - q0) / (q1 - q0)
    return pts[-1][1]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    taus = [float(sys.argv[2])] if len(sys.argv) > 2 else [2.0, 3.0, 4.0, 5.0]
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": "dry-run (CPU)" if DRY else torch.cuda.get_device_name(0), "torch": torch.__version__, "cpu_cores": os.cpu_count()}
    t0 = time.time()
    report["lossless"] = check_lossless()
    print("lossless:", report["lossless"], flush=True)
    report["head_timing"] = {}
    for name, shape in (("7B", LLAMA_7B), ("13B", LLAMA_13B)):
        report["head_timing"][name] = [time_head(shape, layers, 10, 7, 16) for layers in (1, 5)]
        report["head_timing"][name].append(time_head(shape, 5, 4, 4, 7))
        print(name, report["head_timing"][name], flush=True)
    report["cpu_curve_7B"] = [cpu_curve(LLAMA_7B, torch.bfloat16), cpu_curve(LLAMA_7B, torch.float32)]
    for c in report["cpu_curve_7B"]:
        print("cpu curve", c["dtype"], {q: round(t) for q, t in c["chain_ms"].items()}, flush=True)
    link_ms = 1.0  # measured per step over tcp://127.0.0.1 on the development machine
    proj = []
    for c in report["cpu_curve_7B"]:
        t1 = c["chain_ms"][1]
        for h in report["head_timing"]["7B"]:
            tv = interp(c["tree_ms"] if h["tree_tokens"] >= 3 else c["chain_ms"], h["tree_tokens"])
            for tau in taus:
                tps = tau / ((h["draft_ms_median"] + tv + link_ms) / 1000)
                proj.append({"target_dtype": c["dtype"], "head_layers": h["layers"], "tree_tokens": h["tree_tokens"],
                             "tau": tau, "cpu_only_tok_s": 1000 / t1, "dovetail_tok_s": tps,
                             "speedup": tps / (1000 / t1)})
    report["projection_7B"] = proj
    report["wall_s"] = time.time() - t0
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    for p in proj:
        print(f"7B {p['target_dtype']:8s} head L{p['head_layers']} tree {p['tree_tokens']:2d} tau {p['tau']:.1f}: "
              f"CPU-only {p['cpu_only_tok_s']:.2f} tok/s -> Dovetail {p['dovetail_tok_s']:.2f} tok/s ({p['speedup']:.2f}x)")
    cases = {k: v for k, v in report["lossless"].items() if isinstance(v, dict)}
    ok = all(v["identical"] == v["prompts"] for v in cases.values())
    ok &= all(v["drafted"] > 0 for k, v in cases.items() if "cost-model" not in k)  # else nothing was checked
    print("LOSSLESS OK" if ok else "LOSSLESS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
