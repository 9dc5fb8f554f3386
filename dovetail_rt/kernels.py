"""Which of this llama.cpp build's CPU kernels work on the CPU at hand: probed once, the verdict kept.

A llama.cpp build picks its matmul kernels by CPU features and batch size: weights repacked into
interleaved tiles (AVX2 / AVX-512), AMX tiles where the build has them, plain kernels otherwise. Some
of those paths crash on some machines (ggml's AMX kernel dies with SIGSEGV on every decode of two or
more tokens on an Intel Xeon KVM guest, DESIGN.md §8), and a crash kills the verifier on its first
step. So before the llama.cpp engine serves, a probe in a **child process** writes a small random
Llama GGUF at shapes that engage the AMX and repacked kernels, requantizes it to every weight type we
expect to meet, and for each runs multi-token decodes (2, 5, 8 and 24 rows) under a configuration,
comparing every row's logits with one-token decodes on the plain path. The first configuration that
neither crashes nor disagrees is the one the engine opens models with; the verdict is kept per
llama-cpp-python build and CPU (a JSON file under ``$DOVETAIL_HOME/kernels``), so the probe runs once
per machine and build.

The probe imports only llama_cpp, numpy and gguf, so ``launch/setup.sh`` runs it on a fresh build
(``python -m dovetail_rt.kernels probe --build-check``) before anything else is installed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # bump when the probe changes what it checks: old verdicts are then probed again
FAULT_ENV = "DOVETAIL_KERNEL_PROBE_FAULT"  # tests: NAME makes the probe of configuration NAME die of SIGSEGV


@dataclass(frozen=True)
class KernelConfig:
    """One way to open a model: ``extra_bufts`` = llama.cpp's extra buffer types (repacked weights, AMX)."""

    name: str
    extra_bufts: bool
    what: str
    cost: str  # what it costs against the first configuration


CONFIGS = (
    KernelConfig("repacked", True, "the build's fastest kernels: repacked weight tiles (and AMX where built in)", ""),
    KernelConfig("plain", False, "plain kernels, weights as stored in the file (use_extra_bufts off)",
                 "no repacked tiles: every step costs more (Q4_K_M on a 2-core AMD EPYC: 15-25 % per step, "
                 "DESIGN.md §7)"),
)
BY_NAME = {c.name: c for c in CONFIGS}

# Weight formats the probe writes: those of the installed pair (Q4_K_M with Q6_K, the draft's Q5_0 and
# Q8_0), the formats `dovetail models install --format` writes, and every type ggml's AMX kernel takes.
FTYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "BF16", "F16")
BATCHES = (5, 1, 2, 8, 24)  # rows per decode, in order: 40 tokens
# max |batched - one-token| / max |one-token| logit, per weight type. Kernels that work differ by batch size
# up to 0.012 here (Q4_K_M, Q5_K_M, Q6_K; on the plain path too), 0.008 for repacked Q4_0; a broken one by ~1.
REL_TOL = 0.1


@dataclass(frozen=True)
class Verdict:
    config: KernelConfig
    failed: dict  # configuration name -> why it was not taken
    key: str
    probed: bool  # probed now (False: read from the kept verdict)

    def describe(self) -> str:
        """One start-up line: what runs, and if a faster configuration failed, what and what it costs."""
        if not self.failed:
            return f"{self.config.name} ({self.config.what}; probed on this CPU)"
        why = "; ".join(f"{name}: {reason}" for name, reason in self.failed.items())
        return (f"{self.config.name} ({self.config.what}) because {why}. Costs: {self.config.cost}. "
                f"A build without AMX keeps the repacked kernels: `bash launch/setup.sh` rebuilds per CPU")


