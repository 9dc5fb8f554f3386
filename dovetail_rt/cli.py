"""`dovetail` command line: argparse -> configs -> run(). The only place argv and env are read.

torch is imported lazily: the verifier pins its CPUs and threads before torch loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import store
from .config import (CHILD_ENDPOINT, DRAFT_MAX, ENGINE_CHOICES, TREE_TOKENS, WIDEST, BenchConfig, ClientConfig,
                     DraftConfig, LinkConfig, ServeConfig, dovetail_home)
from .verifier_options import add_verifier_options, placement_config, verifier_config

log = logging.getLogger("dovetail")

EPILOG = """\
examples:
  dovetail models install                              # the default pair (Qwen2.5-Coder 1.5B + 0.5B)
  dovetail run --prompt "def quicksort(arr):" -n 64    # both processes on this host
  dovetail keys generate ~/.dovetail/keys --name verifier                         # once per host (A, B: --name draft)
  dovetail verifier -m qwen2.5-coder-1.5b --listen tcp://0.0.0.0:5557 -t 16 \\
      --curve-secret-key ~/.dovetail/keys/verifier.key_secret --authorized-keys ~/.dovetail/keys/authorized  # host A
  dovetail generate --verifier tcp://HOST_A:5557 -md qwen2.5-coder-0.5b --prompt "Hi" --chat \\
      --curve-secret-key ~/.dovetail/keys/draft.key_secret --curve-server-key ~/.dovetail/keys/verifier.key  # host B
