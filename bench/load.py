"""Load bench of `dovetail serve`: N concurrent streaming clients (the official `openai` client) on the
bench's prompts, for each N: aggregate tokens/s, time to first token p50 / p99, tokens/s per stream,
and lost or failed requests. A human table, then one JSON line.

    python bench/load.py [--streams 1,2,4,8,16] [--requests-per-stream 2] [-n 64] [--dataset humaneval]
                         [-m TARGET] [-md DRAFT] [--parallel 16] [--url http://127.0.0.1:8080 (a running server)]
                         [--check-identity (the largest level again, each request alone: same outputs? where
                          not, the target's top-2 logit gap where they part)]
                         [--compare-run K (K prompts through the server and through `dovetail run`: overhead)]
                         [--verifiers N (N `dovetail verifier` processes, this host's cores split among them,
                          behind one server)] [--kill-one (then the largest level again, one verifier SIGKILLed
                          mid-run: what it costs)]

Without --url it starts `dovetail serve` on a free 127.0.0.1 port (its verifier as a child, or --verifiers N
of them as separate processes) and stops it after. Each level reports the most requests that ran at once on
each verifier (from /health, polled).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"dovetail serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("dovetail serve never became ready")


def one_stream(client, model: str, prompts: list[str], n: int, out: list) -> None:
    """Send ``prompts`` one after another, streaming; record (ttft, tokens, seconds, text) or the failure."""
    for text in prompts:
        t0 = time.perf_counter()
        first, tokens, parts = None, 0, []
        try:
            stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                    max_tokens=n, temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - t0
                    parts.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            out.append({"prompt": text, "ttft": first or 0.0, "tokens": tokens, "seconds": time.perf_counter() - t0,
                        "text": "".join(parts)})
        except Exception as exc:  # counted, not raised: a load bench reports failures
            out.append({"error": f"{type(exc).__name__}: {exc}"})


def health(url: str) -> dict:
    """/health's body ({} when it cannot be read; a 503's body says why the server is not ready)."""
    import http.client

    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read() or b"{}")
        except ValueError:
            return {}
    except (OSError, ValueError, http.client.HTTPException):
        return {}


def watch(url: str, stop: threading.Event, peaks: dict) -> None:
    """Poll /health until ``stop`` (and once more then): per verifier, the most requests that ran there at once."""
    while True:
        for v in health(url).get("verifiers", []):
            peaks[v["endpoint"]] = max(peaks.get(v["endpoint"], 0), v["running"])
        if stop.wait(0.1):
            return


def level(client, model: str, prompts: list[str], streams: int, per_stream: int, n: int, url: str = "",
          kill=None) -> dict:
    """``streams`` concurrent streams of ``per_stream`` requests each; ``kill`` (a callable) runs once the
    first request has finished (the others are decoding), and the verifiers' states are read after."""
    results: list = []
    work = [[prompts[(s * per_stream + i) % len(prompts)] for i in range(per_stream)] for s in range(streams)]
    threads = [threading.Thread(target=one_stream, args=(client, model, w, n, results)) for w in work]
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=watch, args=(url, stop, peaks), daemon=True) if url else None
    t0 = time.perf_counter()
    for t in threads + ([watcher] if watcher else []):
        t.start()
    killed_at = None
    if kill is not None:
        while not any(r.get("tokens") for r in results) and any(t.is_alive() for t in threads):
            time.sleep(0.1)  # some request has finished: the rest are decoding
        killed_at = time.perf_counter() - t0
        kill()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    if watcher:
        watcher.join()
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)
    return {"streams": streams, "requests": len(work) * per_stream, "ok": len(ok),
            "failed": len(results) - len(ok), "lost": len(work) * per_stream - len(results),
            "aggregate_tok_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
            "per_stream_tok_s_median": statistics.median([r["tokens"] / r["seconds"] for r in ok]) if ok else 0.0,
            "wall_s": wall, "errors": sorted({r["error"] for r in results if "error" in r})[:3], "outputs": ok,
            "peak_running_per_verifier": peaks, "killed_at_s": killed_at,
            "verifiers_after": {v["endpoint"]: v["state"] for v in health(url).get("verifiers", [])} if url else {}}


