"""`dovetail verifier`'s process: pin the CPUs, open the target on its engine, serve until stopped."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from . import placement
from .config import VerifierConfig


def run(config: VerifierConfig, where: placement.Placement, ready_fd: int | None = None,
        exit_with_parent: bool = False) -> int:
    import faulthandler

    faulthandler.enable()  # a crash in native code prints where Python was (the launcher shows the last lines)
    placement.apply(where)  # before torch or llama.cpp load: OpenMP reads its environment then
    if exit_with_parent:
        die_with_parent()

    import torch

    from . import lm, store
    from .grammar import Grammars
    from .verifier import Verifier, curve_key, kv_report, load_verify_curve, memory_report, open_socket

    torch.set_num_threads(where.threads)
    t0 = time.perf_counter()
    target = lm.open_lm(config.model, config.home, config.engine, dtype=config.dtype, threads=where.threads,
                        n_ctx=config.n_ctx, max_tree=config.max_draft_tokens + 1, numa=where.multi_node,
                        sessions=config.max_sessions, kv_cells=config.kv_budget or None,
                        flash_attn=config.flash_attn)
    info = target.info
    if info.engine != "torch":  # torch only samples here: keep its thread pool from spinning against llama.cpp's
        torch.set_num_threads(1)
    curve, curve_line = load_verify_curve(config.home, config.model, curve_key(info), where.threads)
    grammars = Grammars(info.vocab, info.vocab_size, info.eos, lambda: store.load_tokenizer(config.model, config.home))
    verifier = Verifier(target, config, verify_curve=curve, grammars=grammars)
    sock, endpoint, auth = open_socket(config)
    link = config.link
    print(f"dovetail verifier: {config.model} loaded in {time.perf_counter() - t0:.1f} s\n"
          f"  engine:    {info.engine}, weights {info.weight_format}, {info.path}\n"
          + (f"  kernels:   {info.kernels}\n" if info.kernels else "")
          + f"  placement: {where.describe()} ({where.threads} threads)\n"
          f"  memory:    {memory_report()}{kv_report(target)}; prefix cache "
          f"{f'{verifier.cache.max_tokens} tokens' if verifier.cache.max_tokens else 'off'}\n"
          f"  curve:     {curve_line}\n"
          f"  listening: {endpoint}"
          + (f" (CURVE: keys from {Path(link.authorized_keys)} only)" if link.curve else
             "" if link.loopback else " (INSECURE: no keys, anyone who reaches it drives the target)"),
          file=sys.stderr, flush=True)
    if ready_fd is not None:
        with os.fdopen(ready_fd, "w") as ready:  # the launcher reads the endpoint, then what runs there
            ready.write(endpoint + "\n" + json.dumps({"engine": info.engine, "format": info.weight_format,
                                                     "file": info.path, "config": config.as_dict(),
                                                     "placement": {"threads": where.threads, "cpus": list(where.cpus),
                                                                   "node": where.node}}) + "\n")
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    parent = os.getppid()
    verifier.serve(sock, should_stop=lambda: bool(stopping) or (exit_with_parent and os.getppid() != parent))
    sock.close(0)
    if auth is not None:
        auth.stop()
    print("dovetail verifier: stopped", file=sys.stderr)
    return 0


def die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when the parent dies (no orphan verifier)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