"""


# ---- shared option groups ------------------------------------------------------------------------
def add_draft_options(p: argparse.ArgumentParser, model_required: bool, generation: bool = True) -> None:
    g = p.add_argument_group("draft")
    g.add_argument("-md", "--model-draft", required=model_required, default=None if model_required else store.DEFAULT_DRAFT,
                   help="the draft: a small LM with the target's tokenizer (short name, folder, .gguf or HF id), a "
                        "Dovetail head folder, 'ngram' (lookup in the prompt and output so far: no model, no CPU cost), "
                        "or 'ngram+DRAFT' (the lookup when it pays, else DRAFT)"
                   + ("" if model_required else f" (default {store.DEFAULT_DRAFT})"))
    g.add_argument("--device-draft", default="auto", choices=["auto", "cuda", "cpu"], help="where the draft runs (auto: cuda if present)")
    g.add_argument("--draft-engine", default="auto", choices=ENGINE_CHOICES,
                   help="what runs a small-LM draft; auto = llamacpp for a GGUF draft (or an installed default) on the "
                        "CPU, torch on CUDA and for folders")
    g.add_argument("--draft-dtype", default="auto", choices=["auto", "int8", "float32", "bfloat16", "float16"],
                   help="torch draft precision (auto: float16 on CUDA, int8 dynamic quantization on the CPU; a llama.cpp "
                        "draft runs its file's format); it never changes the output, only speed and acceptance")
    d = DraftConfig()
    g.add_argument("--draft-max", type=int, default=None,
                   help=f"most draft tokens per step (default: {DRAFT_MAX}, up to {WIDEST} where the verifier's curve is flat; "
                        "the cost model picks the length below it)")
    g.add_argument("--draft-min", type=int, default=d.draft_min, help=f"fewest draft tokens per step (default {d.draft_min})")
    g.add_argument("--draft-p-min", type=float, default=d.p_min,
                   help=f"stop a chain when the draft's top probability falls under this (default {d.p_min})")
    g.add_argument("--no-cost-model", action="store_true",
                   help="size chains by --draft-p-min only and send trees whole, not sized by the expected-tokens/s cost model")
    g.add_argument("--tree-top-k", type=int, default=None,
                   help="branching of EAGLE-2 dynamic trees; 1 = chains (default: chains for a small LM, 4 for a head)")
    g.add_argument("--tree-depth", type=int, default=d.tree_depth, help=f"tree rounds (default {d.tree_depth})")
    g.add_argument("--tree-tokens", type=int, default=None,
                   help=f"tokens per grown tree, root included (default: {TREE_TOKENS}, up to {WIDEST} where the verifier's "
                        "curve is flat; the cost model cuts it)")
    g.add_argument("--lookup-min", type=int, default=d.lookup_min,
                   help=f"ngram drafts: shortest context tail matched (default {d.lookup_min})")
    g.add_argument("--lookup-max", type=int, default=d.lookup_max,
                   help=f"ngram drafts: longest context tail matched; longer matches are trusted more (default {d.lookup_max})")

    if not generation:
        return
    s = p.add_argument_group("generation")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--prompt-file", help="read the prompt from this file ('-' for stdin)")
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (a user turn)")
    s.add_argument("-n", "--n-predict", type=int, default=128, help="most new tokens (default 128)")
    s.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default 0)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    s.add_argument("--json", action="store_true", help="print one JSON object (text, ids, stats) instead of streaming")
    s.add_argument("--timeout", type=float, default=LinkConfig.timeout_s,
                   help=f"seconds to wait for any verifier reply (default {LinkConfig.timeout_s:g})")


def add_key_options(p: argparse.ArgumentParser) -> None:
    k = p.add_argument_group("keys (for a verifier that listens with keys: `dovetail keys generate`)")
    k.add_argument("--curve-secret-key", default=None, help="this host's secret key file (NAME.key_secret)")
    k.add_argument("--curve-server-key", default=None, help="the verifier's public key file (NAME.key)")


def serve_config(args) -> ServeConfig:
    child = None if args.verifier else verifier_config(args, LinkConfig(endpoint=CHILD_ENDPOINT),
                                                       max_sessions=args.parallel + 1)
    return ServeConfig(model=args.model, home=dovetail_home(), client=client_config(args, child=child is not None),
                       verifiers=tuple(args.verifier or ()), child=child, placement=placement_config(args), host=args.host,
                       port=args.port, parallel=args.parallel, queue=args.queue, api_key=args.api_key,
                       cors_origins=cors_origins(args.cors_origin), aliases=tuple(args.alias))


def client_config(args, child: bool = False) -> ClientConfig:
    """The draft options of `generate`, `run` and `serve` as one config. ``child``: the verifier is this
    command's own child (on this host, no keys; its endpoint is known once it runs)."""
    keys = {} if child else {"curve_secret_key": args.curve_secret_key, "curve_server_key": args.curve_server_key}
    given = getattr(args, "verifier", None)  # `run` has none (its child's); serve's is a list: the first of several
    given = given[0] if isinstance(given, list) else given
    link = LinkConfig(endpoint=CHILD_ENDPOINT if child else given or LinkConfig.endpoint, timeout_s=args.timeout, **keys)
    return ClientConfig(draft=args.model_draft, draft_config=draft_config(args), device=args.device_draft,
                        dtype=args.draft_dtype, engine=args.draft_engine, link=link)


def cors_origins(given: list[str] | None) -> tuple[str, ...]:
    """--cors-origin values: none given = any origin ('*'); 'none' = no CORS."""
    if not given:
        return ("*",)
    return () if given == ["none"] else tuple(given)


