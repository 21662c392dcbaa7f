"""Run import-linter's contracts (`.importlinter` at the repository root) over the `stepwise` package.

Hand-written glue around the `lint-imports` command (PyPI `import-linter`). Why a wrapper: the
stage folders at the top of the repository are mapped into `stepwise` by setuptools' `package-dir`
(pyproject), and grimp, import-linter's graph builder, walks only the `stepwise/` folder it finds
on sys.path. So this builds the installed package's shape as a tree of symbolic links in a
temporary folder (`stepwise/` holding the links of `stepwise/*` plus one link per mapped folder,
read from pyproject, not listed here) and runs `lint-imports` from there. Exit status: lint-imports'.
Usage: `python scripts/lint_imports.py [lint-imports options]` (e.g. `--verbose`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_tree(dest: Path, pyproject: Path = ROOT / "pyproject.toml") -> Path:
    """The package as it is installed, as symbolic links under `dest`; returns `dest`."""
    mapping: dict[str, str] = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]["package-dir"]
    top = mapping.get("stepwise", "stepwise")
    pkg = dest / "stepwise"
    pkg.mkdir(parents=True)
    for entry in (pyproject.parent / top).iterdir():
        (pkg / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    for name, folder in mapping.items():
        if name == "stepwise":
            continue
        sub = name.removeprefix("stepwise.")
        if "." in sub:  # a nested mapping would need its parent first; none today
            raise SystemExit(f"{pyproject}: package-dir {name!r}: only stepwise.<name> mappings are supported here")
        link = pkg / sub
        if link.exists():
            raise SystemExit(f"{pyproject}: package-dir {name!r} also exists as {top}/{sub}")
        link.symlink_to((pyproject.parent / folder).resolve(), target_is_directory=True)
    return dest


def main(argv: list[str]) -> int:
    lint = Path(sys.executable).parent / "lint-imports"
    with tempfile.TemporaryDirectory(prefix="stepwise-imports-") as tmp:
        tree = build_tree(Path(tmp))
        # lint-imports puts its working directory first on sys.path: run it in the linked tree
        env = {**os.environ, "PYTHONPATH": str(tree)}
        return subprocess.call([str(lint), str(ROOT / ".importlinter"), "--no-cache", *argv],
                               cwd=tree, env=env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