def start_verifiers(n: int, model: str | None, parallel: int, dtype: str | None = None) -> list:
    """``n`` `dovetail verifier` processes on loopback, this host's CPUs split among them (each its own
    share, pinned; with more verifiers than CPUs they share), ready."""
    from dovetail_rt import cli, store
    from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig
    from dovetail_rt.launcher import VerifierChild

    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // n)
    children = []
    for i in range(n):
        mine = [cpus[(i * per + k) % len(cpus)] for k in range(per)]
        args = cli.build_parser().parse_args(["verifier", "-m", model or store.DEFAULT_TARGET, "--listen", CHILD_ENDPOINT,
                                              "--cpus", ",".join(map(str, mine)), "-t", str(len(mine)),
                                              "--max-sessions", str(2 * parallel + 1), *(["--dtype", dtype] if dtype else [])])
        child = VerifierChild(cli.verifier_config(args, LinkConfig(endpoint=args.listen)), cli.placement_config(args),
                              wait=False)
        children.append(child)
    return [c.wait_ready() for c in children]


def compare_run(client, model_id: str, prompts: list[str], n: int, args) -> dict:
    """Server overhead: the same prompts one at a time through the server (one stream) and through
    `dovetail run` (its own verifier child, the Python API), interleaved; decode tokens/s of each (after
    the first token). The prompts are ones the levels did not send: a lookup draft's index of earlier
    outputs would otherwise copy the server's own earlier answers."""
    rows = []
    for text in prompts:
        out: list = []
        one_stream(client, model_id, [text], n, out)
        cmd = [sys.executable, "-m", "dovetail_rt.cli", "run", "-md", args.model_draft, "-n", str(n), "--chat",
               "--temp", "0", "--json", "--prompt", text, *(["-m", args.model] if args.model else [])]
        run = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        r = out[0]  # decode rates, after the first token: `run` starts its verifier cold, the server is warm
        served = (r["tokens"] - 1) / (r["seconds"] - r["ttft"]) if "tokens" in r else 0.0
        ran = (run["n_generated"] - 1) / (run["seconds"] - run["timings"]["prefill_s"])
        rows.append({"serve_tok_s": served, "run_tok_s": ran, "same_text": r.get("text") == run["text"]})
    ratios = [r["serve_tok_s"] / r["run_tok_s"] for r in rows if r["run_tok_s"]]
    return {"prompts": len(rows), "rates": "decode, unseen prompts",
            "serve_over_run_median": statistics.median(ratios) if ratios else None, "rows": rows}


def pass_sizes(url: str) -> tuple[dict, dict | None]:
    """Verification steps by how many sessions shared their verifier pass, and (a shared small-LM draft)
    the draft model's passes and the forwards they held (the server's /metrics)."""
    import re

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.findall(r'^dovetail:verify_pass_seconds_count\{batch="(\d+)"\} ([0-9.e+]+)$', text, re.M)
    draft = dict(re.findall(r"^dovetail:draft_(passes|forwards) ([0-9.e+]+)$", text, re.M))
    return ({int(b): int(float(n)) for b, n in sorted(found, key=lambda x: int(x[0]))},
            {k: int(float(v)) for k, v in draft.items()} if draft else None)


def identity(client, model: str, row: dict, n: int) -> dict:
    """Each request of a level run again alone, one after another: how many outputs are the same text
    (greedy: they should all be; a difference comes from the engine's batch-size rounding at a near-tie)."""
    alone = {}
    for prompt in dict.fromkeys(r["prompt"] for r in row["outputs"]):
        out: list = []
        one_stream(client, model, [prompt], n, out)
        alone[prompt] = out[0].get("text")
    same = [r["text"] == alone[r["prompt"]] for r in row["outputs"]]
    return {"streams": row["streams"], "requests": len(same), "identical": sum(same),
            "differing_prompts": sorted({r["prompt"][:60] for r, ok in zip(row["outputs"], same) if not ok}),
            "differing": [{"prompt": r["prompt"], "batched": r["text"], "alone": alone[r["prompt"]]}
                          for r, ok in zip(row["outputs"], same) if not ok]}


