"""Run directories and their manifest.

A run lives in `runs/<recipe-name>/<run-id>/`. `manifest.json` records, per stage, its status,
input and output hashes, row counts, wall time, costs and library versions. Every write of the
manifest is atomic and serialised by a lock file, so a crash never leaves it half-written and two
processes never lose each other's updates.

A stage is used as a context manager:

    with run.stage("curate", inputs=[responses_path]) as st:
        ... write files ...
        st.outputs(train_path, val_path)
        st.counts(train=len(train))

On success the stage is `done`; on an exception it is `failed` with the error text; a stage that
is `running` in the manifest when nobody holds it was killed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from stepwise.io import atomic_write_json, sha256_file, sha256_text
from stepwise.layout import RunLayout

STAGES = ["generate", "curate", "review", "export", "configs", "train", "eval", "report", "package"]

_VERSIONED = [
    "stepwise", "distilabel", "argilla", "datasketch", "openai", "outlines", "transformers",
    "torch", "peft", "trl", "axolotl", "datasets", "lm_eval", "accelerate", "bitsandbytes",
]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def file_entry(path: Path, base: Path) -> dict[str, Any]:
    """Manifest entry for a file: path relative to the run when inside it, hash, size, rows."""
    path = Path(path)
    try:
        rel = str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        rel = str(path.resolve())
    entry: dict[str, Any] = {"path": rel, "sha256": sha256_file(path) if path.exists() else None}
    if path.is_file():
        entry["bytes"] = path.stat().st_size
        if path.suffix == ".jsonl":
            with path.open("rb") as fh:
                entry["rows"] = sum(1 for line in fh if line.strip())
    return entry


@dataclass
class StageRecorder:
    run: RunDir
    name: str
    _outputs: list[Path] = field(default_factory=list)
    _counts: dict[str, Any] = field(default_factory=dict)
    _extra: dict[str, Any] = field(default_factory=dict)
    status: str = "done"

    def outputs(self, *paths: Path) -> None:
        self._outputs.extend(Path(p) for p in paths)

    def counts(self, **counts: Any) -> None:
        self._counts.update(counts)

    def extra(self, **values: Any) -> None:
        self._extra.update(values)

    def mark(self, status: str) -> None:
        """Finish with a status other than `done` (e.g. `incomplete` when a cost cap stopped it)."""
        self.status = status


class RunDir:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.layout = RunLayout(self.path)  # every file name inside the run (stepwise.layout)

    # -- layout -----------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.layout.manifest

    def stage_dir(self, stage: str) -> Path:
        d = self.layout.stage_dir(stage)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- manifest ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.layout.manifest_lock, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def update_manifest(self, fn) -> dict[str, Any]:
        """Apply `fn(manifest) -> None` under the lock and write atomically."""
        with self._locked():
            manifest = self.read_manifest()
            fn(manifest)
            manifest["updated"] = _now()
            atomic_write_json(self.manifest_path, manifest)
            return manifest

    def stage_info(self, stage: str) -> dict[str, Any] | None:
        return self.read_manifest().get("stages", {}).get(stage)

    def stage_status(self, stage: str) -> str:
        info = self.stage_info(stage)
        return info["status"] if info else "pending"

    @contextlib.contextmanager
    def stage(self, name: str, inputs: list[Path] | None = None, params: Any = None) -> Iterator[StageRecorder]:
        inputs = [Path(p) for p in (inputs or [])]
        started = time.time()
        rec = StageRecorder(self, name)
        input_entries = [file_entry(p, self.path) for p in inputs]

        def begin(m: dict[str, Any]) -> None:
            prev = m.setdefault("stages", {}).get(name, {})
            m["stages"][name] = {
                "status": "running",
                "started": _now(),
                "pid": os.getpid(),
                "inputs": input_entries,
                "params_hash": _params_hash(params),
                "attempt": prev.get("attempt", 0) + 1,
            }

        self.update_manifest(begin)
        try:
            yield rec
        except BaseException as exc:
            err = f"{type(exc).__name__}: {exc}"

            def failed(m: dict[str, Any]) -> None:
                st = m.setdefault("stages", {}).setdefault(name, {})
                st.update(status="failed", finished=_now(), wall_s=round(time.time() - started, 3), error=err[:4000])
                st.update(counts=rec._counts, **rec._extra)

            self.update_manifest(failed)
            raise
        outputs = [file_entry(p, self.path) for p in rec._outputs]

        def done(m: dict[str, Any]) -> None:
            st = m.setdefault("stages", {}).setdefault(name, {})
            st.update(
                status=rec.status, finished=_now(), wall_s=round(time.time() - started, 3),
                outputs=outputs, counts=rec._counts, versions=library_versions(),
            )
            st.update(rec._extra)

        self.update_manifest(done)


def _params_hash(params: Any) -> str | None:
    """A record of the settings a stage ran with (in its manifest entry; `stepwise run` decides what
    to skip by its own fingerprint, stepwise.pipeline)."""
    if params is None:
        return None
    return sha256_text(json.dumps(params, sort_keys=True, default=str))[:16]


# -- creating and finding runs -----------------------------------------------------------------


def runs_root_for(recipe) -> Path:
    return recipe.resolve(recipe.runs_dir)


def create_run(recipe, run_dir: Path | None = None, *, point_latest: bool = True) -> RunDir:
    """Make (or reopen) a run directory and record the recipe in its manifest. `point_latest=False`
    leaves `<runs>/<recipe>/latest` alone (an experiment's sub-runs are not the recipe's latest run)."""
    root = runs_root_for(recipe) / recipe.name
    path = Path(run_dir) if run_dir else root / new_run_id()
    run = RunDir(path)
    recipe_text = recipe.source_path.read_text(encoding="utf-8") if recipe.source_path else ""

    def init(m: dict[str, Any]) -> None:
        m.setdefault("run_id", path.name)
        m.setdefault("created", _now())
        m["recipe"] = {
            "name": recipe.name,
            "path": str(recipe.source_path) if recipe.source_path else None,
            "sha256": sha256_text(recipe_text),
        }
        m.setdefault("stages", {})

    run.update_manifest(init)
    run.layout.recipe_copy.write_text(recipe_text, encoding="utf-8")
    if point_latest:
        _point_latest(root, path)
    return run


def _point_latest(root: Path, path: Path) -> None:
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
        link = root / "latest"
        tmp = root / f".latest.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(path.resolve())
        os.replace(tmp, link)


def resolve_run(recipe, run_dir: Path | None, *, create: bool) -> RunDir:
    """The run to work in: `--run-dir`, else the recipe's latest run (or a new one if `create`)."""
    if run_dir is not None:
        if not Path(run_dir).exists() and not create:
            raise FileNotFoundError(f"{run_dir}: run directory not found")
        # resolved once: a `latest` symlink may move under a long stage when another run starts
        return create_run(recipe, Path(run_dir).resolve())
    latest = runs_root_for(recipe) / recipe.name / "latest"
    if latest.exists():
        return create_run(recipe, latest.resolve())
    if create:
        return create_run(recipe)
    raise FileNotFoundError(f"no runs yet for recipe '{recipe.name}' under {runs_root_for(recipe)}; run `stepwise generate` first")


def list_runs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for manifest in sorted(Path(root).glob("*/*/manifest.json")):
        if manifest.parent.name == "latest":
            continue
        try:
            out.append((manifest.parent, json.loads(manifest.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError):
            out.append((manifest.parent, {"error": "unreadable manifest"}))
    return out


def effective_status(info: dict[str, Any] | None) -> str:
    """A `running` stage whose process is gone was killed: report it as `interrupted`."""
    if not info:
        return "pending"
    status = info.get("status", "pending")
    if status == "running":
        pid = info.get("pid")
        if pid:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return "interrupted"
            except PermissionError:
                pass
    return status
