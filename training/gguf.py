"""GGUF conversion of a merged student (f16, q8_0), with a pinned converter from a registry package.

Which converter, and why: PyPI's `gguf` package (0.19.0) has the GGUF writer and reader but no
Hugging Face converter; llama.cpp's `convert_hf_to_gguf.py` is the converter every GGUF on the Hub
is made with, and it ships, with the matching `gguf-py` and `conversion/` modules and llama.cpp's
LICENSE (MIT), inside the sdist of `llama-cpp-python==0.3.36` (vendor/llama.cpp/), the same pinned
version the llama.cpp teacher and GGUF evaluation run on, so a GGUF we write is one that runtime
reads. `install_converter` gets that sdist through pip (`pip download --no-binary :all:`, pip's
cache makes a second fetch free), checks its sha256 against the pin below, and extracts only those
files into `$STEPWISE_HOME/tools/llama.cpp-convert-0.3.36/` (scripts/setup.sh runs it once;
`stepwise package` runs it when it is missing). The converter runs as a subprocess with this
Python: it needs torch, transformers, numpy, sentencepiece (all installed) and imports its own
vendored gguf-py first, so the installed `gguf` package never mixes in. q8_0 comes straight from
the converter (`--outtype q8_0`, no llama-quantize binary needed).

Hand-written here: fetching, checking and extracting the converter, and `convert` (temp name in the
same folder, then an atomic rename: a failed or killed conversion leaves no half-written GGUF).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import typing
from pathlib import Path

from stepwise.models import stepwise_home
from stepwise.recipe import GgufType

LLAMACPP_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_VENDOR = f"llama_cpp_python-{LLAMACPP_VERSION}/vendor/llama.cpp/"
# what the converter needs from the sdist (the script, its modules, its gguf-py) + the licence
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
OUTTYPES: tuple[str, ...] = typing.get_args(GgufType)  # the recipe's package.gguf choices: one list


class ConversionError(RuntimeError):
    """The GGUF converter failed or could not be installed (its output tail is in the message)."""


def converter_dir() -> Path:
    return stepwise_home() / "tools" / f"llama.cpp-convert-{LLAMACPP_VERSION}"


def converter_script() -> Path:
    return converter_dir() / "convert_hf_to_gguf.py"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_converter(sdist: Path | None = None) -> Path:
    """The converter folder, extracted from the pinned sdist (downloaded with pip unless given)."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "-d", tmp, f"llama-cpp-python=={LLAMACPP_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            sdist = Path(tmp) / SDIST
            if proc.returncode != 0 or not sdist.exists():
                raise ConversionError(f"could not fetch the GGUF converter ({' '.join(cmd)}; exit {proc.returncode}):\n"
                                      f"{(proc.stderr or proc.stdout)[-2000:]}")
        digest = _sha256(sdist)
        if digest != SDIST_SHA256:
            raise ConversionError(f"{sdist}: sha256 {digest} is not the pinned {SDIST_SHA256}")
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                rel = m.name[len(_VENDOR):] if m.name.startswith(_VENDOR) else None
                if rel and any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in _MEMBERS) \
                        and (m.isfile() or m.isdir()):
                    m.name = rel
                    tar.extract(m, staging, filter="data")
        (staging / "SOURCE.txt").write_text(
            f"Extracted from {SDIST} (sha256 {SDIST_SHA256}), vendor/llama.cpp/, by stepwise.training.gguf.\n",
            encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def convert(model_dir: Path, out_path: Path, outtype: str, *, log_path: Path | None = None) -> Path:
    """Convert an HF model folder to one GGUF file; written as `<out>.partial`, renamed when complete."""
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    script = install_converter() / "convert_hf_to_gguf.py"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    partial.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(partial)]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, never the installed one
    env.setdefault("HF_HUB_OFFLINE", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if log_path is not None:
            log_path.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}", encoding="utf-8")
        if proc.returncode != 0 or not partial.exists():
            raise ConversionError(f"GGUF conversion of {model_dir} to {outtype} failed (exit {proc.returncode}):\n"
                                  f"{(proc.stderr or proc.stdout)[-2000:]}")
        with partial.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ConversionError(f"{partial}: the converter wrote no GGUF header")
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)  # a failure (or Ctrl-C) leaves no half-written file behind
    return out_path


def main(argv: list[str] | None = None) -> int:
    """`python -m stepwise.training.gguf --install`: fetch and extract the pinned converter (setup.sh)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--install"]:
        print("usage: python -m stepwise.training.gguf --install", file=sys.stderr)
        return 2
    print(install_converter())
    return 0


if __name__ == "__main__":
    sys.exit(main())
