"""Structured output on the real model (issue 20 item 4): JSON Schema requests through the two-process
runtime, each output parsed and validated against its schema, and what the grammar costs the verifier.

    python bench/structured.py [--model qwen2.5-coder-1.5b] [--draft ngram] [-n 256] [--requests 20]

The grammar for each request is built as `dovetail serve` builds it from ``response_format``
(``openai_api.Sampling.constraint`` then ``grammar.compile_grammar``). The verifier reports, per
RESULT, its time on the grammar (the draft's cut and the masks of every token accepted): the
printed share is that time over the verification steps' own forward time (``verify_s``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonschema  # noqa: E402

from dovetail_rt import grammar, openai_api, store  # noqa: E402
from dovetail_rt.client import Client  # noqa: E402
from dovetail_rt.config import CHILD_ENDPOINT, LinkConfig, VerifierConfig, dovetail_home  # noqa: E402
from dovetail_rt.launcher import VerifierChild  # noqa: E402

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                 "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
               "required": ["name", "age", "languages"], "additionalProperties": False},
    "function": {"type": "object", "properties": {"name": {"type": "string"}, "arguments": {
        "type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "type": {
            "enum": ["int", "str", "float", "bool", "list"]}}, "required": ["name", "type"]}, "maxItems": 4},
        "returns": {"enum": ["int", "str", "float", "bool", "list", "None"]}}, "required": ["name", "arguments", "returns"]},
    "review": {"type": "object", "properties": {"verdict": {"enum": ["approve", "request_changes"]},
                                                 "score": {"type": "integer", "minimum": 1, "maximum": 5},
                                                 "summary": {"type": "string", "maxLength": 200}},
               "required": ["verdict", "score", "summary"]},
    "book": {"type": "object", "properties": {"title": {"type": "string"}, "author": {"type": "string"},
                                               "year": {"type": "integer"}, "in_print": {"type": "boolean"}},
             "required": ["title", "author", "year", "in_print"]},
}
PROMPTS = {
    "person": ["Describe Ada Lovelace as JSON.", "Describe Guido van Rossum as JSON.", "Describe Grace Hopper as JSON.",
               "Describe Linus Torvalds as JSON.", "Describe Margaret Hamilton as JSON."],
    "function": ["Describe the Python function `def add(a: int, b: int) -> int` as JSON.",
                 "Describe `def greet(name: str) -> str` as JSON.", "Describe `def mean(xs: list) -> float` as JSON.",
                 "Describe `def is_prime(n: int) -> bool` as JSON.", "Describe `def main() -> None` as JSON."],
    "review": ["Review this code as JSON: `def f(x): return x*2`", "Review this code as JSON: `eval(input())`",
               "Review this code as JSON: `for i in range(10): print(i)`", "Review as JSON: `import os; os.system(cmd)`",
               "Review as JSON: `x = [i for i in range(5)]`"],
    "book": ["Give 'Structure and Interpretation of Computer Programs' as JSON.", "Give 'The C Programming Language' as JSON.",
             "Give 'Dune' as JSON.", "Give 'Moby-Dick' as JSON.", "Give 'The Pragmatic Programmer' as JSON."],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=store.DEFAULT_TARGET)
    ap.add_argument("--draft", default="ngram", help="draft for the runs (ngram, a draft model, or none)")
    ap.add_argument("-n", "--n-predict", type=int, default=256)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    home = dovetail_home()
    cases = [(kind, p) for i in range(5) for kind, ps in PROMPTS.items() for p in ps[i:i + 1]][: args.requests]
    rows = []
    with VerifierChild(VerifierConfig(model=args.model, home=home, link=LinkConfig(endpoint=CHILD_ENDPOINT))) as child, \
            Client(verifier=child.endpoint, draft=None if args.draft == "none" else args.draft,
                   tokenizer=store.load_tokenizer(args.model, home), home=home) as client:
        for kind, prompt in cases:
            req = openai_api.ChatRequest(messages=[{"role": "user", "content": prompt}], response_format={
                "type": "json_schema", "json_schema": {"name": kind, "schema": SCHEMAS[kind]}})
            field, fmt, text = req.constraint()
            t0 = time.perf_counter()
            g = grammar.compile_grammar(fmt, text)
            compile_s = time.perf_counter() - t0
            out = client.generate(client.encode(prompt, chat=True), args.n_predict, grammar=g)
            reply = client.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            try:
                jsonschema.validate(json.loads(reply), SCHEMAS[kind])
                valid, why = True, ""
            except (ValueError, jsonschema.ValidationError) as exc:
                valid, why = False, str(exc)[:200]
            st = out.stats
            rows.append({"kind": kind, "prompt": prompt, "valid": valid, "why": why, "text": reply,
                         "tokens": st.n_generated, "steps": st.n_steps, "tau": st.tau, "compile_ms": compile_s * 1e3,
                         "verify_s": st.timings.verify_s, "grammar_s": st.timings.grammar_s, "seconds": st.seconds})
            print(f"{'ok ' if valid else 'BAD'} {kind:8s} {st.n_generated:3d} tok {st.n_steps:3d} steps "
                  f"grammar {st.timings.grammar_s / max(st.n_steps, 1) * 1e3:.3f} ms/step "
                  f"verify {st.timings.verify_s / max(st.n_steps, 1) * 1e3:.1f} ms/step  {reply[:80]!r}", flush=True)
    grammar_s, verify_s = sum(r["grammar_s"] for r in rows), sum(r["verify_s"] for r in rows)
    summary = {"requests": len(rows), "valid": sum(r["valid"] for r in rows), "grammar_share_of_verify": grammar_s / verify_s,
               "grammar_ms_per_step": grammar_s / max(1, sum(r["steps"] for r in rows)) * 1e3,
               "verify_ms_per_step": verify_s / max(1, sum(r["steps"] for r in rows)) * 1e3,
               "compile_ms_median": sorted(r["compile_ms"] for r in rows)[len(rows) // 2]}
    print(json.dumps(summary, indent=1))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), "draft": args.draft, "model": args.model,
                                "summary": summary, "rows": rows}, indent=1))
    print(f"written: {path}")
    return 0 if summary["valid"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
