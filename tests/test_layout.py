"""The package layout: one import namespace (`stepwise.…`) over the repository's stage folders.

pyproject.toml maps each top-level stage folder into the package (`stepwise.pipelines` ->
`pipelines/`, ...). These tests check that the mapping and the folders agree, that every module
imports under its `stepwise.` name on its own, and that no code or test imports a folder by its
bare name (which works only by accident, from the repository root, and would need generic
top-level names like `training` in site-packages).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Modules that run only inside the Argilla server's venv (.venv-argilla): they import argilla_server,
# which the main venv does not have (the conformance suite imports them there).
SERVER_VENV_ONLY = {
    "stepwise.argilla_embedded.admin",
    "stepwise.argilla_embedded.asgi",
    "stepwise.argilla_embedded.patches",
    "stepwise.argilla_embedded.search_engine",
    "stepwise.argilla_embedded.worker",
}


def package_dirs() -> dict[str, str]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["package-dir"]


def bare_names() -> set[str]:
    """The folder names mapped under `stepwise.` (importable by those names only from the repo root)."""
    return {folder for name, folder in package_dirs().items() if name != "stepwise"}


def python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in listed if (REPO / f).exists()]


def test_package_dir_maps_every_stage_folder():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    for name, folder in mapping.items():
        assert name == "stepwise" or name == f"stepwise.{folder}", (name, folder)
        assert (REPO / folder / "__init__.py").is_file(), f"package-dir {name} -> {folder}/ has no __init__.py"
        assert name in setuptools["packages"], f"{name} is mapped but not listed in packages"
    # every top-level Python package folder of the repository is in the namespace (tests/ is not shipped)
    folders = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert folders == set(mapping.values())
    assert {"pipelines", "curation", "review", "training", "evals", "argilla_embedded"} <= folders


def _bare_import(node: ast.AST, names: set[str]) -> str | None:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] in names:
                return alias.name
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module.split(".")[0] in names:
            return node.module
    elif isinstance(node, ast.Call):
        # import_module("x.y"), __import__("x"), find_spec("x"), mock.patch("x.y.z"), monkeypatch.setattr("x.y", ...)
        func = node.func
        fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if fname in {"import_module", "__import__", "find_spec", "patch", "setattr", "delattr"} and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and "." in arg.value \
                    and arg.value.split(".")[0] in names:
                return arg.value
    elif isinstance(node, ast.List | ast.Tuple):
        # subprocess argv: [..., "-m", "training.bundled", ...]
        for a, b in zip(node.elts, node.elts[1:], strict=False):
            if isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant) \
                    and isinstance(b.value, str) and b.value.split(".")[0] in names:
                return b.value
    return None


def test_bare_import_detector_catches_each_form():
    names = {"training", "curation"}
    forms = ['import training.launcher', 'from curation import labels', 'from curation.labels import x',
             'importlib.import_module("training.cli")', 'mock.patch("curation.labels.load")',
             'subprocess.run([sys.executable, "-m", "training.bundled"])', '__import__("training.configgen")']
    for src in forms:
        assert any(_bare_import(n, names) for n in ast.walk(ast.parse(src))), src
    for src in ['from stepwise.training import launcher', 'import stepwise.curation.labels',
                'x = "training.dpo.enabled"', 'from . import sibling', 'import trainingx']:
        assert not any(_bare_import(n, names) for n in ast.walk(ast.parse(src))), src


def test_no_code_imports_a_stage_folder_by_its_bare_name():
    names = bare_names()
    found = []
    files = python_files()
    assert len(files) > 50
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            hit = _bare_import(node, names)
            if hit:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {hit}")
    assert not found, "import these as stepwise.<folder>...:\n" + "\n".join(found)


def every_module() -> list[str]:
    """Every module of every package pyproject.toml ships (walked from each package's folder)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mods = []
    for name in setuptools["packages"]:
        pkg = importlib.import_module(name)
        mods.append(name)
        mods += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{name}.")]
    # `__main__` runs the CLI when imported (`python -m stepwise`): it is an entry point, not a module
    return sorted({m for m in mods if not m.endswith(".__main__")})


def test_every_module_imports_under_the_namespace():
    mods = every_module()
    # the stage packages and the review stage's own modules are all reached
    for expected in ("stepwise.pipelines.generate", "stepwise.curation.curate", "stepwise.review.stage",
                     "stepwise.review.cli", "stepwise.training.launcher", "stepwise.evals.runner",
                     "stepwise.argilla_embedded.server", "stepwise.testing.openai_stub"):
        assert expected in mods
    assert set(mods) >= SERVER_VENV_ONLY
    failed = []
    for name in mods:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # only the server-venv modules may miss a module, and only argilla-server itself
            if not (name in SERVER_VENV_ONLY and (exc.name or "").split(".")[0] == "argilla_server"):
                failed.append(f"{name}: {exc!r}")
        except Exception as exc:  # noqa: BLE001 - report every module that fails, not the first
            failed.append(f"{name}: {exc!r}")
    assert not failed, "\n".join(failed)