def draft_config(args) -> DraftConfig:
    return DraftConfig(draft_max=args.draft_max, draft_min=args.draft_min, p_min=args.draft_p_min,
                       adaptive=not args.no_cost_model,
                       tree_top_k=args.tree_top_k, tree_depth=args.tree_depth, tree_tokens=args.tree_tokens,
                       lookup_min=args.lookup_min, lookup_max=args.lookup_max)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dovetail", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Lossless speculative decoding: the target runs on the CPU, a small draft on the GPU "
                    "(or CPU); the two processes talk over ZeroMQ and only tokens and features cross the link.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_verifier_parser, _generate_parser, _run_parser, _serve_parser, _bench_parser, _train_head_parser,
                _keys_parser, _models_parser):  # one function per command
        add(sub)
    for command in sub.choices.values():  # `dovetail verifier ... -v` as well as `dovetail -v verifier ...`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def _verifier_parser(sub) -> None:
    p = sub.add_parser("verifier", help="serve a target model on this host's CPU",
                       description="Load the target on the CPU, pin it to a NUMA node's cores, and verify drafts for any number of sessions.")
    add_verifier_options(p, model_required=True)
    p.add_argument("--listen", default="tcp://127.0.0.1:5557",
                   help="endpoint to bind (default tcp://127.0.0.1:5557: this host only; tcp://0.0.0.0:PORT for other "
                        "hosts needs keys, or --insecure)")
    k = p.add_argument_group("keys (CURVE: authenticated, encrypted link; `dovetail keys generate`)")
    k.add_argument("--curve-secret-key", default=None, help="this verifier's secret key file (NAME.key_secret)")
    k.add_argument("--authorized-keys", default=None,
                   help="folder of the public key files (NAME.key) of the draft hosts served; any other key is refused")
    k.add_argument("--insecure", action="store_true",
                   help="listen beyond this host without keys (anyone who reaches the port drives the target)")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="draft here, verify on a running verifier",
                       description="Run the draft side against a running `dovetail verifier`; streams the text, then prints stats.")
    p.add_argument("--verifier", default="tcp://127.0.0.1:5557", help="verifier endpoint (default tcp://127.0.0.1:5557)")
    add_draft_options(p, model_required=True)
    add_key_options(p)


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="one host: start a verifier child and generate",
                       description="Start the verifier as a child process on this host, generate, and shut both down.")
    add_verifier_options(p, model_required=False)
    add_draft_options(p, model_required=False)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, streaming)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) plus /health "
                                   "and /metrics. Starts its verifier as a child process like `run` (or uses --verifier); "
                                   "the draft loads once and every request shares it.",
                       epilog="examples:\n  dovetail serve -md ngram --parallel 4\n"
                              "  dovetail serve --verifier tcp://HOST_A:5557 -md qwen2.5-coder-0.5b --host 0.0.0.0 --api-key KEY\n"
                              "  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                              "       -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"stream\": true}'")
    add_verifier_options(p, model_required=False)
    add_draft_options(p, model_required=False, generation=False)
    p.add_argument("--verifier", action="append", default=None, metavar="ENDPOINT",
                   help="a running verifier's endpoint; repeat for several (--parallel sessions on each; a request goes "
                        "to the one running the fewest, a session whose verifier dies resumes on another) (default: "
                        "start one as a child process)")
    add_key_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--parallel", type=int, default=4, help="requests generating at once per verifier, one verifier session each (default 4)")
    p.add_argument("--queue", type=int, default=64, help="requests waiting for a slot; past it 503 with Retry-After (default 64)")
    p.add_argument("--api-key", default=os.environ.get("DOVETAIL_API_KEY"),
                   help="require Authorization: Bearer KEY on the API routes (all but /, /health and /metrics; "
                        "default: $DOVETAIL_API_KEY, else none)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="a browser origin allowed to call the API (repeat for several; default '*': any origin, as "
                        "llama.cpp's server allows; 'none': no CORS headers). With --api-key a page still needs the key")
    p.add_argument("--alias", action="append", default=[], metavar="NAME",
                   help="another model name to list in /v1/models (repeatable); requests may name any model: the one "
                        "target answers them all, as llama.cpp's server does")
    p.add_argument("--timeout", type=float, default=LinkConfig.timeout_s,
                   help=f"seconds to wait for any verifier reply (default {LinkConfig.timeout_s:g})")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark against the target alone and HF assisted generation",
                       description="Side-by-side tokens/s, speedup, tau, acceptance, TTFT and identical-output rate "
                                   "on real prompt sets, all systems interleaved prompt by prompt in one run.")
    p.add_argument("-m", "--model", default=store.DEFAULT_TARGET, help=f"target (default {store.DEFAULT_TARGET})")
    p.add_argument("-md", "--model-draft", default=store.DEFAULT_DRAFT, help=f"draft (default {store.DEFAULT_DRAFT})")
    p.add_argument("--engine", default="auto",
                   help="engine(s) for the target and dovetail rows, comma separated: auto, llamacpp, torch; every engine "
                        "after the first adds its own rows, named ROW@ENGINE (default auto: llamacpp for the installed GGUF)")
    p.add_argument("--draft-engine", default="auto", choices=ENGINE_CHOICES,
                   help="engine of the small-LM draft of the dovetail rows (auto: llamacpp for a GGUF draft on the CPU)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="torch engine's target dtype, also for hf rows")
    p.add_argument("--draft-dtype", default="auto", choices=["auto", "int8", "float32", "bfloat16"],
                   help="torch draft precision (hf-assisted, torch drafts; auto on the CPU: int8 for a draft LM, bfloat16 "
                        "for a head); a llama.cpp draft runs its file's format")
    p.add_argument("--systems", default="target,hf,hf-assisted,dovetail,llamacpp,llamacpp-spec",
                   help="comma list from target, hf, hf-assisted, dovetail (the draft LM's chain and tree rows), ngram "
                        "(-md ngram), ngram+draft (-md ngram+DRAFT), llamacpp, llamacpp-spec, llamacpp-ngram (default: "
                        "target,hf,hf-assisted,dovetail,llamacpp,llamacpp-spec; llama.cpp rows need bash bench/build_llamacpp.sh)")
    p.add_argument("--llamacpp-ngram", default="ngram-mod",
                   help="llama.cpp --spec-type(s) of the llamacpp-ngram rows, comma separated, one row each: ngram-simple, "
                        "ngram-map-k, ngram-map-k4v, ngram-mod, ngram-cache (default ngram-mod)")
    p.add_argument("--lookup-max", type=int, default=DraftConfig.lookup_max,
                   help=f"longest context tail the ngram rows match (default {DraftConfig.lookup_max})")
    p.add_argument("--head", default=None, help="draft head folder(s), comma separated: extra dovetail rows")
    p.add_argument("--trees", default=None,
                   help="tree shapes TOPK:DEPTH:TOKENS,... for the tree rows of the draft LM and of every head, one row "
                        "each (a sweep; default 2:4:8 for the draft LM, 4:5:8 for heads)")
    p.add_argument("--draft-max", type=int, default=None,
                   help=f"cap on a dovetail chain's length (default {DRAFT_MAX}, up to {WIDEST} on a flat curve; the cost model "
                        "picks below it)")
    p.add_argument("--cost-model", default="on", choices=["on", "off", "both"],
                   help="dovetail rows sized by the cost model (on, default), fixed shapes (off: chains stop by draft "
                        "confidence, trees are sent whole; rows named ...-fixed; for sweeps of exact tree sizes), or both")
    p.add_argument("--dataset", default="humaneval",
                   help="humaneval, humaneval-edit (its solutions given back edited: where lookup drafts pay), "
                        "humaneval-review (a second chat turn rewrites the first turn's code), mtbench, sharegpt "
                        "(held-out slice), or a comma list")
    p.add_argument("--prompts", default=None, help="your own JSONL prompts: {\"prompt\": ..., \"chat\": bool, \"id\": ...} a line")
    p.add_argument("--limit", default="10", help="prompts per dataset, or one number per dataset: 20,20,5 (default 10; 0 = all)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default="bench/results", help="folder for the results JSON and PNG plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--verify-curve", action="store_true",
                   help="instead: time one target forward over q = 1..32 new tokens (chain and tree) for every --engine: "
                        "the torch engine per --curve-dtypes, llama.cpp per installed weight format of the target; "
                        "the draft side sizes its drafts from the saved curve")
    p.add_argument("--curve-dtypes", default="bfloat16", help="torch dtypes for --verify-curve (default bfloat16)")


def _train_head_parser(sub) -> None:
    p = sub.add_parser("train-head", help="train a Dovetail draft head on target features",
                       description="Extract the target's last-layer features over a corpus (teacher forcing, cached, "
                                   "resumable), then train a feature-level draft head (DGF or fc fusion).")
    p.add_argument("-m", "--model", default=store.DEFAULT_TARGET, help=f"target (default {store.DEFAULT_TARGET})")
    p.add_argument("--data", default="sharegpt",
                   help="corpora, comma-separated: sharegpt (its training slice), python (the standard library's "
                        "source: code text no bench prompt comes from), or FILE.jsonl ({\"text\"} or {\"messages\"} a line)")
    p.add_argument("--out", required=True, help="head folder to write (config.json + model.safetensors); resumes if present")
    p.add_argument("--layers", type=int, default=1, help="decoder layers in the head, 1..6 (default 1)")
    p.add_argument("--fusion", default="dgf", choices=["dgf", "fc"], help="Dynamic Gating Fusion, or EAGLE's fc (ablation)")
    p.add_argument("--max-tokens", default="200000",
                   help="tokens of target features to extract per corpus: one number, or one per --data corpus (default 200000)")
    p.add_argument("--max-len", type=int, default=1024, help="longest conversation in tokens (default 1024)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the extracted tokens (default 1)")
    p.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate (default 3e-5, the paper's)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then a cosine decay to 10%% of --lr (default 50)")
    p.add_argument("--eval-every", type=int, default=200, help="held-out evaluation and checkpoint every N steps (default 200)")
    p.add_argument("--draft-vocab", type=int, default=32768,
                   help="draft from the N most frequent corpus tokens only (default 32768; 0 = the whole vocabulary): "
                        "the lm_head is most of a head's step on a CPU; lossless either way")
    p.add_argument("--no-autocast", action="store_true", help="train in float32 instead of bfloat16 autocast")
    p.add_argument("--no-init-from-target", action="store_true", help="random layers instead of the target's last ones")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="training device (auto: cuda if present)")
    p.add_argument("--extract-dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="target dtype for extraction")


def _keys_parser(sub) -> None:
    p = sub.add_parser("keys", help="make a CURVE key pair for an authenticated, encrypted link between hosts",
                       description="Write NAME.key (public: give it to the other side) and NAME.key_secret (this host's "
                                   "only, readable by its owner alone) into DIR, with ZeroMQ's own key generator.")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = ksub.add_parser("generate", help="write a key pair")
    g.add_argument("dir", help="folder to write into (made if missing)")
    g.add_argument("--name", default=None, help="file name stem (default: this host's name)")


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="install or list the default real models")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    i = msub.add_parser("install", help="download, verify (sha256) and convert the default pair to safetensors")
    i.add_argument("names", nargs="*", help=f"models to install (default: {store.DEFAULT_TARGET} {store.DEFAULT_DRAFT})")
    i.add_argument("--format", default=None,
                   help=f"also write these weight formats of each model, comma separated ({', '.join(store.FORMATS)}), with "
                        "llama.cpp's quantizer; use them as NAME:FORMAT, e.g. -m qwen2.5-coder-1.5b:q4_0")
    i.add_argument("--no-curve", action="store_true",
                   help="do not measure the target's verification curve on this machine after installing it "
                        "(about a minute; the verifier loads it at start so the first drafts are sized from it)")
    i.add_argument("--recurve", action="store_true",
                   help="measure the curve again even if one is kept for this machine (e.g. it was measured while "
                        "other work shared the cores)")
    msub.add_parser("list", help="show the known models and whether they are installed")


# ---- commands ------------------------------------------------------------------------------------
def cmd_verifier(args) -> int:
    from . import placement, verifier_main

    config = verifier_config(args, LinkConfig(endpoint=args.listen, curve_secret_key=args.curve_secret_key,
                                              authorized_keys=args.authorized_keys, insecure=args.insecure))
    wanted = placement_config(args)
    cpus = placement.parse_cpulist(wanted.cpus) if wanted.cpus else None
    where = placement.choose(placement.read_numa_nodes(), set(os.sched_getaffinity(0)), wanted.numa_node, cpus,
                             wanted.threads)
    return verifier_main.run(config, where, args.ready_fd, args.exit_with_parent)


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        return Path(args.prompt_file).read_text()
    except OSError as exc:
        raise SystemExit(f"dovetail: cannot read the prompt file: {exc}")


def cmd_generate(args, endpoint: str | None = None, reconnect=None) -> int:
    from .client import Client
    from .detok import IncrementalDetokenizer
    from .sampling import SamplingParams

    client = Client.from_config(client_config(args, child=endpoint is not None), endpoint=endpoint, reconnect=reconnect)
    with client:
        ids = client.encode(read_prompt(args), chat=args.chat)
        stream = None if args.json else IncrementalDetokenizer(client.tokenizer)
        on_tokens = None if args.json else (lambda toks: print(stream.push(toks), end="", flush=True))
        out = client.generate(ids, args.n_predict, SamplingParams(args.temp, args.top_k, args.top_p), seed=args.seed,
                               on_tokens=on_tokens, stop_at_eos=not args.ignore_eos)
    text = client.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    st = out.stats
    if args.json:
        print(json.dumps({
            "text": text, "token_ids": out.token_ids, "n_prompt": st.n_prompt, "n_generated": st.n_generated,
            "n_drafted": st.n_drafted, "n_accepted": st.n_accepted, "tau": round(st.tau, 4),
            "seconds": round(st.seconds, 4), "tok_per_s": round(st.tok_per_s, 3),
            "timings": {"draft_s": round(st.timings.draft_s, 4), "verify_s": round(st.timings.verify_s, 4),
                        "link_s": round(st.timings.link_s, 4), "prefill_s": round(st.timings.prefill_s, 4)},
            "by_kind": {kind: {"steps": k.steps, "drafted": k.drafted, "accepted": k.accepted,
                               "draft_us_per_step": round(k.draft_us_per_step, 1)} for kind, k in st.by_kind.items()},
        }))
    else:
        print(stream.flush(), flush=True)
        print(stats_block(st, client.target), file=sys.stderr)
    return 0


def stats_block(st, target) -> str:
    steps = max(st.n_steps, 1)
    t = st.timings
    return "\n".join([
        "",
        f"target: {target.model} ({target.engine} engine, {target.dtype})",
        f"n_prompt  = {st.n_prompt}   prefill = {t.prefill_s:.3f} s (time to first token)",
        f"n_predict = {st.n_generated}   in {st.seconds:.3f} s   {st.tok_per_s:.2f} tok/s",
        f"n_drafted = {st.n_drafted}",
        f"n_accept  = {st.n_accepted}",
        f"accept    = {100 * st.accept_rate:.2f}%",
        f"tau       = {st.tau:.3f}   (mean accepted length: tokens per target forward, bonus included)",
        f"per step  = draft {1000 * t.draft_s / steps:.1f} ms | verify {1000 * t.verify_s / steps:.1f} ms | "
        f"link {1000 * t.link_s / steps:.1f} ms   ({st.n_steps} steps)",
        *(f"  {kind:<6}  {k.steps} steps: drafted {k.drafted}, accepted {k.accepted}"
          f"{f' ({100 * k.accepted / k.drafted:.1f}%)' if k.drafted else ''}, draft {k.draft_us_per_step:.0f} us/step"
          for kind, k in sorted(st.by_kind.items())),
    ])


def cmd_run(args) -> int:
    """One host: the verifier as a child process, the draft side here."""
    from .launcher import VerifierChild

    store.resolve(args.model, dovetail_home())  # a clear error before anything starts
    from .draft_kinds import model_part

    if model_part(args.model_draft):
        store.resolve(model_part(args.model_draft), dovetail_home())
    config = verifier_config(args, LinkConfig(endpoint=CHILD_ENDPOINT))
    with VerifierChild(config, placement_config(args)) as child:
        deaths: list[int] = []  # the exit codes of the children that died

        def reconnect() -> str:  # a lost session: the same child if it lives, else a new one, once
            from .transport import LinkError

            if not child.exited():
                return child.endpoint
            report = child.death_report()
            if deaths:
                same = " the same way" if deaths[0] == child.proc.returncode else ""
                raise LinkError(f"the verifier died{same} again after its restart: not restarting it a third time; "
                                f"{report}")
            deaths.append(child.proc.returncode)
            print(f"dovetail: {report}\ndovetail: restarting the verifier once and resuming (if it dies the same way "
                  "again, the cause is in its engine, not a passing fault)", file=sys.stderr, flush=True)
            try:
                return child.restart()
            except RuntimeError as exc:
                raise LinkError(str(exc)) from exc

        return cmd_generate(args, child.endpoint, reconnect)


def cmd_serve(args) -> int:
    from . import server
    from .draft_kinds import model_part

    home = dovetail_home()
    if not args.verifier:
        store.resolve(args.model, home)  # a clear error before anything starts
    if args.model_draft and model_part(args.model_draft):
        store.resolve(model_part(args.model_draft), home)
    return server.run(serve_config(args))


def cmd_bench(args) -> int:
    from .bench import harness, report

    if args.verify_curve:
        return cmd_verify_curve(args)
    results = harness.run(bench_config(args), dovetail_home())
    stem = time.strftime("bench-%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    path = report.write(results, out_dir, stem)
    if not args.no_plots:
        try:
            results["plots"] = report.plots(results, out_dir, stem) + report.sweep_plots(results, out_dir, stem)
            report.write(results, out_dir, stem)
        except ImportError as exc:  # the measurements are saved already; plots are a convenience
            print(f"dovetail bench: no plots ({exc}); `bash launch/setup.sh --dev` installs matplotlib", file=sys.stderr)
    m = results["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
          f"-n {results['n_new_tokens']}, temp {results['temperature']}")
    for engine, what in results["engines"].items():
        print(f"engine {engine}: {what.get('format')} weights, {what.get('file')}")
    print(f"draft: {results['draft']} ({results['draft_engine']})")
    for name, d in results["datasets"].items():
        print(report.table(name, d["summary"]))
    print(f"results: {path}")
    print(json.dumps({"results_file": str(path), "datasets": {k: v["summary"] for k, v in results["datasets"].items()}}))
    return 0


def bench_config(args) -> BenchConfig:
    """`dovetail bench`'s options as the harness's config (the plots, --out and --verify-curve stay here)."""
    from dataclasses import fields

    return BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig) if f.name != "command_line"},
                       command_line="dovetail " + " ".join(sys.argv[1:]))


