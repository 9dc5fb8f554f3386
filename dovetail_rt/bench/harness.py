"""One bench run: every system on every prompt, interleaved prompt by prompt, in one process tree."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from .. import data, lm
from ..config import CHILD_ENDPOINT, BenchConfig, DraftConfig, LinkConfig, VerifierConfig
from ..draft_kinds import open_draft
from ..drafter import Choice
from ..ngram import Lookup
from ..launcher import VerifierChild
from . import report
from .systems import DovetailSystem, HFSystem, LlamaCppSystem

log = logging.getLogger(__name__)

ALL_SYSTEMS = ("target", "hf", "hf-assisted", "dovetail", "ngram", "ngram+draft", "llamacpp", "llamacpp-spec",
               "llamacpp-ngram")
# Default tree shapes (TOPK:DEPTH:TOKENS) per draft kind; --trees replaces both for a sweep.
LM_TREES, HEAD_TREES = "2:4:8", "4:5:8"


def tree_modes(spec: str, prefix: str, config: BenchConfig) -> dict[str, tuple[DraftConfig, dict]]:
    """Rows for every tree shape in ``spec`` ("TOPK:DEPTH:TOKENS,..."): name -> (config, shape)."""
    modes = {}
    for item in spec.split(","):
        try:
            k, d, t = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"tree shape '{item}': expected TOPK:DEPTH:TOKENS, e.g. 4:5:8") from None
        shape = {"top_k": k, "depth": d, "tree_tokens": t}
        cfg = DraftConfig(draft_max=config.draft_max, tree_top_k=k, tree_depth=d, tree_tokens=t)
        modes |= cost_model_variants(f"{prefix}-t{t}d{d}k{k}", cfg, shape, config.cost_model)
    return modes


def cost_model_variants(name: str, cfg: DraftConfig, shape: dict, choice: str) -> dict[str, tuple[DraftConfig, dict]]:
    """--cost-model on: sized by the cost model; off: fixed shapes (chains stop by confidence,
    trees sent whole), rows named ...-fixed; both: the two side by side."""
    on, off = (cfg, {**shape, "cost_model": True}), (replace(cfg, adaptive=False), {**shape, "cost_model": False})
    return {"on": {name: on}, "off": {f"{name}-fixed": off}, "both": {name: on, f"{name}-fixed": off}}[choice]


def dovetail_modes(config: BenchConfig) -> dict[str, tuple[DraftConfig, dict]]:
    """Every draft mode of the small draft LM, one row each: the chain and the tree(s)."""
    chain = cost_model_variants("dovetail-chain", DraftConfig(draft_max=config.draft_max), {"chain": True}, config.cost_model)
    return chain | tree_modes(config.trees or LM_TREES, "dovetail-tree", config)


MAX_PROMPT_TOKENS = 1024  # prompts longer than this are skipped (a few ShareGPT first turns)


def llamacpp_parts(home: Path, target: str, draft: str):
    """(bin_dir, target_gguf, draft_gguf) or why llama.cpp cannot run."""
    bin_dir = home / "llama.cpp" / "build" / "bin"
    if not (bin_dir / "llama-completion").exists():
        return f"no llama.cpp build in {bin_dir}: run bash bench/build_llamacpp.sh"
    from .. import store

    t, d = store.gguf_file(target, home), store.gguf_file(draft, home)
    if t is None or d is None:
        return f"llama.cpp needs GGUF files for {target} and {draft} (the installed defaults keep theirs)"
    return bin_dir, t, d


def load_prompts(dataset: str | None, prompts_file: str | None, limit: int, tokenizer) -> tuple[str, list]:
    if prompts_file:
        items = []
        for i, line in enumerate(Path(prompts_file).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                items.append(data.Prompt(str(rec.get("id", i)), rec["prompt"], bool(rec.get("chat", False))))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{prompts_file} line {i + 1}: expected {{\"prompt\": ..., \"chat\": bool, \"id\": ...}}: {exc}")
        name = Path(prompts_file).stem
    else:
        items, name = data.load(dataset), dataset
    from ..client import encode_prompt

    encoded = [(p.id, encode_prompt(tokenizer, p.text, p.chat, p.messages[:-1])) for p in items[: (limit * 3 if limit else None)]]
    encoded = [(pid, ids) for pid, ids in encoded if len(ids) <= MAX_PROMPT_TOKENS]  # long ShareGPT turns
    return name, encoded[:limit] if limit else encoded


def engine_rows(engines: list[str]) -> dict[str, str]:
    """Row-name suffix per engine: the first engine's rows keep plain names (`target`, `dovetail-chain`),
    the others get `@engine` (`target@torch`)."""
    return {e: "" if i == 0 else f"@{e}" for i, e in enumerate(engines)}


class Lineup:
    """The systems of one run in the order they generate, what each dovetail row is (``rows``, for the
    sweep plots) and which engine's one-token greedy output it must equal (``engine_of``)."""

    def __init__(self):
        self.active: list = []
        self.rows: dict[str, dict] = {}
        self.engine_of: dict[str, str] = {}

    def add(self, system, engine: str | None = None, row: dict | None = None) -> None:
        self.active.append(system)
        if engine is not None:
            self.engine_of[system.name] = engine
        if row is not None:
            self.rows[system.name] = row