# ---- identity: which CPU, which build ----------------------------------------------------------------
def build_identity() -> str:
    """llama-cpp-python's version and a digest of its shared libraries (a rebuild is another build)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise ModuleNotFoundError("llama_cpp is not installed: run `bash launch/setup.sh`")
    folder = Path(spec.origin).parent
    digest = hashlib.sha256()
    for lib in sorted(folder.rglob("*.so*")) + sorted(folder.rglob("*.dylib")):
        digest.update(lib.name.encode())
        digest.update(lib.read_bytes())
    from importlib.metadata import version

    return f"llama-cpp-python {version('llama_cpp_python')} {digest.hexdigest()[:16]}"


@functools.lru_cache(maxsize=1)
def verdict_key() -> str:
    """Which CPU and build a verdict is for: read once per process (hashing the libraries takes ~80 ms)."""
    from .placement import cpu_identity

    return hashlib.sha256(f"{PROBE_VERSION}\n{cpu_identity()}\n{build_identity()}".encode()).hexdigest()[:16]


def verdict_dir() -> Path:
    from .config import dovetail_home

    return Path(os.environ.get("DOVETAIL_KERNELS") or dovetail_home() / "kernels")


# ---- the verdict ---------------------------------------------------------------------------------------
_lock = threading.Lock()
_memo: dict[str, Verdict] = {}


def verdict(progress=None) -> Verdict:
    """The kernel configuration to open llama.cpp models with on this CPU and build: the kept verdict,
    or a probe of each configuration in order (a few seconds, once). ``progress(text)`` hears what runs."""
    key = verdict_key()
    with _lock:
        if key in _memo:
            return _memo[key]
        path = verdict_dir() / f"{key}.json"
        try:
            kept = json.loads(path.read_text())
            found = Verdict(BY_NAME[kept["config"]], dict(kept["failed"]), key, probed=False)
        except (OSError, ValueError, KeyError, TypeError):
            found = _probe_all(key, progress)
            _keep(path, found)
        _memo[key] = found
        return found


def _probe_all(key: str, progress) -> Verdict:
    failed = {}
    for config in CONFIGS:
        if progress:
            progress(f"probing llama.cpp's {config.name} kernels on this CPU (once per machine and build) ...")
        ok, why = probe(config)
        if ok:
            if failed:
                log.warning("llama.cpp kernels: %s failed on this CPU (%s); running %s instead (%s)",
                            ", ".join(failed), "; ".join(failed.values()), config.name, config.cost)
            return Verdict(config, failed, key, probed=True)
        failed[config.name] = why
    raise RuntimeError("no llama.cpp kernel configuration works on this CPU ("
                       + "; ".join(f"{n}: {w}" for n, w in failed.items())
                       + "): use --engine torch, or rebuild llama-cpp-python (`bash launch/setup.sh`)")


def _keep(path: Path, found: Verdict) -> None:
    """Write the verdict atomically; a read-only or full disk only means probing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes probing at once never share one
        from .placement import cpu_identity

        tmp.write_text(json.dumps({"config": found.config.name, "failed": found.failed, "cpu": cpu_identity(),
                                   "build": build_identity(), "probe_version": PROBE_VERSION,
                                   "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.warning("could not keep the kernel verdict in %s (%s): the probe runs again next time", path, exc)


def probe(config: KernelConfig, timeout_s: float = 300.0) -> tuple[bool, str]:
    """Run the probe of ``config`` in a child process: (passed, why not)."""
    with tempfile.TemporaryDirectory(prefix="dovetail-probe-") as folder:
        cmd = [sys.executable, "-m", "dovetail_rt.kernels", "child", config.name, folder]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parent.parent),
                                                                        os.environ.get("PYTHONPATH", "")] if p)}
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
                                  env=env)
        except subprocess.TimeoutExpired:
            return False, f"the probe did not finish in {timeout_s:.0f} s"
    lines = done.stdout.strip().splitlines()
    last = lines[-1] if lines else "before its first decode"
    if done.returncode == 0:
        return True, ""
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:  # one Python has no name for
            name = f"signal {-done.returncode}"
        return False, f"killed by {name} ({last.removeprefix('running ')})"
    tail = (done.stderr.strip().splitlines() or [""])[-1]
    return False, f"{last} (exit {done.returncode}{': ' + tail if tail and 'mismatch' not in last else ''})"


