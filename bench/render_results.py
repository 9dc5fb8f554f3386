"""Write bench/RESULTS.md from the newest result files in bench/results/ (or the ones named).

    python bench/render_results.py [--bench FILE] [--curve FILE] [--gpu FILE] > bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def newest(pattern: str) -> Path | None:
    files = sorted(RESULTS.glob(pattern))
    return files[-1] if files else None


def rel(path: str) -> str:
    p = Path(path)
    return f"results/{p.name}"


def bench_section(res: dict, name: str) -> list[str]:
    m = res["machine"]
    shapes = {}
    for row in (r for r in res.get("rows", {}).values() if "tree_tokens" in r):
        shapes.setdefault(row["draft"], set()).add(tuple(row.get(k) for k in ("top_k", "depth", "tree_tokens")))
    both = {r.get("cost_model") for r in res.get("rows", {}).values()} == {True, False}
    lookup = any(r.get("lookup") for r in res.get("rows", {}).values())
    kind = ("Lookup drafts (n-gram) against llama.cpp alone and its n-gram modes" if lookup else
            "Cost model on vs off (the same shapes, sized by the cost model or fixed)" if both else
            "Tree sweep: draft heads against the 0.5B draft" if any(len(v) > 1 for v in shapes.values()) else "Side by side")
    commit = f" at commit {res['commit']}" if res.get("commit") else ""
    engines = ", ".join(f"{e} {w.get('format')}" for e, w in res.get("engines", {}).items())
    out = [f"## {kind} ({', '.join(res['datasets'])}){' on ' + engines if engines else ''}", "",
           f"Run `{name}`{commit}. Command: `{res['command']}`  ",
           f"Machine: {m['cpu']}, {m['cores']} cores / {m['threads']} threads, {m['memory_gib']} GiB, ISA {' '.join(m['isa'])}; "
           f"torch {m['torch']}, transformers {m['transformers']}; "
           + ("; ".join(f"engine {e}: {w.get('format')} weights, `{Path(w.get('file', '')).name}`"
                        for e, w in res["engines"].items()) + f"; draft {res.get('draft')} ({res.get('draft_engine')})"
              if res.get("engines") else f"target dtype {m['target_dtype']}")
           + f"; greedy {res['temperature'] == 0}, {res['n_new_tokens']} new tokens per prompt.", ""]
    for name, d in res["datasets"].items():
        vs_llama = any("speedup_vs_llamacpp_median" in r for r in d["summary"].values())
        out += [f"### {name} ({len(d['prompts'])} prompts; identical-output reference: `{d['identical_reference']}`)", "",
                "| system | decode tok/s median [min-max] | speedup vs target (median per prompt) | "
                + ("vs llamacpp (median per prompt) | " if vs_llama else "")
                + "tau | accept % | TTFT s | identical % | draft / verify / link ms per step |",
                "|---|---|---|---|---|---|---|---|" + ("---|" if vs_llama else "")]
        for sys_name, r in d["summary"].items():
            split = (f"{r['draft_ms_per_step']:.0f} / {r['verify_ms_per_step']:.0f} / {r['link_ms_per_step']:.1f}"
                     if "verify_ms_per_step" in r else "-")
            tau = f"{r['tau']:.2f}" if "tau" in r else "-"
            acc = f"{r['accept_pct']:.1f}" if "accept_pct" in r else "-"
            same = f"{r['identical_pct']:.0f}" if r.get("identical_pct") is not None else "-"
            sp = r.get("speedup_vs_target_median")
            vl = (f"{r['speedup_vs_llamacpp_median']:.2f}x | " if "speedup_vs_llamacpp_median" in r else "- | ") if vs_llama else ""
            out.append(f"| {sys_name} | {r['decode_tok_s_median']:.2f} [{r['decode_tok_s_min']:.2f}-{r['decode_tok_s_max']:.2f}] | "
                       f"{sp:.2f}x | {vl}{tau} | {acc} | {r['ttft_s_median']:.2f} | {same} | {split} |" if sp is not None else
                       f"| {sys_name} | {r['decode_tok_s_median']:.2f} | - | {vl}{tau} | {acc} | {r['ttft_s_median']:.2f} | {same} | {split} |")
        out.append("")
        kinds = {n: r["by_kind"] for n, r in d["summary"].items() if "ngram" in r.get("by_kind", {})}
        if kinds:
            out += ["Per draft kind (steps; drafted / accepted tokens; draft time per step; `none`: steps that drafted nothing):", ""]
            out += [f"- {n}: " + "; ".join(f"{kind} {k['steps']} steps, {k['drafted']} / {k['accepted']}, "
                                           f"{k['draft_us_per_step']:.0f} us" for kind, k in ks.items()) for n, ks in kinds.items()]
            out.append("")
        diverged = {n: r["divergences"] for n, r in d["summary"].items() if r.get("divergences")}
        if diverged:
            out += ["First divergences from the row's engine decoding one token at a time (position in the output, "
                    "our token / the reference's, the reference's top-2 logit gap there):", ""]
            out += [f"- {n}: " + "; ".join(f"{x['prompt']} at {x['at']} ({x['ours']} / {x['reference']}, gap {x['top2_gap']:.3f})"
                                            for x in rows) for n, rows in diverged.items()]
            out.append("")
    for plot in res.get("plots", []):
        out.append(f"![{Path(plot).stem}]({rel(plot)})")
    return out + [""]


def curve_section(res: dict) -> list[str]:
    out = ["## Verification cost curve T_V(q)", "", f"Command: `{res['command']}`  ",
           f"Model {res['model']}, {res['context']}-token cached context, median of {res['reps']} after a warm-up; "
           f"machine {res['machine']['cpu']}.", ""]
    for dtype, curves in res["curves"].items():
        qs = sorted(int(q) for q in curves["chain"])
        where = f", `{Path(res['files'][dtype]).name}`" if res.get("files", {}).get(dtype) else ""
        ratios = ", ".join(f"T_V({q})/T_V(1) = {curves['chain'][str(q)] / curves['chain']['1']:.2f}"
                           for q in (2, 4, 8) if str(q) in curves["chain"] and "1" in curves["chain"])
        out += [f"**{dtype}**{where} (ms; {ratios})", "", "| q | " + " | ".join(map(str, qs)) + " |", "|---" * (len(qs) + 1) + "|"]
        for shape in ("chain", "tree"):
            row = [f"{1000 * curves[shape][str(q)]:.0f}" if str(q) in curves[shape] else "-" for q in qs]
            out.append(f"| {shape} | " + " | ".join(row) + " |")
        out.append("")
    if res.get("plot"):
        out.append(f"![verify curve]({rel(res['plot'])})")
    return out + [""]


def load_section(res: dict, name: str) -> list[str]:
    m = res["machine"]
    out = [f"## Server load: `dovetail serve` with N concurrent streams ({res['dataset']}, draft {res['draft']})", "",
           f"Run `{name}` at commit {res.get('commit')}. Command: `{res['command']}`  ",
           f"Machine: {m['cpu']}, {m['cores']} cores; {res['n']} new tokens a request, {res['requests_per_stream']} "
           f"requests one after another per stream, `--parallel {res['parallel']}`; the official `openai` client.", "",
           "| streams | ok | failed | lost | aggregate tok/s | x one stream | TTFT p50 s | TTFT p99 s | tok/s per stream (median) |",
           "|---|---|---|---|---|---|---|---|---|"]
    base = res["levels"][0]["aggregate_tok_s"] or 1.0
    for r in res["levels"]:
        out.append(f"| {r['streams']} | {r['ok']} | {r['failed']} | {r['lost']} | {r['aggregate_tok_s']:.2f} | "
                   f"{r['aggregate_tok_s'] / base:.2f}x | {r['ttft_p50_s'] or 0:.2f} | {r['ttft_p99_s'] or 0:.2f} | "
                   f"{r['per_stream_tok_s_median']:.2f} |")
    out.append("")
    same = res.get("identity")
    if same:
        out.append(f"- Greedy outputs of the {same['streams']}-stream level identical to the same request run alone: "
                   f"{same['identical']} of {same['requests']}.")
        if same.get("divergences"):
            out.append("- Where each differing pair parts (token index; batched / alone; the target's one-token decode's "
                       "top-2 and their logit gap there): " + "; ".join(
                           f"{d['at']}: {d['batched']!r} / {d['alone']!r}, decode {d['one_token_decode']!r} vs "
                           f"{d['runner_up']!r}, gap {d['top2_gap']}" for d in same["divergences"]) + ".")
    if res.get("steps_by_pass_sessions"):
        out.append("- Verification steps by sessions in their pass: " +
                   ", ".join(f"{b}: {n}" for b, n in res["steps_by_pass_sessions"].items()) + ".")
    if res.get("draft_passes"):
        d = res["draft_passes"]
        out.append(f"- The shared draft model ran {d['forwards']} forwards of all requests in {d['passes']} passes "
                   f"({d['forwards'] / max(1, d['passes']):.2f} a pass, the start-up warm-up included).")
    over = res.get("server_vs_run")
    if over and "rates" in over:  # earlier files compared whole-request rates on prompts the server had seen
        out.append(f"- One stream through the server vs `dovetail run` on the same {over['prompts']} prompts (decode tokens/s, "
                   f"after the first token): median {over['serve_over_run_median']:.3f}x; per prompt " +
                   ", ".join(f"{r['serve_tok_s']:.2f} vs {r['run_tok_s']:.2f}" for r in over["rows"]) + ".")
    return out + [""]


def fuzz_section(res: dict, name: str) -> list[str]:
    m, codes = res["machine"], ", ".join(f"{k} {v}" for k, v in sorted(res["replies"].items(), key=lambda kv: -kv[1]))
    return [f"## Link fuzzing `{name}`", "",
            f"Command: `{res['command']}` at commit {res['commit']}; verifier on {res['model']}, machine {m['cpu']}, "
            f"{m['cores']} cores.", "",
            f"- {res['messages']} hostile messages in {res['seconds']:.0f} s, {res['answered']} answered: crashed "
            f"{res['crashed']}, hangs {res['hangs']}, `internal` errors {res['internal_errors']}.",
            f"- A well-behaved greedy client beside them: {res['good_generations']} generations, "
            f"{res['disturbed']} different from its first.",
            f"- Verifier RSS {res['rss_start_mib']} MiB before, {res['rss_end_mib']} MiB after the hostile peers left "
            f"(their sessions reclaimed): {100 * res['rss_change']:+.1f} %" + (
                f"; at each tenth of the run {', '.join(map(str, res['rss_every_tenth_mib']))} MiB."
                if res.get("rss_every_tenth_mib") else "."),
            *([f"- {res['aim']:.0%} of the messages aimed at the model paths (valid STARTs and VERIFYs of the peer's own "
               f"sessions): {res['model_replies']} RESULTs, i.e. messages the model ran."] if res.get("aim") else []),
            f"- Replies: {codes}.", ""]


def draft_batch_section(res: dict, name: str) -> list[str]:
    out = [f"## The server's shared draft LM batched on a GPU `{name}` ({res['device']}, {res['dtype']})", "",
           "Command: `PYTHONPATH=. python bench/gpu_draft_batch.py OUT` on a lent machine; random weights of "
           "Qwen2.5-0.5B's shapes through the torch engine; median of 20 (ms).", "",
           "| cached tokens | 1 session | 2 / 4 / 8 / 16 in one pass | 8 / 16 one after another | 8 trees of 8 nodes: one pass / one after another | 8 threads x 20 steps: plain / SharedLM (passes for forwards) | batched vs alone: max abs diff, argmax same |",
           "|---|---|---|---|---|---|---|"]
    for ctx, r in res["contexts"].items():
        out.append(f"| {ctx} | {r['one_token']:.1f} | {r['batch_2']:.1f} / {r['batch_4']:.1f} / {r['batch_8']:.1f} / "
                   f"{r['batch_16']:.1f} | {r['each_8']:.1f} / {r['each_16']:.1f} | {r['tree8_batch_8']:.1f} / "
                   f"{r['tree8_each_8']:.1f} | {r['threads_plain_ms']:.0f} / {r['threads_shared_ms']:.0f} "
                   f"({r['shared_passes']} for {r['shared_forwards']}) | {r['max_abs_diff']:.4f}, {r['argmax_agree']} of 8 |")
    return out + [""]


def gather_section(res: dict, name: str) -> list[str]:
    """bench/gpu_draft_gather.py's file: SharedLM's gather window, threads drafting at once."""
    out = [f"## SharedLM's gather window on a GPU `{name}`", "",
           "Command: `PYTHONPATH=. OUT=DIR python bench/gpu_draft_gather.py` on a lent machine (random weights of "
           "Qwen2.5-0.5B's shapes, float16); wall ms for threads drafting one-token steps at 200 cached tokens, "
           "two repetitions.", "",
           "| threads x steps | plain engine | gather 0 ms | 0.5 ms | 2 ms (default) | 5 ms |", "|---|---|---|---|---|---|"]
    cells = lambda g: " / ".join(f"{res[f'gather_{g}_{r}'][0]:.0f} ({res[f'gather_{g}_{r}'][1]} passes)" for r in (0, 1))
    out.append(f"| 8 x 20 | {res['plain_0']:.0f} / {res['plain_1']:.0f} | {cells(0.0)} | {cells(0.0005)} | "
               f"{cells(0.002)} | {cells(0.005)} |")
    for n in (1, 4):
        pair = lambda k: " / ".join(f"{res[f'threads{n}_{k}_{r}']:.0f}" for r in (0, 1))
        out.append(f"| {n} x 20 | {pair('plain')} | {pair('gather0')} | - | {pair('gather2ms')} | - |")
    return out + [""]


def gpu_section(res: dict, name: str) -> list[str]:
    out = [f"## GPU check {name} ({res['gpu']}, {res['cpu_cores']} CPU cores)", "",
           "Command: `bash bench/gpu_check.sh OUT` on a lent machine (random weights of the real shapes for timing).", "",
           f"Lossless with the head on CUDA and the verifier on the CPU: {res['lossless']}", "",
           "| head shape | layers | tree (top-k, depth, tokens) | draft step ms (median) |", "|---|---|---|---|"]
    for shape, rows in res["head_timing"].items():
        for h in rows:
            out.append(f"| {shape} | {h['layers']} | {h['top_k']}, {h['depth']}, {h['tree_tokens']} | {h['draft_ms_median']:.1f} |")
    out += ["", "CPU verification of a 7B-shaped target on that machine's cores (ms):", "",
            "| dtype | " + " | ".join(f"q={q}" for q in res["cpu_curve_7B"][0]["chain_ms"]) + " |",
            "|---" * (len(res["cpu_curve_7B"][0]["chain_ms"]) + 1) + "|"]
    for c in res["cpu_curve_7B"]:
        out.append(f"| {c['dtype']} | " + " | ".join(f"{t:.0f}" for t in c["chain_ms"].values()) + " |")
    out += ["", "Projection for LLaMA-2-7B there: tok/s = tau / (draft + verify(tree tokens) + 1 ms link):", "",
            "| target dtype | head layers | tree tokens | tau | CPU-only tok/s | Dovetail tok/s | speedup |", "|---|---|---|---|---|---|---|"]
    for p in res["projection_7B"]:
        out.append(f"| {p['target_dtype']} | {p['head_layers']} | {p['tree_tokens']} | {p['tau']:.1f} | {p['cpu_only_tok_s']:.2f} | "
                   f"{p['dovetail_tok_s']:.2f} | {p['speedup']:.2f}x |")
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bench", nargs="*", default=None)
    ap.add_argument("--curve", default=None)
    ap.add_argument("--load", nargs="*", default=None, help="server load files (default: the newest load-*.json)")
    ap.add_argument("--gpu", nargs="*", default=None, help="GPU check files (default: every gpu_check-*.json)")
    ap.add_argument("--notes", default=None, help="a markdown file appended at the end (reading of the numbers)")
    args = ap.parse_args()
    lines = ["# dovetail_rt benchmark results", "",
             "Regenerate with `bash bench/run_all.sh` (all numbers below come from the files in `bench/results/`, "
             "written by the commands shown; nothing is typed in by hand).", ""]
    for f in args.bench or [p for p in [newest("bench-*.json")] if p]:
        lines += bench_section(json.loads(Path(f).read_text()), Path(f).stem)
    for f in args.load if args.load is not None else [p for p in [newest("load-*.json")] if p]:
        lines += load_section(json.loads(Path(f).read_text()), Path(f).stem)
    for f in sorted(map(str, RESULTS.glob("fuzz-*.json"))):
        lines += fuzz_section(json.loads(Path(f).read_text()), Path(f).stem)
    curve = args.curve or newest("verify-curve-*.json")
    if curve:
        lines += curve_section(json.loads(Path(curve).read_text()))
    for f in args.gpu if args.gpu is not None else sorted(map(str, RESULTS.glob("gpu_check-*.json"))):
        lines += gpu_section(json.loads(Path(f).read_text()), Path(f).stem)
    for f in sorted(map(str, RESULTS.glob("gpu_draft_batch-*.json"))):
        lines += draft_batch_section(json.loads(Path(f).read_text()), Path(f).stem)
    for f in sorted(map(str, RESULTS.glob("gpu_draft_gather-*.json"))):
        lines += gather_section(json.loads(Path(f).read_text()), Path(f).stem)
    if args.notes:
        lines += [Path(args.notes).read_text()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