def run(config: BenchConfig, home: Path) -> dict:
    """Run the bench ``config`` describes; returns the results dict (the caller writes it)."""
    from contextlib import ExitStack

    from ..lm_torch import resolve_dtype

    systems = [s.strip() for s in config.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in ALL_SYSTEMS]
    if bad:
        raise ValueError(f"unknown systems {bad}; choose from {', '.join(ALL_SYSTEMS)}")
    engines = list(dict.fromkeys(lm.choose_engine(e.strip(), config.model, home) for e in config.engine.split(",")))
    suffix = engine_rows(engines)
    dtype_name = str(resolve_dtype(config.dtype)).removeprefix("torch.")
    draft_model, tokenizer = open_draft(config.model_draft, home, config.draft_dtype, "cpu", config.draft_engine)
    prompt_sets = load_prompt_sets(config, tokenizer)
    draft_info = getattr(draft_model, "info", None)
    results = {"command": config.command_line, "commit": report.code_version(),
               "machine": report.machine_info(dtype_name), "n_new_tokens": config.n_predict,
               "temperature": config.temp, "target": config.model, "draft": config.model_draft, "engines": {},
               "draft_engine": draft_info.describe() if draft_info else "torch", "datasets": {}}
    lineup = Lineup()
    with ExitStack() as stack:
        for engine in engines:
            child = stack.enter_context(VerifierChild(VerifierConfig(
                model=config.model, home=home, engine=engine, dtype=dtype_name, max_sessions=max(16, sessions_needed(config)),
                prefix_cache=0,  # every row prefills its whole prompt, as llama.cpp's row does
                link=LinkConfig(endpoint=CHILD_ENDPOINT))))
            results["engines"][engine] = child.target
            add_dovetail_rows(lineup, config, home, systems, child.endpoint, engine, suffix[engine], draft_model, tokenizer)
        add_baseline_rows(lineup, config, home, systems, dtype_name, tokenizer)
        for s in lineup.active:  # closed before the verifiers stop, on every exit path
            stack.callback(s.close)
        for s in lineup.active:  # warm-up: one short generation each (not measured)
            s.generate(prompt_sets[0][1][0][1], 4, config.temp, config.seed)
        for name, prompts in prompt_sets:
            results["datasets"][name] = measure(lineup, name, prompts, config, home, suffix, dtype_name)
    results["rows"] = lineup.rows
    return results


