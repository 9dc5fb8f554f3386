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
    from dovetail_rt import kernels

    env = dict(os.environ, PYTHONPATH=str(ROOT), DOVETAIL_HOME=str(kw.pop("home", ROOT / ".nonexistent-home")),
               DOVETAIL_KERNELS=str(kernels.verdict_dir()))  # this machine's verdict, not one in the checkout
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
    assert _verifiers_of(target), "the search below must see the running verifier"
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-2000:]
    assert "died of SIGKILL" in err and "restarting the verifier once" in err  # how it died, and what happens
    assert re.search(r"n_predict = 511\b", err), err[-1000:]  # the whole context (512 tokens), resumed
    # a child left behind is reparented away from this process: look for it among all processes
    _, still = psutil.wait_procs(_verifiers_of(target), timeout=10)
    assert not still, "orphan verifier left behind"


def _verifiers_of(target) -> list[psutil.Process]:
    """Running verifier processes of the ``target`` file (whoever their parent is now)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if "verifier" in cmd and str(target) in cmd and p.pid != os.getpid():
            found.append(p)
    return found


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


# every `dovetail verifier` option set off its default (torch engine: the KV options still travel and are checked)
OFF_DEFAULT = ["--engine", "torch", "--dtype", "float32", "-c", "512", "--max-sessions", "7", "--max-sessions-per-peer", "3",
               "--idle-timeout", "123.5", "--prefill-chunk", "32", "--kv-budget", "1024", "--max-draft-tokens", "64",
               "--flash-attn", "on", "--prefix-cache", "300",
               "-t", "1", "--cpus", "0", "--numa-node", "0"]


def check_child_runs(config, child) -> None:
    """The child reports the config it parsed: every field must be the one the parent built."""
    assert child.target["config"] == config.as_dict()
    assert child.target["placement"] == {"threads": 1, "cpus": [0], "node": 0}


def test_every_verifier_option_round_trips_through_the_childs_argv():
    from dovetail_rt import cli, verifier_options
    from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig

    for command in ("run", "serve"):
        args = cli.build_parser().parse_args([command, "-m", "tiny", *OFF_DEFAULT, *(["-p", "x"] if command == "run" else [])])
        config = cli.verifier_config(args, LinkConfig(endpoint=CHILD_ENDPOINT)) if command == "run" else cli.serve_config(args).child
        argv = verifier_options.verifier_argv(config, cli.placement_config(args))
        back = cli.build_parser().parse_args(["verifier", *argv])
        assert cli.verifier_config(back, LinkConfig(endpoint=back.listen)) == config
        assert cli.placement_config(back) == cli.placement_config(args)
        defaults = cli.verifier_config(cli.build_parser().parse_args([command, "-m", "tiny", "-p", "x"] if command == "run"
                                                                     else [command, "-m", "tiny"]),
                                       LinkConfig(endpoint=CHILD_ENDPOINT), max_sessions=16)
        changed = {k for k, v in config.as_dict().items() if defaults.as_dict()[k] != v}
        assert changed >= {"engine", "dtype", "n_ctx", "max_sessions", "max_sessions_per_peer", "idle_timeout_s",
                           "prefill_chunk", "kv_budget", "max_draft_tokens", "flash_attn", "prefix_cache"}


@pytest.mark.timeout(180)
def test_run_and_serve_hand_every_verifier_option_to_the_child(tiny_dir, monkeypatch):
    """What `run` and `serve` build reaches the child whole (once, --kv-budget, --prefill-chunk,
    --idle-timeout and --max-sessions-per-peer were dropped on the way, and serve overwrote --max-sessions)."""
    from dovetail_rt import cli, server
    from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig
    from dovetail_rt.launcher import VerifierChild

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = cli.build_parser().parse_args(["run", "-m", str(tiny_dir), *OFF_DEFAULT, "-p", "x"])
    config = cli.verifier_config(args, LinkConfig(endpoint=CHILD_ENDPOINT))
    with VerifierChild(config, cli.placement_config(args)) as child:
        check_child_runs(config, child)
    args = cli.build_parser().parse_args(["serve", "-m", str(tiny_dir), *OFF_DEFAULT, "--parallel", "2", "-md", "ngram"])
    backend = server.Backend(cli.serve_config(args), server.Metrics())
    backend.start()
    try:
        check_child_runs(backend.config.child, backend.child.wait_ready())
    finally:
        backend.close()


DRAFT_OFF_DEFAULT = ["-md", "ngram", "--device-draft", "cpu", "--draft-engine", "torch", "--draft-dtype", "float32",
                     "--draft-max", "5", "--draft-min", "1", "--draft-p-min", "0.3", "--no-cost-model", "--tree-top-k", "2",
                     "--tree-depth", "3", "--tree-tokens", "7", "--lookup-min", "2", "--lookup-max", "6", "--timeout", "33"]


@pytest.mark.timeout(120)
def test_generate_run_and_serve_hand_every_draft_option_to_the_client(verifier):
    """One ClientConfig per command, every draft option in it, and a Client built from it carries them."""
    from dovetail_rt import cli
    from dovetail_rt.client import Client
    from dovetail_rt.config import CHILD_ENDPOINT, ClientConfig, DraftConfig

    endpoint = verifier.endpoint
    built = {"generate": cli.client_config(cli.build_parser().parse_args(
                 ["generate", "--verifier", endpoint, *DRAFT_OFF_DEFAULT, "-p", "x"])),
             "run": cli.client_config(cli.build_parser().parse_args(["run", *DRAFT_OFF_DEFAULT, "-p", "x"]), child=True),
             "serve": cli.serve_config(cli.build_parser().parse_args(["serve", *DRAFT_OFF_DEFAULT])).client,
             "serve --verifier": cli.serve_config(cli.build_parser().parse_args(
                 ["serve", "--verifier", endpoint, *DRAFT_OFF_DEFAULT])).client}
    want = ClientConfig(draft="ngram", device="cpu", engine="torch", dtype="float32",
                        draft_config=DraftConfig(draft_max=5, draft_min=1, p_min=0.3, adaptive=False, tree_top_k=2,
                                                 tree_depth=3, tree_tokens=7, lookup_min=2, lookup_max=6))
    for command, config in built.items():
        assert config.link.endpoint == (CHILD_ENDPOINT if command in ("run", "serve") else endpoint), command
        assert config.link.timeout_s == 33, command
        assert (config.draft, config.device, config.engine, config.dtype, config.draft_config) == \
               (want.draft, want.device, want.engine, want.dtype, want.draft_config), command
    with Client.from_config(built["generate"], tokenizer=None) as client:
        assert client.link == built["generate"].link
        assert client.drafter.kind == "ngram" and client.drafter_config == want.draft_config  # no caps left open to size


def test_serve_refuses_fewer_sessions_than_it_runs_requests():
    from dovetail_rt import cli

    args = cli.build_parser().parse_args(["serve", "-m", "tiny", "--parallel", "4", "--max-sessions", "4"])
    with pytest.raises(ValueError, match="below --parallel"):
        cli.serve_config(args)
    assert cli.serve_config(cli.build_parser().parse_args(["serve", "-m", "tiny", "--parallel", "4"])).child.max_sessions == 5


def test_serve_takes_several_verifiers_and_refuses_one_named_twice():
    from dovetail_rt import cli

    parse = lambda *a: cli.build_parser().parse_args(["serve", "-m", "tiny", *a])
    config = cli.serve_config(parse("--verifier", "tcp://10.0.0.1:5557", "--verifier", "tcp://10.0.0.2:5557"))
    assert config.verifiers == ("tcp://10.0.0.1:5557", "tcp://10.0.0.2:5557") and config.child is None
    assert config.client.link.endpoint == "tcp://10.0.0.1:5557"  # each Client gets its own at load
    with pytest.raises(ValueError, match="twice"):
        cli.serve_config(parse("--verifier", "tcp://10.0.0.1:5557", "--verifier", "tcp://10.0.0.1:5557"))
    assert cli.serve_config(parse()).verifiers == ()
