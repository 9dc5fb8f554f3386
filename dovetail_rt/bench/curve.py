"""The verification cost curve T_V(q): one target forward over q new tokens after a cached
context, with a chain mask and with a tree mask, per dtype. The heart of the method on a CPU:
the draft side sizes its drafts from it (see ``cost.py``)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from .. import models

DEFAULT_QS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)


def binary_tree(q: int) -> list[int]:
    """parents of a q-node tree where node i hangs below node (i - 1) // 2 (root = -1)."""
    return [-1] + [(i - 1) // 2 for i in range(1, q)]


def measure(model, qs=DEFAULT_QS, context: int = 300, reps: int = 3) -> dict:
    """{"chain": {q: seconds}, "tree": {q: seconds}} (median of ``reps`` after one warm-up)."""
    import torch
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    ctx = torch.randint(100, vocab - 100, (context,), generator=gen).tolist()
    cache = DynamicCache(config=model.config)
    models.forward(model, cache, ctx, list(range(context)), logits_for=0)
    out = {"chain": {}, "tree": {}}
    jobs = [(shape, q) for q in qs for shape in ("chain", "tree") if not (shape == "tree" and q < 3)]
    for shape, q in tqdm(jobs, desc=f"verify curve {str(model.dtype).removeprefix('torch.')}", unit="point"):
        parents = list(range(-1, q - 1)) if shape == "chain" else binary_tree(q)
        tokens = torch.randint(100, vocab - 100, (q,), generator=gen).tolist()
        times = []
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            models.forward_tree(model, cache, tokens, parents, context)
            if rep:
                times.append(time.perf_counter() - t0)
            models.crop_cache(cache, context)
        out[shape][q] = statistics.median(times)
    return out


def run(model_spec: str, home: Path, dtypes: list[str], qs=DEFAULT_QS, context: int = 300, reps: int = 3) -> dict:
    result = {"model": model_spec, "context": context, "reps": reps, "curves": {}}
    for name in dtypes:
        model, _ = models.load_model(model_spec, home, models.resolve_dtype(name))
        result["curves"][name] = measure(model, qs, context, reps)
        del model
    return result


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for dtype, curves in result["curves"].items():
        for shape, style in (("chain", "-o"), ("tree", "--s")):
            pts = sorted((int(q), t) for q, t in curves[shape].items())
            if pts:
                ax.plot([q for q, _ in pts], [1000 * t for _, t in pts], style, ms=3, label=f"{dtype} {shape}")
    ax.set_xlabel("new tokens in one target forward (q)")
    ax.set_ylabel("ms")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_for_drafts(result: dict, home: Path) -> Path:
    """Keep the latest curve where the draft side finds it: $DOVETAIL_HOME/verify_curve.json."""
    path = home / "verify_curve.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path
