"""The verification cost curve T_V(q): one target forward over q new tokens after a cached
context, as a chain and as a tree, per engine and weight format. The heart of the method on a
CPU: the draft side sizes its drafts from it (see ``cost.py``)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from .. import lm

DEFAULT_QS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
QUICK_QS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # `dovetail models install`: chains only, in about a minute


def binary_tree(q: int) -> list[int]:
    """parents of a q-node tree where node i hangs below node (i - 1) // 2 (root = -1)."""
    return [-1] + [(i - 1) // 2 for i in range(1, q)]


def measure(target: lm.LM, qs=DEFAULT_QS, context: int = 300, reps: int = 3, shapes=("chain", "tree")) -> dict:
    """{"chain": {q: seconds}, "tree": {q: seconds}} (median of ``reps`` after one warm-up)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = target.info.vocab_size
    ctx = torch.randint(100, vocab - 100, (context,), generator=gen).tolist()
    state = target.session()
    state.forward(ctx, logits_for=0)
    state.keep(list(range(context)))
    out = {"chain": {}, "tree": {}}
    jobs = [(shape, q) for q in qs for shape in shapes if not (shape == "tree" and q < 3)]
    for shape, q in tqdm(jobs, desc=f"verify curve {target.info.engine} {target.info.weight_format}", unit="point"):
        parents = list(range(-1, q - 1)) if shape == "chain" else binary_tree(q)
        tokens = torch.randint(100, vocab - 100, (q,), generator=gen).tolist()
        times = []
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            state.forward(tokens, parents)
            if rep:
                times.append(time.perf_counter() - t0)
            state.truncate(context)
        out[shape][q] = statistics.median(times)
    state.close()
    return out


def variants(model_spec: str, home: Path, engines: list[str], dtypes: list[str]) -> list[tuple[str, str, dict]]:
    """(engine, spec, options) for every curve to measure: the torch engine once per dtype, the
    llama.cpp engine once per installed GGUF format of the target."""
    from .. import store

    out = []
    for engine in engines:
        if engine == "torch":
            out += [("torch", model_spec, {"dtype": d}) for d in dtypes]
        else:
            out += [("llamacpp", spec, {}) for spec in store.installed_formats(model_spec, home)]
    return out


def run(model_spec: str, home: Path, engines: list[str], dtypes: list[str], qs=DEFAULT_QS, context: int = 300,
        reps: int = 3, threads: int | None = None) -> dict:
    from ..verifier import curve_key

    import torch

    result = {"model": store_base(model_spec), "context": context, "reps": reps, "curves": {}, "files": {},
              "threads": {}}
    if threads:
        torch.set_num_threads(threads)  # the torch engine's forwards; llama.cpp takes ``threads`` itself
    for engine, spec, options in variants(model_spec, home, engines, dtypes):
        target = lm.open_lm(spec, home, engine, threads=threads, **options)
        key = curve_key(target.info)
        result["curves"][key] = measure(target, qs, context, reps)
        result["files"][key] = target.info.path
        result["threads"][key] = threads_of(target)
        target.close()
    return result


def threads_of(target: lm.LM) -> int:
    """The threads a target's forwards ran on (a curve holds for that many only)."""
    import torch

    return int(getattr(target, "threads", 0) or torch.get_num_threads())


def measure_installed(model_spec: str, home: Path, threads: int | None = None) -> dict:
    """The installed target's chain curve on the engine its verifier will run (about a minute, with a
    progress bar), saved for the verifier to load at start: the first generations then draft with a
    measured T_V instead of learning it. `dovetail bench --verify-curve` stays the full measurement."""
    from ..verifier import curve_key

    target = lm.open_lm(model_spec, home, "auto", threads=threads)
    try:
        key = curve_key(target.info)
        result = {"model": store_base(model_spec), "context": 300, "reps": 2, "files": {key: target.info.path},
                  "curves": {key: measure(target, QUICK_QS, 300, 2, shapes=("chain",))},
                  "threads": {key: threads_of(target)},
                  "command": "dovetail models install (quick chain curve)"}
    finally:
        target.close()
    save_for_drafts(result, home)
    return result


def store_base(spec: str) -> str:
    """The model a curve belongs to: a format variant's curve ("name:q4_0") is the named model's."""
    return spec.split(":", 1)[0]


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, curves in result["curves"].items():
        for shape, style in (("chain", "-o"), ("tree", "--s")):
            pts = sorted((int(q), t) for q, t in curves[shape].items())
            if pts:
                ax.plot([q for q, _ in pts], [1000 * t for _, t in pts], style, ms=3, label=f"{key} {shape}")
    ax.set_xlabel("new tokens in one target forward (q)")
    ax.set_ylabel("ms")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_for_drafts(result: dict, home: Path) -> Path:
    """Keep the latest curves where the verifier finds them: $DOVETAIL_HOME/verify_curve.json, with this
    machine's identity and, per engine and format, when and at how many threads each was measured
    (curves of other engines and formats of the same model on this machine stay)."""
    from ..placement import cpu_identity, machine_id

    path = home / "verify_curve.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        saved = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        saved = {}
    here = {"machine_id": machine_id(), "cpu": cpu_identity().split(" | ")[1]}
    if saved.get("model") != result["model"] or saved.get("machine_id") != here["machine_id"]:
        saved = {}  # another model's or another machine's curves: replaced
    now = time.strftime("%Y-%m-%d %H:%M")
    merged = {**result, **here}
    for part in ("curves", "files", "threads"):
        merged[part] = {**saved.get(part, {}), **result.get(part, {})}
    merged["measured"] = {**saved.get("measured", {}), **{key: now for key in result["curves"]}}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(path)
    return path


def main(model_spec: str, home: Path, engines: list[str], dtypes: list[str], out_dir: Path, plots: bool,
         command: str, threads: int | None = None) -> int:
    """`dovetail bench --verify-curve`: measure, save for the drafts, print a table and a JSON line."""
    import time

    from . import report

    result = run(model_spec, home, engines, dtypes, threads=threads)
    result["command"], result["machine"] = command, report.machine_info(",".join(result["curves"]))
    stem = time.strftime("verify-curve-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        png = out_dir / f"{stem}.png"
        try:
            plot(result, png, f"{model_spec} on {result['machine']['cpu']}, {result['context']}-token context")
            result["plot"] = str(png)
        except ImportError:
            print("no plot: matplotlib is not installed (bash launch/setup.sh --dev installs it)")
    path = report.write(result, out_dir, stem)
    save_for_drafts(result, home)
    print(table(result))
    print(f"results: {path}")
    print(json.dumps({"results_file": str(path), "curves": result["curves"]}))
    return 0


def disorder(chain: dict) -> str | None:
    """Why a chain curve looks measured beside other work, or None: a q that cost more than twice a
    larger q (llama.cpp's kernels group rows, so a curve may dip a little, never by half)."""
    qs = sorted(chain)
    for i, q in enumerate(qs):
        later = [r for r in qs[i + 1:] if chain[r] * 2 < chain[q]]
        if later:
            return (f"q = {q} took {1000 * chain[q]:.0f} ms, more than twice q = {later[0]}'s "
                    f"{1000 * chain[later[0]]:.0f} ms")
    return None


def table(result: dict) -> str:
    lines = []
    for key, curves in result["curves"].items():
        qs = sorted(curves["chain"])
        lines.append(f"{key}: ms per forward over q new tokens ({result['files'][key]}, {result['context']}-token context)")
        lines.append("   q  " + " ".join(f"{q:>6d}" for q in qs))
        for shape in ("chain", "tree"):
            lines.append(f"{shape:6s}" + " ".join(f"{1000 * curves[shape][q]:6.0f}" if q in curves[shape] else "     -"
                                                  for q in qs))
        lines.append("T_V(q)/T_V(1): " + " ".join(f"q={q} {curves['chain'][q] / curves['chain'][1]:.2f}"
                                                 for q in qs if q in (2, 4, 8, 16)))
    return "\n".join(lines)