def load_prompt_sets(config: BenchConfig, tokenizer) -> list[tuple[str, list]]:
    """(dataset name, [(prompt id, token ids)]) per --dataset (or the --prompts file), --limit each."""
    datasets = [d.strip() for d in config.dataset.split(",")] if not config.prompts else [None]
    limits = [int(x) for x in str(config.limit).split(",")]
    if len(limits) not in (1, len(datasets)):
        raise ValueError(f"--limit {config.limit}: give one number, or one per dataset ({len(datasets)})")
    limits = limits * len(datasets) if len(limits) == 1 else limits
    return [load_prompts(d, config.prompts, n, tokenizer) for d, n in zip(datasets, limits)]


def sessions_needed(config: BenchConfig) -> int:
    """Every system keeps its session open for the whole run: the verifier must not close the oldest."""
    heads = [h for h in (config.head or "").split(",") if h]
    return 3 + len(dovetail_modes(config)) + len(heads) * len(tree_modes(config.trees or HEAD_TREES, "dovetail-head", config))


def add_dovetail_rows(lineup: Lineup, config: BenchConfig, home: Path, systems: list[str], endpoint: str, engine: str, tag: str,
                      draft_model, tokenizer) -> None:
    """`target`, the lookup rows, the draft LM's rows and every head's, on one engine's verifier."""
    draft_name = Path(config.model_draft).name
    if "target" in systems:
        lineup.add(DovetailSystem(f"target{tag}", endpoint, None, tokenizer, DraftConfig()), engine)
    # lookup rows: each its own Lookup, so its index of earlier outputs holds only its own outputs
    for system, name, draft in (("ngram", "dovetail-ngram", None), ("ngram+draft", f"dovetail-ngram+{draft_name}", draft_model)):
        if system in systems:
            cfg = DraftConfig(draft_max=config.draft_max, lookup_max=config.lookup_max)
            lineup.add(DovetailSystem(name + tag, endpoint, Choice(Lookup(), draft) if draft else Lookup(), tokenizer, cfg),
                       engine, {"draft": name.removeprefix("dovetail-"), "engine": engine, "lookup": True})
    if "dovetail" in systems:
        for name, (cfg, shape) in dovetail_modes(config).items():
            lineup.add(DovetailSystem(name + tag, endpoint, draft_model, tokenizer, cfg), engine,
                       {"draft": config.model_draft, "engine": engine, **shape})
        for head_dir in [h for h in (config.head or "").split(",") if h]:
            head, _ = open_draft(head_dir, home, config.draft_dtype, "cpu")
            for name, (cfg, shape) in tree_modes(config.trees or HEAD_TREES, "dovetail-head", config).items():
                lineup.add(DovetailSystem(f"{name}-{Path(head_dir).name}{tag}", endpoint, head, tokenizer, cfg), engine,
                           {"draft": Path(head_dir).name, "head_layers": head.config.layers, "engine": engine,
                            "fusion": head.config.fusion, **shape})


def add_baseline_rows(lineup: Lineup, config: BenchConfig, home: Path, systems: list[str], dtype_name: str, tokenizer) -> None:
    """transformers' `hf` / `hf-assisted`, and llama.cpp's binaries on the same GGUF file."""
    from ..lm_torch import eos_ids, load_model, resolve_dtype

    if "hf" in systems or "hf-assisted" in systems:
        hf_target, _ = load_model(config.model, home, resolve_dtype(dtype_name))
        eos = eos_ids(hf_target, tokenizer)
        if "hf" in systems:
            lineup.add(HFSystem("hf", hf_target, eos=eos))
        if "hf-assisted" in systems:  # transformers' own assisted generation needs a torch draft module
            hf_draft = lm.open_lm(config.model_draft, home, "torch", dtype=config.draft_dtype if config.draft_dtype != "auto" else "int8")
            lineup.add(HFSystem("hf-assisted", hf_target, assistant=hf_draft.model, eos=eos))
    spec_types = [t for t in config.llamacpp_ngram.split(",") if t] if "llamacpp-ngram" in systems else []
    for name, spec_type in [(n, None) for n in ("llamacpp", "llamacpp-spec") if n in systems] + [
            (f"llamacpp-ngram:{t}", t) for t in spec_types]:
        found = llamacpp_parts(home, config.model, config.model_draft)
        if isinstance(found, str):
            log.warning("skipping %s: %s", name, found)
            print(f"skipping {name}: {found}", file=sys.stderr)
        else:
            lineup.add(LlamaCppSystem(name, *found, tokenizer, threads=os.cpu_count() or 1, spec_type=spec_type))


