"""Honest metadata: every third-party library the package code imports is declared in
pyproject.toml (dependencies or an extra), requirements.txt pins every line, and the optional
extras are the ones scripts/setup.sh installs."""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = ("stepwise", "pipelines", "curation", "training", "evals", "argilla_embedded")
# Modules of argilla_embedded that import argilla_server run inside the Argilla server's own venv
# (.venv-argilla, scripts/setup_argilla.sh installs argilla-server); these libraries come with it.
SERVER_LIBS = {"argilla_server", "sqlalchemy", "rq", "starlette"}


def _declared() -> set[str]:
    reqs = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"].get("optional-dependencies", {}).values():
        reqs += extra
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return {t for t in tops if t not in sys.stdlib_module_names and t not in PACKAGES and t != "__future__"}


def test_every_third_party_import_is_declared_in_pyproject():
    declared = _declared()
    dists = md.packages_distributions()
    missing = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tops = _imports(path)
            if "argilla_server" in tops:
                tops -= SERVER_LIBS
            for top in sorted(tops):
                names = {canonicalize_name(d) for d in dists.get(top, [])}
                if not names:
                    missing.append(f"{path.relative_to(ROOT)}: imports {top}, which no installed distribution provides")
                elif not names & declared:
                    missing.append(f"{path.relative_to(ROOT)}: imports {top} ({', '.join(sorted(names))}): "
                                   "not declared in pyproject.toml")
    assert not missing, "\n".join(missing)


def test_declared_versions_match_what_is_installed():
    """pyproject's specifiers hold for the versions setup installed (datasketch>=2.0 for `scheme=`)."""
    wrong = []
    for r in map(Requirement, PYPROJECT["project"]["dependencies"]):
        version = md.version(r.name)
        if not r.specifier.contains(version.split("+")[0], prereleases=True):
            wrong.append(f"{r}: installed {version}")
    assert not wrong, wrong
    datasketch = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("datasketch"))
    assert not datasketch.specifier.contains("1.6.5")  # MinHash(scheme=...) needs 2.0


def test_requirements_are_exact_pins_and_extras_are_installed():
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    unpinned = [str(r) for r in reqs if not any(s.operator == "==" for s in r.specifier)]
    assert not unpinned, f"requirements.txt lines without an exact pin: {unpinned}"
    for r in reqs:
        assert md.version(r.name).split("+")[0] in r.specifier, f"{r}: installed {md.version(r.name)}"
    # setup installs every extra (so each one's tests run): by name in setup.sh or requirements.txt
    installs = (ROOT / "scripts" / "setup.sh").read_text() + "\n".join(lines)
    for extra, extra_reqs in PYPROJECT["project"]["optional-dependencies"].items():
        for req in map(Requirement, extra_reqs):
            assert req.name in installs, f"scripts/setup.sh does not install the extra [{extra}] ({req.name})"
            assert md.version(req.name).split("+")[0] in req.specifier, f"extra [{extra}]: {req}"