def cmd_verify_curve(args) -> int:
    from . import placement
    from .bench import curve

    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    threads = placement.choose(placement.read_numa_nodes(), set(os.sched_getaffinity(0))).threads  # the verifier's default
    return curve.main(args.model, dovetail_home(), ["llamacpp", "torch"] if engines == ["auto"] else engines,
                      [d.strip() for d in args.curve_dtypes.split(",")], Path(args.out), not args.no_plots,
                      "dovetail " + " ".join(sys.argv[1:]), threads)


def cmd_train_head(args) -> int:
    from . import train_head

    job = train_head.HeadJob(
        model=args.model, data=[s.strip() for s in args.data.split(",") if s.strip()], out=Path(args.out),
        layers=args.layers, fusion=args.fusion, max_tokens=[int(float(t)) for t in str(args.max_tokens).split(",")],
        max_len=args.max_len, draft_vocab=args.draft_vocab, init_from_target=not args.no_init_from_target,
        device=args.device, extract_dtype=args.extract_dtype, command="dovetail " + " ".join(sys.argv[1:]),
        train=train_head.TrainConfig(epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup, eval_every=args.eval_every,
                                     ckpt_every=args.eval_every, autocast=not args.no_autocast))
    print(json.dumps(train_head.run(job, dovetail_home())))
    return 0


