"""The verifier's command-line options, in one place: the argparse group that `verifier`, `run` and
`serve` share, the function that turns them into configs, and its inverse, the argv that rebuilds
those configs in a child process (``launcher.VerifierChild``). tests/test_cli.py sends every option
off its default through `run` and `serve` and reads it back from the child."""

from __future__ import annotations

import argparse
import logging

from . import store
from .config import ENGINE_CHOICES, LinkConfig, PlacementConfig, VerifierConfig, dovetail_home


def add_verifier_options(p: argparse.ArgumentParser, model_required: bool) -> None:
    g = p.add_argument_group("target (verifier, CPU)")
    g.add_argument("-m", "--model", required=model_required, default=None if model_required else store.DEFAULT_TARGET,
                   help="target: installed short name, model folder, .gguf file or HF id"
                   + ("" if model_required else f" (default {store.DEFAULT_TARGET})"))
    g.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: one per physical core of the node)")
    g.add_argument("--cpus", default=None, help="CPU list to pin to, e.g. 0-7,16-23 (default: the NUMA node's cores)")
    g.add_argument("--numa-node", type=int, default=None, help="NUMA node to run on (default: the one with most free cores)")
    g.add_argument("--engine", default="auto", choices=ENGINE_CHOICES,
                   help="what runs the target: llamacpp (llama.cpp's CPU kernels on the GGUF file as it is) or torch "
                        "(transformers); auto = llamacpp for a .gguf target or an installed default, torch for folders "
                        "and hub ids")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="torch engine's target dtype; auto = bfloat16 where the CPU has AVX-512 BF16 or AMX, else "
                        "float32 (the llama.cpp engine runs the file's own weight format)")
    g.add_argument("-c", "--ctx-size", type=int, default=VerifierConfig.n_ctx,
                   help=f"the most tokens one session holds, prompt + output (default {VerifierConfig.n_ctx}; "
                        "a longer prompt is refused at once)")
    g.add_argument("--max-sessions", type=int, default=None,
                   help="draft sessions served at once; past it a new one is refused as busy, with when to retry "
                        f"(default {VerifierConfig.max_sessions}; serve: --parallel + 1)")
    g.add_argument("--max-sessions-per-peer", type=int, default=VerifierConfig.max_sessions_per_peer,
                   help="sessions one peer may hold: one connection, or with keys one authorized draft host however "
                        f"many connections it opens (default {VerifierConfig.max_sessions_per_peer}; a `serve --verifier` "
                        "host needs its --parallel)")
    g.add_argument("--idle-timeout", type=float, default=VerifierConfig.idle_timeout_s, metavar="SECONDS",
                   help="a session unused this long is closed and its KV memory freed; its client reopens one "
                        f"(default {VerifierConfig.idle_timeout_s:.0f})")
    g.add_argument("--prefill-chunk", type=int, default=VerifierConfig.prefill_chunk, metavar="TOKENS",
                   help="prompt tokens per verifier pass, run in the same forward as other sessions' steps: a long "
                        f"prompt stalls them at most one such pass (default {VerifierConfig.prefill_chunk})")
    g.add_argument("--max-draft-tokens", type=int, default=VerifierConfig.max_draft_tokens, metavar="TOKENS",
                   help=f"most draft tokens one VERIFY may carry (default {VerifierConfig.max_draft_tokens})")
    g.add_argument("--flash-attn", default="off", choices=["on", "off"],
                   help="llamacpp engine: llama.cpp's flash attention. Off (default), every step scans the cells of "
                        "every session in the shared KV pool: with 5 others holding 500 tokens each, a one-token step "
                        "of the 1.5B took 1.25-1.35x as long as alone (Zen 5). On, a step reads only its own cells "
                        "(no slowdown there), but sums in float16: logits move by up to ~0.008 and output is no "
                        "longer exactly the one-token decode's on float32 files. For `serve` with many sessions")
    g.add_argument("--prefix-cache", type=int, default=None, metavar="TOKENS",
                   help="KV tokens that finished sessions leave behind for prompts that start with them (a chat's next "
                        "turn prefills only its new part); least recently used out first, and out when a step needs "
                        "the room or after --idle-timeout (default: --ctx-size; 0 = off). On llamacpp with "
                        "--flash-attn off, cells kept here slow every step a little, as other sessions' cells do")
    g.add_argument("--kv-budget", type=int, default=0, metavar="TOKENS",
                   help="llamacpp engine: KV cache tokens all sessions share, allocated at start (default: --ctx-size x "
                        "--max-sessions, at most a quarter of the free memory); past it a step is refused with kv_full")


def verifier_config(args, link: LinkConfig, max_sessions: int = VerifierConfig.max_sessions) -> VerifierConfig:
    """The target options of `verifier`, `run` and `serve` as one config; ``max_sessions`` when the
    user gave none."""
    return VerifierConfig(model=args.model, home=dovetail_home(), engine=args.engine, dtype=args.dtype,
                          n_ctx=args.ctx_size, max_sessions=max_sessions if args.max_sessions is None else args.max_sessions,
                          max_sessions_per_peer=args.max_sessions_per_peer, idle_timeout_s=args.idle_timeout,
                          prefill_chunk=args.prefill_chunk, kv_budget=args.kv_budget,
                          max_draft_tokens=args.max_draft_tokens, flash_attn=args.flash_attn == "on",
                          prefix_cache=args.prefix_cache, link=link)


def placement_config(args) -> PlacementConfig:
    return PlacementConfig(threads=args.threads, cpus=args.cpus, numa_node=args.numa_node)


def verifier_argv(config: VerifierConfig, where: PlacementConfig, verbose: bool = False) -> list[str]:
    """The `dovetail verifier` options that rebuild ``config`` and ``where`` in a child process: the
    inverse of ``verifier_config`` (tests/test_cli.py sends every option through `run` and `serve` and
    reads it back from the child). ``config.home`` travels as $DOVETAIL_HOME (``launcher``)."""
    link = config.link
    if (link.timeout_s, link.max_message_bytes) != (LinkConfig.timeout_s, LinkConfig.max_message_bytes):
        raise ValueError("a verifier child takes the link's default timeout and message size (no options for them)")
    argv = ["-m", config.model, "--engine", config.engine, "--dtype", config.dtype, "-c", str(config.n_ctx),
            "--max-sessions", str(config.max_sessions), "--max-sessions-per-peer", str(config.max_sessions_per_peer),
            "--idle-timeout", repr(config.idle_timeout_s), "--prefill-chunk", str(config.prefill_chunk),
            "--kv-budget", str(config.kv_budget), "--max-draft-tokens", str(config.max_draft_tokens),
            "--flash-attn", "on" if config.flash_attn else "off",
            "--listen", link.endpoint]
    for flag, value in (("--curve-secret-key", link.curve_secret_key), ("--authorized-keys", link.authorized_keys),
                        ("--prefix-cache", config.prefix_cache),
                        ("-t", where.threads), ("--cpus", where.cpus), ("--numa-node", where.numa_node)):
        if value is not None:
            argv += [flag, str(value)]
    if link.insecure:
        argv.append("--insecure")
    if verbose or logging.getLogger().isEnabledFor(logging.DEBUG):  # `-v` here: the child's log too
        argv.append("-v")
    return argv
