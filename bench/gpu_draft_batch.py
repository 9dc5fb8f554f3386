"""The server's shared draft LM on a GPU: what batching several requests' draft forwards saves.

Random weights of Qwen2.5-0.5B's shapes (the default draft), float16 on CUDA, through the torch engine
(``lm_torch``) and ``lm_shared.SharedLM``. Per context length (cached tokens per session):
  - one session's one-token forward; B sessions' one-token forwards in one ``forward_batch`` vs one
    after another; 8 sessions' 8-node trees batched vs one after another (median of 20, ms);
  - 8 threads drafting at once (20 one-token steps each, as the server's Clients do) on the plain
    engine vs through ``SharedLM`` (wall time, ms; passes and forwards counted);
  - numerics: batched logits vs alone (max |diff|, argmax agreement).
Writes OUT/gpu_draft_batch.json. ``DRY_RUN=1``: small shapes on the CPU, to check the script first.

    PYTHONPATH=. python bench/gpu_draft_batch.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from dovetail_rt.lm_shared import SharedLM  # noqa: E402
from gpu_draft_gather import trial  # noqa: E402
from dovetail_rt.lm_torch import open_model  # noqa: E402

DRY = os.environ.get("DRY_RUN") == "1"
DEVICE = "cpu" if DRY else "cuda"
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True)
if DRY:
    QWEN_05B = dict(QWEN_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1)
TREE = [-1, 0, 0, 1, 1, 2, 3, 4]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(f, n: int = 20) -> float:
    f()  # warm
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def main(out_dir: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dtype = torch.float32 if DRY else torch.float16
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B)).to(DEVICE, dtype).eval()
    engine = open_model("qwen2.5-0.5b-shape", Path("."), model=model, tokenizer=None, device=DEVICE)
    vocab = QWEN_05B["vocab_size"]
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "dtype": str(dtype), "shape": QWEN_05B, "contexts": {}}
    for ctx in (200, 1000):
        gen = torch.Generator().manual_seed(ctx)
        sessions = []
        for _ in range(16):
            s = engine.session()
            s.forward(torch.randint(0, vocab, (ctx,), generator=gen).tolist(), logits_for=1)
            s.keep(list(range(ctx)))
            sessions.append(s)

        def batch(n, tokens=(5,), parents=None):
            def run():
                engine.forward_batch([(s, list(tokens), parents, None) for s in sessions[:n]])
                for s in sessions[:n]:
                    s.truncate(s.length)
            return run

        def each(n, tokens=(5,), parents=None):
            def run():
                for s in sessions[:n]:
                    s.forward(list(tokens), parents)
                    s.truncate(s.length)
            return run

        row = {"one_token": median_ms(batch(1))}
        for n in (2, 4, 8, 16):
            row[f"batch_{n}"] = median_ms(batch(n))
        for n in (8, 16):
            row[f"each_{n}"] = median_ms(each(n))
        tree_tokens = list(range(10, 10 + len(TREE)))
        row["tree8_batch_8"] = median_ms(batch(8, tree_tokens, TREE))
        row["tree8_each_8"] = median_ms(each(8, tree_tokens, TREE))

        # numerics: each session's own next token, batched vs alone
        items = [(s, [int(i) + 7], None, None) for i, s in enumerate(sessions[:8])]
        together = engine.forward_batch(items)
        for s in sessions[:8]:
            s.truncate(s.length)
        alone = []
        for s, tokens, _, _ in items:
            alone.append(s.forward(tokens).logits)
            s.truncate(s.length)
        row["max_abs_diff"] = max(float((a.logits - b).abs().max()) for a, b in zip(together, alone))
        row["argmax_agree"] = sum(int(a.logits.argmax()) == int(b.argmax()) for a, b in zip(together, alone))

        # 8 threads drafting at once, the server's way: plain engine vs SharedLM (as recorded in
        # gpu_draft_batch-h200.json: no gather window yet; bench/gpu_draft_gather.py measures the window)
        prompt = lambda: torch.randint(0, vocab, (ctx,), generator=gen).tolist()  # noqa: E731
        row["threads_plain_ms"] = trial(engine, 8, 20, prompt)
        shared = SharedLM(engine, gather_s=0.0)
        row["threads_shared_ms"] = trial(shared, 8, 20, prompt)
        row["shared_passes"], row["shared_forwards"] = shared.passes, shared.forwards
        for s in sessions:
            s.close()
        report["contexts"][str(ctx)] = row
        print(ctx, json.dumps(row), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_draft_batch.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results"))
