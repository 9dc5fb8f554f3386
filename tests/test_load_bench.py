"""bench/load.py with several verifier processes behind one server, one of them SIGKILLed mid-run: the
numbers it reports are the ones the requests saw (none lost, none failed, placement within the fair share)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from test_server import model_dir  # noqa: F401  (fixture)


@pytest.mark.timeout(400)
def test_load_bench_with_two_verifiers_and_one_killed_loses_nothing(model_dir, tmp_path):  # noqa: F811
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "-m", str(model_dir), "-md", "ngram",
                          "--verifiers", "2", "--kill-one", "--streams", "4", "--requests-per-stream", "2", "-n", "24",
                          "--parallel", "4", "--timeout", "3", "--dtype", "float32", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=380, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    plain, killed = result["levels"]
    assert result["verifiers"] == 2 and killed["killed"] and killed["killed_at_s"] is not None
    for row in (plain, killed):
        assert (row["requests"], row["ok"], row["failed"], row["lost"]) == (8, 8, 0, 0), row["errors"]
        assert all(r["tokens"] > 0 for r in row["outputs"])
    # 4 streams over 2 verifiers of 4 sessions each: never more than 2 at once on one (the fair share)
    assert plain["peak_running_per_verifier"] and max(plain["peak_running_per_verifier"].values()) <= 2
    # the killed verifier had requests running: their sessions resumed on the other, which marked it down
    assert killed["verifiers_after"][killed["killed"]] == "down" and plain["verifiers_after"][killed["killed"]] == "ok"
    # the outputs are greedy: the same prompt gives the same text with and without the kill
    texts = {r["prompt"]: r["text"] for r in plain["outputs"]}
    assert all(texts[r["prompt"]] == r["text"] for r in killed["outputs"] if r["prompt"] in texts)
    assert list(tmp_path.glob("load-*.json"))
