"""The llama.cpp kernel probe (``kernels.py``): it passes on this CPU, a probe that crashes makes the
engine open on the next configuration with the same greedy output, and the verdict is kept.
Also what a dead verifier says, and the measured curve a verifier loads at start."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from dovetail_rt import kernels, lm  # noqa: E402
from dovetail_rt.client import Client  # noqa: E402
from dovetail_rt.config import DraftConfig  # noqa: E402

from conftest import VerifierProcess, engine_greedy, noisy_copy, tiny_target, tiny_tokenizer  # noqa: E402

CHAIN = DraftConfig(draft_max=3, p_min=0.0, adaptive=False)
PROMPT = [5, 7, 9, 11]


def wait_for(log: Path, text: str, timeout_s: float = 10.0) -> str:
    """The child's log once ``text`` is in it (the launcher relays it a moment after the child writes)."""
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return log.read_text()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    from tiny_gguf import write_gguf

    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    return write_gguf(tiny_target(0, sharpen=30), vocab, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def fresh_verdicts(tmp_path, monkeypatch):
    """An empty verdict folder and no verdict remembered in this process."""
    monkeypatch.setenv("DOVETAIL_KERNELS", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernels, "_memo", {})
    return tmp_path / "kernels"


@pytest.mark.timeout(300)
def test_the_probe_passes_on_this_cpu_and_its_verdict_is_kept(fresh_verdicts):
    found = kernels.verdict()
    assert found.probed and found.config.name == "repacked" and not found.failed, found.failed
    kept = json.loads((fresh_verdicts / f"{found.key}.json").read_text())
    assert kept["config"] == "repacked" and kept["build"].startswith("llama-cpp-python 0.3.36")
    kernels._memo.clear()  # a new process: the kept verdict is read, nothing runs
    again = kernels.verdict()
    assert not again.probed and again.config == found.config


@pytest.mark.timeout(300)
def test_a_probe_that_crashes_falls_back_to_plain_kernels_with_the_same_greedy_output(fresh_verdicts, monkeypatch,
                                                                                     gguf_path):
    fast = lm.open_lm(str(gguf_path), Path("."), "llamacpp", threads=2, n_ctx=256)  # before the fault: repacked
    want = engine_greedy(fast, PROMPT, 30)
    fast.close()
    monkeypatch.setattr(kernels, "_memo", {})
    monkeypatch.setenv("DOVETAIL_KERNELS", str(fresh_verdicts / "faulted"))  # not the verdict just kept
    monkeypatch.setenv(kernels.FAULT_ENV, "repacked")  # the repacked probe kills itself with SIGSEGV
    found = kernels.verdict()
    assert found.config.name == "plain"
    assert "SIGSEGV" in found.failed["repacked"] and "-token decode" in found.failed["repacked"]
    opened = lm.open_lm(str(gguf_path), Path("."), "llamacpp", threads=2, n_ctx=256)
    try:
        assert opened.info.kernels.startswith("plain") and "SIGSEGV" in opened.info.kernels
        assert engine_greedy(opened, PROMPT, 30) == want
    finally:
        opened.close()


@pytest.mark.timeout(300)
def test_a_verifier_on_the_fallback_says_so_and_its_speculative_output_is_the_targets(tmp_path, gguf_path):
    """End to end: the verifier child probes (the repacked probe crashes), says what it runs instead
    and why at start-up, and a speculative generation through it equals the target's greedy decode."""
    log = tmp_path / "verifier.log"
    env_fault = {kernels.FAULT_ENV: "repacked", "DOVETAIL_KERNELS": str(tmp_path / "kernels")}
    old = {k: os.environ.get(k) for k in env_fault}
    os.environ.update(env_fault)
    try:
        proc = VerifierProcess(gguf_path, "--engine", "llamacpp", "-c", "256", log_file=log)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    try:
        start = wait_for(log, "listening")
        assert "kernels:   plain" in start and "killed by SIGSEGV" in start, start
        reference = lm.open_lm(str(gguf_path), Path("."), "llamacpp", threads=1, n_ctx=256)
        want = engine_greedy(reference, PROMPT, 40)
        reference.close()
        with Client(verifier=proc.endpoint, draft=noisy_copy(tiny_target(0, sharpen=30), 0.3), draft_config=CHAIN,
                    tokenizer=tiny_tokenizer(), timeout_s=30) as client:
            out = client.generate(PROMPT, 40)
        assert out.token_ids == want and out.stats.n_drafted > 0
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_a_verifier_that_dies_says_of_what_with_its_last_lines_and_what_to_try(tiny_dir, tmp_path):
    proc = VerifierProcess(tiny_dir, log_file=tmp_path / "v.log")
    try:
        os.kill(proc.proc.pid, signal.SIGSEGV)
        proc.proc.wait(timeout=30)
        report = proc.death_report()
        assert "died of SIGSEGV (signal 11)" in report and "--engine torch" in report
        assert "dovetail verifier:" in report or "listening:" in report  # its own last lines
        assert "Segmentation fault" in report  # faulthandler's words: where Python was when it died
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_the_verifier_loads_this_machines_measured_curve_and_ignores_another_machines(tiny_dir, tmp_path):
    from dovetail_rt.bench.curve import save_for_drafts
    from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig, PlacementConfig, VerifierConfig
    from dovetail_rt.launcher import VerifierChild

    from conftest import ROOT

    home = tmp_path / "home"
    curve = {"chain": {"1": 0.010, "2": 0.011, "4": 0.012, "8": 0.014}}
    save_for_drafts({"model": str(tiny_dir), "curves": {"float32": curve}, "files": {}}, home)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the child's $DOVETAIL_HOME is the config's home
    for machine, want in (("this", "curve:     measured here"), ("other", "curve:     none for this machine")):
        if machine == "other":
            saved = json.loads((home / "verify_curve.json").read_text())
            (home / "verify_curve.json").write_text(json.dumps({**saved, "machine_id": "0" * 16}))
        log = tmp_path / f"{machine}.log"
        config = VerifierConfig(model=str(tiny_dir), home=home, dtype="float32", link=LinkConfig(endpoint=CHILD_ENDPOINT))
        with VerifierChild(config, PlacementConfig(threads=1), env=env, log_file=log):
            start = wait_for(log, "listening")
        assert want in start, start
        if machine == "this":
            assert "T_V(1) 10.0 ms" in start and "T_V(8)/T_V(1) 1.40" in start
