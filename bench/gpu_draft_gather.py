"""SharedLM's gather window on a GPU: threads drafting at once, as the server's Clients do (each thread a
session at 200 cached tokens, 20 one-token steps), through the plain engine and through SharedLM with
``gather_s`` 0 / 0.5 / 2 / 5 ms (wall ms, passes for forwards), then 1 and 4 threads (does a thread alone
pay for the window?). Random weights of Qwen2.5-0.5B's shapes, float16. Writes $OUT/gather_probe.json.

    PYTHONPATH=. OUT=DIR python bench/gpu_draft_gather.py     (DRY_RUN=1: small shapes, on the CPU)
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import dovetail_rt.lm_shared as ls  # noqa: E402
from dovetail_rt.lm_torch import open_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True)
if os.environ.get("DRY_RUN"):
    CONFIG = dict(CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def trial(model_lm, threads: int = 8, steps: int = 20, prompt=lambda: list(range(200))) -> float:
    """Wall ms for ``threads`` sessions (each first prefilled with ``prompt()``) drafting ``steps``
    one-token steps each, all at once."""
    own = [model_lm.session() for _ in range(threads)]
    for s in own:
        tokens = prompt()
        s.forward(tokens, logits_for=1)
        s.keep(list(range(len(tokens))))
    start = threading.Barrier(threads)

    def draft(s):
        start.wait()
        for k in range(steps):
            s.forward([k + 3])
            s.keep([0])

    sync()
    t0 = time.perf_counter()
    workers = [threading.Thread(target=draft, args=(s,)) for s in own]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    sync()
    for s in own:
        s.close()
    return round((time.perf_counter() - t0) * 1000, 1)


def main() -> None:
    model = Qwen2ForCausalLM(Qwen2Config(**CONFIG)).to(DEVICE, torch.float16).eval()
    engine = open_model("qwen2.5-0.5b-shape", Path("."), model=model, tokenizer=None, device=DEVICE)
    out = {}
    trial(engine, 2, 3)  # warm-up
    for rep in range(2):
        out[f"plain_{rep}"] = trial(engine)
        for gather in (0.0, 0.0005, 0.002, 0.005):
            shared = ls.SharedLM(engine, gather_s=gather)
            ms = trial(shared)
            out[f"gather_{gather}_{rep}"] = (ms, shared.passes - 8, shared.forwards - 8)  # less the 8 prefills
        print(json.dumps(out), flush=True)
    for n in (1, 4):
        for rep in range(2):
            out[f"threads{n}_gather0_{rep}"] = trial(ls.SharedLM(engine, gather_s=0.0), n)
            out[f"threads{n}_gather2ms_{rep}"] = trial(ls.SharedLM(engine, gather_s=0.002), n)
            out[f"threads{n}_plain_{rep}"] = trial(engine, n)
    print(json.dumps(out), flush=True)
    Path(os.environ.get("OUT", "/tmp"), "gather_probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