def cmd_keys(args) -> int:
    import socket

    import zmq.auth

    folder = Path(args.dir).expanduser()
    name = args.name or socket.gethostname()
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ValueError(f"{public} or {secret} exists already: pick another --name or folder (keys are never overwritten)")
    folder.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret file is born private
    try:
        zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old)
    secret.chmod(0o600)
    public.chmod(0o644)
    print(f"public key: {public}   (give it to the other side: a draft host's goes into the verifier's "
          f"--authorized-keys folder, the verifier's is the draft hosts' --curve-server-key)")
    print(f"secret key: {secret}   (stays on this host, mode 600)")
    return 0


def cmd_models(args) -> int:
    home = dovetail_home()
    if args.models_command == "list":
        for name, rel in store.RELEASES.items():
            state = "installed" if store.is_installed(home, name) else "not installed"
            print(f"{name:24s} {rel.role:7s} {state:14s} {store.model_dir(home, name)}")
            for spec in store.installed_formats(name, home)[1:]:
                print(f"{spec:24s} {rel.role:7s} {'installed':14s} {store.gguf_file(spec, home)}")
        return 0
    formats = [f.strip() for f in (args.format or "").split(",") if f.strip()]
    for path in store.install(home, args.names or None):
        print(f"ready: {path}")
    if formats:
        from .lm_llamacpp import write_format

        for name in args.names or [store.DEFAULT_TARGET, store.DEFAULT_DRAFT]:
            for fmt in formats:
                t0 = time.perf_counter()
                print(f"{name}:{fmt}: requantizing with llama.cpp's quantizer ...", file=sys.stderr, flush=True)
                path, written = write_format(home, name, fmt)
                print(f"ready: {path} ({path.stat().st_size / 2**30:.2f} GiB"
                      + (f", written in {time.perf_counter() - t0:.1f} s)" if written else ", there already)"))
    targets = [n for n in (args.names or store.RELEASES) if store.RELEASES.get(n) and store.RELEASES[n].role == "target"]
    if targets and not args.no_curve:
        measure_curve(targets[0], home, again=args.recurve)
    return 0