def measure(lineup: Lineup, name: str, prompts: list, config: BenchConfig, home: Path, suffix: dict[str, str], dtype_name: str) -> dict:
    """Every system on every prompt of one dataset, interleaved prompt by prompt, and the summary."""
    runs = {s.name: [] for s in lineup.active}
    for pid, ids in tqdm(prompts, desc=f"bench {name}", unit="prompt"):
        for s in lineup.active:  # interleaved: every system sees the machine in the same state
            runs[s.name].append(s.generate(ids, config.n_predict, config.temp, config.seed))
    references = greedy_references(runs, lineup.engine_of, suffix) if config.temp == 0 else None
    summary = report.summarize(runs, "target" if "target" in runs else None, references,
                               "llamacpp" if "llamacpp" in runs else None)
    if references:
        add_divergences(summary, runs, references, lineup.engine_of, prompts, config.model, home, dtype_name)
    return {"prompts": [p for p, _ in prompts], "summary": summary,
            "identical_reference": "each row's engine's target row (one token per step)"}


def greedy_references(runs: dict, engine_of: dict[str, str], suffix: dict[str, str]) -> dict[str, dict[int, list[int]]]:
    """Which output each row must equal: a dovetail row its own engine's `target` row (that engine
    decoding one token at a time from the same file); `hf` rows the first engine's target, or `hf`
    without a target row. llama.cpp's binaries print text, which re-tokenizes differently: no reference."""
    first = "target" if "target" in runs else ("hf" if "hf" in runs else None)
    refs = {}
    for name in runs:
        if name.startswith("llamacpp"):  # text out, re-tokenized: not comparable token for token
            continue
        ref = f"target{suffix[engine_of[name]]}" if name in engine_of else first
        if ref in runs and ref != name:
            refs[name] = dict(enumerate(r.token_ids for r in runs[ref]))
    return refs


def reference_logits(target: lm.LM, prompt: list[int], generated: list[int]):
    """The logits the reference had when it chose the token after ``generated``: computed the way it
    decoded (the prompt in one pass, then one token per forward), so the same rounding."""
    state = target.session()
    logits = state.forward(prompt, logits_for=1).logits[-1]
    state.keep(list(range(len(prompt))))
    for tok in generated:
        logits = state.forward([tok]).logits[-1]
        state.keep([0])
    state.close()
    return logits


def add_divergences(summary: dict, runs: dict, references: dict, engine_of: dict[str, str], prompts, model: str,
                    home: Path, dtype: str) -> None:
    """For every output that differs from its reference: where it first differs, and the reference
    engine's top-2 logit gap there (a near-tie explains a divergence; a wide gap would be a bug)."""
    opened: dict[str, lm.LM] = {}
    for name, reference in references.items():
        engine = engine_of.get(name)
        if engine is None:
            continue
        found = []
        for i, run_ in enumerate(runs[name]):
            ref = reference[i]
            at = next((j for j, (a, b) in enumerate(zip(run_.token_ids, ref)) if a != b), None)
            if at is None:
                continue
            target = opened.get(engine) or opened.setdefault(engine, lm.open_lm(model, home, engine, dtype=dtype))
            top = reference_logits(target, prompts[i][1], ref[:at]).topk(2).values.tolist()
            found.append({"prompt": prompts[i][0], "at": at, "ours": run_.token_ids[at], "reference": ref[at],
                          "top2_gap": round(top[0] - top[1], 4)})
        if found:
            summary[name]["divergences"] = found
    for target in opened.values():
        target.close()


