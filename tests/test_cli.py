"""The `dovetail` command line on tiny models: run, json, stats, Ctrl-C, clear errors."""

import json
import re
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, noisy_copy, save_model, tiny_tokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    draft_dir = save_model(noisy_copy(target, 0.3), tiny_tokenizer(), tmp_path_factory.mktemp("tiny_draft"))
    return tiny_dir, draft_dir


def dovetail(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), DOVETAIL_HOME=str(kw.pop("home", ROOT / ".nonexistent-home")))
    return subprocess.run([sys.executable, "-m", "dovetail_rt.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


@pytest.mark.timeout(180)
def test_run_json_equals_streamed_run(pair):
    target, draft = pair
    common = ["run", "-m", str(target), "-md", str(draft), "--dtype", "float32", "-t", "1",
              "--prompt", "w5 w7 w9", "-n", "24", "--draft-p-min", "0", "--no-cost-model"]  # timing-free drafts
    res = dovetail(*common, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n_generated"] == len(out["token_ids"]) == 24
    assert set(out) >= {"text", "token_ids", "n_prompt", "n_generated", "n_drafted", "n_accepted", "tau",
                        "seconds", "tok_per_s", "timings"}
    assert out["n_prompt"] == 3 and set(out["timings"]) >= {"draft_s", "verify_s", "link_s"}
    res = dovetail(*common)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == out["text"].strip()
    # the stats block says what --json says (the same greedy run, drafts sized without timings)
    block = dict(re.findall(r"^(n_drafted|n_accept|n_predict|tau)\s*=\s*([\d.]+)", res.stderr, re.M))
    assert int(block["n_drafted"]) == out["n_drafted"] > 0 and int(block["n_accept"]) == out["n_accepted"]
    assert int(block["n_predict"]) == 24 and float(block["tau"]) == pytest.approx(out["tau"], abs=1e-3)
    assert re.search(r"per step  = draft [\d.]+ ms \| verify [\d.]+ ms \| link [\d.]+ ms", res.stderr)


@pytest.mark.timeout(180)
def test_run_with_lookup_drafts_reports_them_per_kind(pair):
    """-md ngram: no draft model; the target's tokenizer from the verifier's files; drafts split per kind."""
    target, _ = pair
    prompt = " ".join(f"w{i}" for i in (5, 6, 7, 8, 9) * 4)  # repeats itself: the lookup drafts
    common = ["run", "-m", str(target), "-md", "ngram", "--dtype", "float32", "-t", "1", "--prompt", prompt,
              "-n", "24", "--no-cost-model"]
    res = dovetail(*common, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n_generated"] == 24 and out["by_kind"]["ngram"]["drafted"] == out["n_drafted"] > 0
    assert out["by_kind"]["ngram"]["accepted"] == out["n_accepted"]
    res = dovetail(*common)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == out["text"].strip()
    assert re.search(r"^  ngram\s+\d+ steps: drafted \d+, accepted \d+.*draft \d+ us/step", res.stderr, re.M)


@pytest.mark.timeout(120)
def test_ctrl_c_stops_both_processes(pair):
    target, draft = pair
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # A shell's `cmd &` starts its jobs with SIGINT ignored, and Python then leaves it ignored: give
    # the child the default disposition so the test does not depend on how pytest was started.
    proc = subprocess.Popen([sys.executable, "-m", "dovetail_rt.cli", "run", "-m", str(target), "-md", str(draft),
                             "--dtype", "float32", "-t", "1", "--prompt", "w1", "-n", "100000", "--ignore-eos"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdout.read(20)  # generation is streaming
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the verifier child should be running"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)  # drain both pipes: a full pipe would block the exit, not the code
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    _, still = psutil.wait_procs(children, timeout=15)
    assert not still, "orphan verifier left behind"


@pytest.mark.timeout(120)
def test_verifier_death_during_run_restarts_it_once_and_finishes(pair):
    """`dovetail run` restarts a verifier child that died mid-generation, once, says so, and the
    generation resumes from what was committed and finishes; no verifier is left behind."""
    target, draft = pair
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "dovetail_rt.cli", "run", "-m", str(target), "-md", str(draft),
                             "--dtype", "float32", "-t", "1", "--prompt", "w1", "-n", "100000", "--ignore-eos",
                             "--timeout", "20"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.read(20)  # generation is streaming
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-2000:]
    assert "died of SIGKILL" in err and "restarting the verifier once" in err  # how it died, and what happens
    assert re.search(r"n_predict = 511\b", err), err[-1000:]  # the whole context (512 tokens), resumed
    _, still = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=0)
    assert not [p for p in still if "verifier" in " ".join(p.cmdline())], "orphan verifier left behind"


def test_missing_default_models_say_how_to_install(tmp_path):
    res = dovetail("run", "--prompt", "hi", home=tmp_path)
    assert res.returncode == 2
    assert "dovetail models install" in res.stderr


def test_help_teaches():
    res = dovetail("--help")
    assert res.returncode == 0 and "examples:" in res.stdout and "dovetail run" in res.stdout
    res = dovetail("generate", "--help")
    assert "--draft-p-min" in res.stdout and "--verifier" in res.stdout


@pytest.mark.timeout(180)
def test_run_picks_the_llamacpp_engine_for_a_gguf_target(pair, tmp_path):
    """`--engine auto`: a .gguf target runs on llama.cpp (the start-up lines and the stats say so), a
    model folder on torch; both give the same greedy text for these float32 weights."""
    pytest.importorskip("llama_cpp")
    from tiny_gguf import write_gguf

    from conftest import tiny_target

    target_dir, draft = pair
    vocab = [t for t, _ in sorted(tiny_tokenizer().get_vocab().items(), key=lambda kv: kv[1])]
    gguf = write_gguf(tiny_target(0, sharpen=30), vocab, tmp_path / "tiny.gguf")
    common = ["-md", str(draft), "-t", "1", "--prompt", "w5 w7 w9", "-n", "16", "--no-cost-model"]
    on_llama = dovetail("run", "-m", str(gguf), "--ctx-size", "256", *common)
    assert on_llama.returncode == 0, on_llama.stderr[-2000:]
    assert re.search(r"engine:\s+llamacpp, weights F32", on_llama.stderr)
    assert "(llamacpp engine, F32)" in on_llama.stderr
    on_torch = dovetail("run", "-m", str(target_dir), "--dtype", "float32", *common)
    assert on_torch.returncode == 0 and "(torch engine, float32)" in on_torch.stderr
    assert on_llama.stdout == on_torch.stdout
