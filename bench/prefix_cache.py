"""Time to first token per turn of multi-turn chats, with the verifier's prefix cache and without.

Two verifiers of the same target on this host, one with the prefix cache (the default) and one with
``--prefix-cache 0``; each chat runs on both, turn by turn interleaved, every turn on a new Client (a
new verifier session, as `dovetail serve` gives each request). A chat: a HumanEval task, then review
requests (data.REVIEWS) that ask to rewrite the answer; each later prompt holds the whole history, so
without the cache a turn prefills all of it. Greedy; the outputs of the two must be the same.

    python bench/prefix_cache.py --chats 4 --turns 3 -n 96
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from dovetail_rt import data, store
from dovetail_rt.client import Client, encode_prompt
from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig, VerifierConfig, dovetail_home
from dovetail_rt.launcher import VerifierChild


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=store.DEFAULT_TARGET)
    ap.add_argument("--chats", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("-n", "--n-predict", type=int, default=96)
    ap.add_argument("--first", type=int, default=120, help="the first HumanEval task (outside the bench's slices)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/prefix-cache-TIME.json)")
    args = ap.parse_args()
    home = dovetail_home()
    tokenizer = store.load_tokenizer(args.model, home)
    config = lambda cache: VerifierConfig(model=args.model, home=home, prefix_cache=cache,
                                          link=LinkConfig(endpoint=CHILD_ENDPOINT))
    rows = []
    with VerifierChild(config(None)) as cached, VerifierChild(config(0)) as plain:
        print(f"target: {cached.target.get('model', args.model)} ({cached.target.get('engine')}, "
              f"{cached.target.get('format')}); CPU: {cpu_name()}", flush=True)
        tasks = data.humaneval()[args.first : args.first + args.chats]
        for c, task in enumerate(tasks):
            history = []
            for turn in range(args.turns):
                text = (f"Complete this Python function:\n\n```python\n{task.text.strip()}\n```" if turn == 0
                        else data.REVIEWS[(c + turn - 1) % len(data.REVIEWS)])
                ids = encode_prompt(tokenizer, text, True, history)
                outs = {}
                for name, child in (("cache", cached), ("no-cache", plain)):
                    with Client(verifier=child.endpoint, draft="ngram", tokenizer=tokenizer) as client:
                        outs[name] = client.generate(ids, args.n_predict)
                a, b = outs["cache"], outs["no-cache"]
                rows.append({"chat": c, "turn": turn + 1, "n_prompt": len(ids), "cached": a.stats.n_cached,
                             "ttft_cache_s": a.stats.ttft_s, "ttft_plain_s": b.stats.ttft_s,
                             "same_output": a.token_ids == b.token_ids})
                r = rows[-1]
                print(f"chat {c} turn {turn + 1}: prompt {r['n_prompt']:5d}  cached {r['cached']:5d}  "
                      f"TTFT {1000 * r['ttft_cache_s']:7.1f} ms vs {1000 * r['ttft_plain_s']:7.1f} ms without "
                      f"({r['ttft_cache_s'] / r['ttft_plain_s']:.2f}x)  same output: {r['same_output']}", flush=True)
                history += [{"role": "user", "content": text},
                            {"role": "assistant", "content": tokenizer.decode(b.token_ids, skip_special_tokens=True)}]
    later = [r["ttft_cache_s"] / r["ttft_plain_s"] for r in rows if r["turn"] > 1]
    summary = {"later_turns_ttft_ratio_median": round(statistics.median(later), 3) if later else None,
               "later_turns_ttft_ratio_max": round(max(later), 3) if later else None,
               "same_output": sum(r["same_output"] for r in rows), "turns": len(rows), "cpu": cpu_name()}
    out = Path(args.out or Path(__file__).parent / "results" / f"prefix-cache-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python bench/prefix_cache.py", *sys.argv[1:]]),
                               "rows": rows, "summary": summary}, indent=1))
    print(f"later turns: TTFT with the cache / without, median {summary['later_turns_ttft_ratio_median']}, "
          f"max {summary['later_turns_ttft_ratio_max']}; same output {summary['same_output']}/{len(rows)}")
    print(json.dumps({"results_file": str(out), **summary}))


if __name__ == "__main__":
    main()
