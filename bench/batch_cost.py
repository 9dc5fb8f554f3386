"""What one pass over several sessions costs, against one session's chain of the same size and against
the same sessions run one after another: 8 sessions with 200 cached tokens each, in-process, one
engine (``lm.open_lm``), median of 7 (ms). Run for each weight format you serve, e.g.

    python bench/batch_cost.py qwen2.5-coder-1.5b qwen2.5-coder-1.5b:q4_0
    python bench/batch_cost.py --engine torch --dtype bfloat16 qwen2.5-coder-1.5b
"""

import argparse
import statistics
import time

from dovetail_rt import lm
from dovetail_rt.config import dovetail_home


def median_ms(f, n=7) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["qwen2.5-coder-1.5b"])
    parser.add_argument("--engine", default="llamacpp", choices=["llamacpp", "torch"])
    parser.add_argument("--dtype", default="bfloat16", help="torch engine: float32, bfloat16, int8")
    args = parser.parse_args()
    for spec in args.models:
        # llama.cpp: one session's KV pool, and the verifier's default (4096 x 17)
        for cells in (4096, 69632) if args.engine == "llamacpp" else (None,):
            if args.engine == "llamacpp":
                model = lm.open_lm(spec, dovetail_home(), "llamacpp", threads=2, n_ctx=4096, kv_cells=cells)
            else:
                model = lm.open_lm(spec, dovetail_home(), "torch", dtype=args.dtype)
            sessions = []
            for k in range(8):
                s = model.session()
                s.forward([100 + k + (i % 50) for i in range(200)], logits_for=1)
                s.keep(list(range(200)))
                sessions.append(s)

            def batch(n):
                def run():
                    model.forward_batch([(s, [5], None, None) for s in sessions[:n]])
                    for s in sessions[:n]:
                        s.truncate(s.length)
                return run

            def each(n):
                def run():
                    for s in sessions[:n]:
                        s.forward([5])
                        s.truncate(s.length)
                return run

            def chain(q):
                def run():
                    sessions[0].forward([5] * q)
                    sessions[0].truncate(sessions[0].length)
                return run

            where = f"pool {cells}" if cells else args.dtype
            print(f"{spec} {args.engine} {where}: one token {median_ms(chain(1)):.1f}  chain of 8 {median_ms(chain(8)):.1f}  "
                  f"2 sessions {median_ms(batch(2)):.1f}  4 sessions {median_ms(batch(4)):.1f}  "
                  f"8 sessions {median_ms(batch(8)):.1f} ms; one after another: 8 sessions {median_ms(each(8)):.1f} ms",
                  flush=True)
            for s in sessions:
                s.close()
            model.close()


if __name__ == "__main__":
    main()
