"""Aggregate bench runs into figures, a table, a results file and plots."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path


def code_version() -> str | None:
    """The git commit the bench ran from (with '+changes' when the tree was dirty); None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine_info(dtype: str) -> dict:
    import psutil
    import torch
    import transformers

    cpu, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    isa = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("vnni",)]
    return {"cpu": cpu, "cores": psutil.cpu_count(logical=False), "threads": psutil.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "isa": sorted(isa),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "target_dtype": dtype, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _spread(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    v = sorted(values)
    return statistics.median(v), v[0], v[-1]


def summarize(runs: dict[str, list], baseline: str | None, references: dict[str, dict[int, list[int]]] | None,
              llamacpp: str | None = None) -> dict:
    """runs[system] = [Run per prompt, same prompt order]; speedups are per prompt vs ``baseline``
    (and vs ``llamacpp``, llama.cpp alone on the same file, when it ran); ``references[system]``: the
    greedy output (per prompt index) that system's output should equal."""
    out = {}
    for name, rs in runs.items():
        tps = [r.decode_tok_per_s for r in rs]
        med, lo, hi = _spread(tps)
        row = {"prompts": len(rs), "decode_tok_s_median": med, "decode_tok_s_min": lo, "decode_tok_s_max": hi,
               "e2e_tok_s_median": statistics.median([len(r.token_ids) / r.seconds for r in rs]) if rs else 0.0,
               "ttft_s_median": statistics.median([r.ttft_s for r in rs]) if rs else 0.0,
               "new_tokens_total": sum(len(r.token_ids) for r in rs)}
        if baseline in runs and name != baseline:
            ratios = [a.decode_tok_per_s / b.decode_tok_per_s for a, b in zip(rs, runs[baseline]) if b.decode_tok_per_s > 0]
            row["speedup_vs_target_median"], row["speedup_min"], row["speedup_max"] = _spread(ratios)
        elif name == baseline:
            row["speedup_vs_target_median"] = 1.0
        if llamacpp in runs:
            ratios = [a.decode_tok_per_s / b.decode_tok_per_s for a, b in zip(rs, runs[llamacpp]) if b.decode_tok_per_s > 0]
            row["speedup_vs_llamacpp_median"] = _spread(ratios)[0]
        kinds = {}
        for r in rs:
            for kind, k in r.by_kind.items():
                total = kinds.setdefault(kind, {"steps": 0, "drafted": 0, "accepted": 0, "draft_s": 0.0})
                for key in total:
                    total[key] += k[key]
        if kinds:
            row["by_kind"] = {kind: {"steps": k["steps"], "drafted": k["drafted"], "accepted": k["accepted"],
                                     "accept_pct": 100 * k["accepted"] / k["drafted"] if k["drafted"] else None,
                                     "draft_us_per_step": 1e6 * k["draft_s"] / k["steps"] if k["steps"] else 0.0}
                              for kind, k in sorted(kinds.items())}
        steps, drafted, accepted = (sum(getattr(r, k) for r in rs) for k in ("n_steps", "n_drafted", "n_accepted"))
        if drafted:
            row["accept_pct"] = 100 * accepted / drafted
        if steps:  # llama.cpp reports drafted / accepted counts but not its steps: no tau there
            # a cost model that drafts nothing (no token worth its verify cost) still decodes: tau 1
            row["tau"] = (accepted + steps) / steps
            for key in ("draft_s", "verify_s", "link_s"):
                row[f"{key[:-2]}_ms_per_step"] = 1000 * sum(r.timings.get(key, 0.0) for r in rs) / steps
        reference = (references or {}).get(name)
        if reference:
            same = [r.token_ids == reference[i] for i, r in enumerate(rs) if i in reference]
            row["identical_pct"] = 100 * sum(same) / len(same) if same else None
        out[name] = row
    return out


def table(dataset: str, summary: dict) -> str:
    head = (f"{'system':32s} {'tok/s med':>9s} {'[min-max]':>13s} {'speedup':>8s} {'vs llama':>8s} {'tau':>5s} "
            f"{'acc%':>5s} {'ttft s':>6s} {'same%':>5s} {'draft|verify|link ms/step':>26s}")
    lines = [f"dataset: {dataset}", head, "-" * len(head)]
    nan = float("nan")
    for name, r in summary.items():
        split = (f"{r['draft_ms_per_step']:.1f}|{r['verify_ms_per_step']:.0f}|{r['link_ms_per_step']:.1f}"
                 if "verify_ms_per_step" in r else "-")
        lines.append(
            f"{name:32s} {r['decode_tok_s_median']:9.2f} {r['decode_tok_s_min']:6.2f}-{r['decode_tok_s_max']:<6.2f} "
            f"{r.get('speedup_vs_target_median', nan):7.2f}x {r.get('speedup_vs_llamacpp_median', nan):7.2f}x "
            f"{r.get('tau', nan):5.2f} {r.get('accept_pct', nan):5.1f} {r['ttft_s_median']:6.2f} "
            f"{(r.get('identical_pct') if r.get('identical_pct') is not None else nan):5.0f} {split:>26s}")
    mixed = {n: r["by_kind"] for n, r in summary.items() if len(set(r.get("by_kind", {})) - {"none"}) > 1
             or "ngram" in r.get("by_kind", {})}
    if mixed:
        lines.append("per draft kind (steps: drafted / accepted, draft time per step):")
        for name, kinds in mixed.items():
            lines.append(f"  {name:30s} " + "  ".join(
                f"{kind} {k['steps']}: {k['drafted']}/{k['accepted']} {k['draft_us_per_step']:.0f}us"
                for kind, k in kinds.items()))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(results: dict) -> str:
    engines = ", ".join(f"{e} {w.get('format')}" for e, w in results.get("engines", {}).items())
    return f"{results['machine']['cpu'][:48]} | target {engines or results['machine']['target_dtype']}"


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return str(path)


def plots(results: dict, out_dir: Path, stem: str) -> list[str]:
    """Speedup bars per dataset and tokens/s per system (PNG)."""
    plt = _pyplot()
    files = []
    datasets = list(results["datasets"])
    systems = sorted({s for d in datasets for s in results["datasets"][d]["summary"]})
    for metric, label, fname in (("speedup_vs_target_median", "speedup over target (median per prompt)", "speedup"),
                                 ("decode_tok_s_median", "decode tokens/s (median)", "tok_s")):
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(systems), 3.6))
        width = 0.8 / max(len(datasets), 1)
        for i, d in enumerate(datasets):
            summ = results["datasets"][d]["summary"]
            vals = [summ.get(s, {}).get(metric, 0.0) or 0.0 for s in systems]
            bars = ax.bar([x + i * width for x in range(len(systems))], vals, width, label=d)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([x + width * (len(datasets) - 1) / 2 for x in range(len(systems))], systems, rotation=20, fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(_title(results), fontsize=8)
        ax.legend(fontsize=8)
        files.append(_save(fig, out_dir / f"{stem}-{fname}.png"))
    return files


def sweep_plots(results: dict, out_dir: Path, stem: str) -> list[str]:
    """tau and speedup against tree size, tree depth and a head's depth (decoder layers), one line
    per draft (per fusion, for head depth) and dataset, for every group of dovetail rows that differ
    only in that one setting (PNG; none without a sweep)."""
    plt = _pyplot()
    rows = {n: r for n, r in results.get("rows", {}).items() if "tree_tokens" in r}
    files = []
    for axis, label in (("tree_tokens", "tree size (tokens, root included)"), ("depth", "tree depth"),
                        ("head_layers", "draft head depth (decoder layers)")):
        fixed = [k for k in ("top_k", "depth", "tree_tokens") if k != axis]
        groups = {}
        for name, r in rows.items():
            if axis not in r:
                continue
            draft = (r["fusion"] if axis == "head_layers" else r["draft"]) + (" fixed" if r.get("cost_model") is False else "")
            groups.setdefault((draft, *(r[k] for k in fixed)), []).append((r[axis], name))
        groups = {g: sorted(v) for g, v in groups.items() if len({x for x, _ in v}) >= 2}
        if not groups:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for (draft, *rest), points in groups.items():
            for d, data in results["datasets"].items():
                summ = data["summary"]
                xs = [x for x, n in points if n in summ]
                tag = f"{draft} / {d} ({', '.join(f'{k}={v}' for k, v in zip(fixed, rest))})"
                for ax, metric in zip(axes, ("tau", "speedup_vs_target_median")):
                    ax.plot(xs, [summ[n].get(metric, 0.0) for x, n in points if n in summ], marker="o", label=tag)
        for ax, metric in zip(axes, ("tau (mean tokens per step)", "speedup over target")):
            ax.set_xlabel(label)
            ax.set_ylabel(metric)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        fig.suptitle(_title(results), fontsize=8)
        files.append(_save(fig, out_dir / f"{stem}-sweep-{axis}.png"))
    return files


def write(results: dict, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1))
    return path