# ---- the child: a small model, every weight type, batched against one-token decodes ---------------------
def write_probe_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama in float32 at shapes every kernel takes (rows and columns multiples of 256:
    K-quant blocks, AMX's 32-wide tiles, repacking's groups of 8 rows)."""
    import numpy as np

    from .gguf_llama import LlamaShape, write

    rng = np.random.default_rng(seed)
    shape, vocab = LlamaShape(hidden=512, ffn=1536, layers=2, heads=8, kv_heads=4), 1024
    d, kv = shape.hidden, shape.kv_heads * shape.head_dim

    def w(rows, cols):  # [rows, cols], unit-variance outputs
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    tensors = {"token_embd": rng.standard_normal((vocab, d)).astype(np.float32), "output_norm": np.ones(d, np.float32),
               "output": w(vocab, d) * 4}  # logits with a spread, so rows can disagree visibly
    for i in range(shape.layers):
        tensors.update({f"blk.{i}.{name}": t for name, t in (
            ("attn_norm", np.ones(d, np.float32)), ("attn_q", w(d, d)), ("attn_k", w(kv, d)), ("attn_v", w(kv, d)),
            ("attn_output", w(d, d)), ("ffn_norm", np.ones(d, np.float32)), ("ffn_gate", w(shape.ffn, d)),
            ("ffn_up", w(shape.ffn, d)), ("ffn_down", w(d, shape.ffn)))})
    return write(path, shape, [f"t{i}" for i in range(vocab)], tensors)


class _Model:
    """The probe's own minimal llama.cpp use: one sequence, logits for every row."""

    def __init__(self, path: Path, extra_bufts: bool, threads: int):
        import llama_cpp as L

        self.L = L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers, mp.use_mmap, mp.use_extra_bufts = 0, True, extra_bufts
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the probe model {path.name}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 128, 64, 64, 1
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(64, 0, 1)
        self.pos = 0

    def decode(self, tokens: list[int]):
        import numpy as np

        L, b = self.L, self.batch
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, self.pos + i, 1, True
            b.seq_id[i][0] = 0
        b.n_tokens = len(tokens)
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError(f"llama_decode of {len(tokens)} tokens failed")
        self.pos += len(tokens)
        return np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                         for i in range(len(tokens))])  # [len(tokens), vocab]

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def _silence(level, text, user):  # llama.cpp's load chatter is not the probe's output
    return None


def _child(name: str, folder: Path) -> int:
    """Print one line per step (the parent reads the last one after a crash); exit 3 on a mismatch."""
    import numpy as np
    import llama_cpp as L

    global _quiet
    _quiet = L.llama_log_callback(_silence)  # kept: the C side holds the pointer
    config = BY_NAME[name]
    L.llama_log_set(_quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    threads = max(2, len(os.sched_getaffinity(0)))  # the crash seen was on an OpenMP worker thread
    base = write_probe_model(folder / "f32.gguf")
    tokens = [int(t) for t in np.random.default_rng(1).integers(1, 1024, sum(BATCHES))]
    for ftype in FTYPES:
        path = folder / f"{ftype}.gguf"
        params = L.llama_model_quantize_default_params()
        params.ftype = getattr(L, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = threads
        if L.llama_model_quantize(str(base).encode(), str(path).encode(), ctypes.byref(params)) != 0:
            print(f"could not write the {ftype} probe model", flush=True)
            return 4
        print(f"running {ftype}: one-token decodes on the plain path", flush=True)
        plain = _Model(path, extra_bufts=False, threads=threads)
        ref = np.concatenate([plain.decode([t]) for t in tokens])  # [40, vocab]
        plain.close()
        test, rows, start = _Model(path, config.extra_bufts, threads), [], 0
        for n in BATCHES:
            print(f"running {ftype}: a {n}-token decode with the {name} kernels", flush=True)
            if n > 1 and os.environ.get(FAULT_ENV) == name:
                os.kill(os.getpid(), signal.SIGSEGV)
            rows.append(test.decode(tokens[start:start + n]))
            start += n
        test.close()
        got = np.concatenate(rows)
        err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-6)) if np.isfinite(got).all() else float("inf")
        if not err <= REL_TOL:
            print(f"mismatch on {ftype}: multi-token decodes differ from one-token ones by {err:.3g} "
                  f"of the largest logit (at most {REL_TOL} expected)", flush=True)
            return 3
        print(f"ok {ftype}: {err:.2e}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dovetail_rt.kernels",
                                description="Probe which llama.cpp CPU kernels work on this machine.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe", help="probe now (or print the kept verdict) and say what the engine will run")
    pr.add_argument("--build-check", action="store_true",
                    help="probe only the build's fastest kernels, keep nothing; exit 1 if they fail (launch/setup.sh)")
    ch = sub.add_parser("child", help=argparse.SUPPRESS)
    ch.add_argument("config")
    ch.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.command == "child":
        return _child(args.config, args.folder)
    if args.build_check:
        ok, why = probe(CONFIGS[0])
        print(f"kernel probe ({CONFIGS[0].name}): {'passed' if ok else 'FAILED: ' + why}")
        return 0 if ok else 1
    found = verdict(progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(f"llama.cpp kernels: {found.describe()}")
    print(f"verdict kept in {verdict_dir() / (found.key + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