def explain(differing: list[dict], spec: str) -> list[dict]:
    """For each request whose output among the others differs from its output alone: the first token
    where the two differ (both texts re-tokenized with the target's tokenizer, the prompt through its
    chat template as the server does) and the target's top-2 logit gap there in llama.cpp's own one-token
    decode of the same file. A near-tie explains a difference (batch-size rounding); a wide gap would
    be a bug. Run after the server has stopped (the target is opened in this process)."""
    from dovetail_rt import lm, store
    from dovetail_rt.bench.harness import reference_logits
    from dovetail_rt.config import dovetail_home

    home = dovetail_home()
    tok = store.load_tokenizer(spec, home)
    target = lm.open_lm(spec, home, "llamacpp", threads=os.cpu_count())
    found = []
    for d in differing:
        prompt = list(tok.apply_chat_template([{"role": "user", "content": d["prompt"]}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))
        a, b = (tok(d[k], add_special_tokens=False)["input_ids"] for k in ("batched", "alone"))
        at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        top = reference_logits(target, prompt, a[:at]).topk(2)
        values, ids = top.values.tolist(), top.indices.tolist()
        found.append({"prompt": d["prompt"][:60], "at": at, "batched": tok.decode(a[at:at + 1]),
                      "alone": tok.decode(b[at:at + 1]), "one_token_decode": tok.decode(ids[:1]),
                      "runner_up": tok.decode(ids[1:]), "top2_gap": round(values[0] - values[1], 4)})
    target.close()
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="1,2,4,8,16")
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("-n", type=int, default=64, help="max_tokens per request")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("-m", "--model", default=None)
    p.add_argument("-md", "--model-draft", default="ngram")
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--url", default=None, help="a running server (else one is started)")
    p.add_argument("--out", default="bench/results", help="folder for the results JSON ('' = none)")
    p.add_argument("--compare-run", type=int, default=0, metavar="K",
                   help="server overhead: K prompts one at a time through the server and through `dovetail run`")
    p.add_argument("--check-identity", action="store_true",
                   help="after the levels, run the largest level's requests alone and compare the outputs")
    p.add_argument("--verifiers", type=int, default=0, metavar="N",
                   help="N verifier processes behind the server, this host's CPUs split among them (0: serve's own child)")
    p.add_argument("--kill-one", action="store_true",
                   help="with --verifiers >= 2: the largest level again, the last verifier SIGKILLed mid-run")
    p.add_argument("--dtype", default=None, help="the target's dtype on the torch engine (default: auto)")
    p.add_argument("--timeout", type=float, default=None,
                   help="the server's link timeout (serve --timeout): how long a stream waits on a dead verifier")
    args = p.parse_args()
    if args.kill_one and args.verifiers < 2:
        p.error("--kill-one needs --verifiers 2 or more (a server's own child is restarted, not routed around)")
    if args.url and args.verifiers:
        p.error("--verifiers starts the verifiers and the server in front of them: not with --url")

    from openai import OpenAI

    from dovetail_rt import data, store
    from dovetail_rt.bench import report

    prompts = [x.text for x in data.load(args.dataset)]
    proc, verifiers = None, []
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        verifiers = start_verifiers(args.verifiers, args.model, args.parallel, args.dtype) if args.verifiers else []
        cmd = [sys.executable, "-m", "dovetail_rt.cli", "serve", "--port", str(port), "--parallel", str(args.parallel),
               "-md", args.model_draft, *(["-m", args.model] if args.model else []),
               *[a for v in verifiers for a in ("--verifier", v.endpoint)],
               *(["--timeout", str(args.timeout)] if args.timeout else []), *(["--dtype", args.dtype] if args.dtype else [])]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=dict(os.environ))
    try:
        wait_ready(url, proc)
        client = OpenAI(base_url=url + "/v1", api_key=os.environ.get("DOVETAIL_API_KEY", "none"), max_retries=0,
                        timeout=1800)
        model = client.models.list().data[0].id
        level(client, model, prompts[:1], 1, 1, 4)  # warm-up, not measured
        rows = [level(client, model, prompts, int(s), args.requests_per_stream, args.n, url) for s in args.streams.split(",")]
        if args.kill_one:  # the largest level again, one verifier killed once the first request has finished
            killed = level(client, model, prompts, rows[-1]["streams"], args.requests_per_stream, args.n, url,
                           kill=lambda: verifiers[-1].proc.kill())
            killed["killed"] = verifiers[-1].endpoint
            rows.append(killed)
        same = identity(client, model, rows[-1], args.n) if args.check_identity else None
        passes, draft_passes = pass_sizes(url)
        overhead = compare_run(client, model, prompts[-args.compare_run:], args.n, args) if args.compare_run else None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        for v in verifiers:
            v.stop()
    if same and same["differing"]:
        same["divergences"] = explain(same["differing"], args.model or store.DEFAULT_TARGET)
    print(f"{'streams':>7s} {'ok':>4s} {'fail':>4s} {'lost':>4s} {'agg tok/s':>9s} {'x one':>6s} {'ttft p50':>8s} "
          f"{'ttft p99':>8s} {'tok/s/stream':>12s}")
    base = rows[0]["aggregate_tok_s"] or 1.0
    for r in rows:
        print(f"{r['streams']:7d} {r['ok']:4d} {r['failed']:4d} {r['lost']:4d} {r['aggregate_tok_s']:9.2f} "
              f"{r['aggregate_tok_s'] / base:5.2f}x {r['ttft_p50_s'] or 0:8.2f} {r['ttft_p99_s'] or 0:8.2f} "
              f"{r['per_stream_tok_s_median']:12.2f}"
              + (f"   at most running per verifier: {sorted(r['peak_running_per_verifier'].values())}"
                 if r["peak_running_per_verifier"] else "")
              + (f"   {r['killed']} SIGKILLed at {r['killed_at_s']:.1f} s (wall {r['wall_s']:.1f} s against "
                 f"{rows[-2]['wall_s']:.1f} s)" if r.get("killed") else ""))
    if same:
        print(f"{same['streams']} streams vs each request alone: {same['identical']}/{same['requests']} identical outputs")
        for d in same.get("divergences", []):
            print(f"  differs at token {d['at']}: {d['batched']!r} vs {d['alone']!r}; the one-token decode's top-2 "
                  f"{d['one_token_decode']!r} / {d['runner_up']!r}, gap {d['top2_gap']} logits ({d['prompt'][:40]!r})")
    print("steps by sessions in their verifier pass: " + ", ".join(f"{b}: {n}" for b, n in passes.items()))
    if draft_passes:
        print(f"draft model: {draft_passes['forwards']} forwards in {draft_passes['passes']} passes "
              f"({draft_passes['forwards'] / max(1, draft_passes['passes']):.2f} a pass; warm-up included)")
    if overhead:
        print(f"one stream through the server vs `dovetail run`, {overhead['prompts']} prompts: median "
              f"{overhead['serve_over_run_median']:.3f}x the tokens/s")
    result = {"command": "python " + " ".join(sys.argv), "draft": args.model_draft, "n": args.n, "dataset": args.dataset,
              "verifiers": args.verifiers,
              "parallel": args.parallel, "requests_per_stream": args.requests_per_stream,
              "machine": report.machine_info("-"), "commit": report.code_version(), "levels": rows, "identity": same,
              "steps_by_pass_sessions": passes, "draft_passes": draft_passes, "server_vs_run": overhead}
    if args.out:
        out = Path(args.out) / time.strftime("load-%Y%m%d-%H%M%S.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        result["results_file"] = str(out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