def measure_curve(spec: str, home: Path, again: bool = False) -> None:
    """The installed target's verification curve on this machine, kept for its verifier (unless one is
    kept already for this machine, model and engine)."""
    from . import placement
    from .bench import curve
    from .lm import choose_engine
    from .lm_llamacpp import weight_format
    from .verifier import load_verify_curve

    if choose_engine("auto", spec, home) != "llamacpp":
        return  # the torch engine's curve depends on --dtype: `dovetail bench --verify-curve` measures it
    threads = placement.choose(placement.read_numa_nodes(), set(os.sched_getaffinity(0))).threads  # the verifier's default
    if not again and load_verify_curve(home, spec, f"llamacpp-{weight_format(store.gguf_file(spec, home))}",
                                       threads)[0] is not None:
        print(f"verification curve: kept for this machine ({home / 'verify_curve.json'}; --recurve measures it again)")
        return
    print(f"measuring {spec}'s verification curve on this machine (about a minute, once; --no-curve skips it) ...",
          flush=True)
    result = curve.measure_installed(spec, home, threads)
    print(curve.table({**result, "curves": result["curves"]}))
    for key, shapes in result["curves"].items():
        jump = curve.disorder(shapes["chain"])
        if jump:
            print(f"verification curve: WARNING: {jump}: was other work sharing the cores? Measure it again on a quiet "
                  "machine: dovetail models install --recurve", flush=True)
    print(f"verification curve: kept in {home / 'verify_curve.json'} (the verifier loads it at start)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    commands = {"verifier": cmd_verifier, "generate": cmd_generate, "run": cmd_run, "serve": cmd_serve, "keys": cmd_keys, "models": cmd_models,
                "bench": cmd_bench, "train-head": cmd_train_head}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("\ndovetail: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as exc:  # a missing model, data package or file; a bad option
        print(f"dovetail: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # LinkError, VerifierError and friends
        print(f"dovetail: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
