"""A training run's output directory: which run it belongs to, where it resumes, what it recorded.

Hand-written; shared by both local backends (the Axolotl launcher and the TRL backend), which both
train with HF's `Trainer`, so the files read here are the trainer's own:

- Identity. `<run>/train/<config>/identity.json` holds the sha256 of the resolved config (minus
  the keys that only steer checkpointing and resuming) and of the data files it trains on. A
  train call whose identity matches resumes in that directory; one whose identity differs (a
  changed learning rate, re-exported data, `--cpu` vs GPU) first moves the earlier directory, with
  its manifest entry, to `<run>/train/superseded/<config>-<time>-<sha8>/`: a trained model is
  never overwritten.
- Resuming. HF writes `trainer_state.json` last when it saves `checkpoint-<step>/` (after weights,
  optimizer, scheduler and RNG state), so a checkpoint whose trainer state parses and names its own
  step is complete. The newest complete one is handed to the trainer explicitly
  (`resume_from_checkpoint`) rather than left to Axolotl's `auto_resume_from_checkpoints`, which
  takes the highest-numbered folder even when a kill left it half-written; such a half-written
  newer folder is removed (nothing can resume from it, and the trainer would write into it).
- Losses. The loss curve is the trainer's `log_history` from the newest trainer state (the root
  `trainer_state.json` where the backend saves one, else the newest complete checkpoint's: with
  `save_strategy: steps` HF always checkpoints at the end of training), never parsed from stdout.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise.io import atomic_write_text, canonical_json, sha256_file, sha256_text
from stepwise.rundir import RunDir

IDENTITY_FILE = "identity.json"
STATE_FILE = "trainer_state.json"
SUPERSEDED_DIR = "superseded"
# Keys that steer checkpointing/resuming only: a resumed run has them set differently, and
# changing them does not change the model, so they are left out of the identity.
NOT_IDENTITY = frozenset({"resume_from_checkpoint", "auto_resume_from_checkpoints", "save_steps", "save_strategy",
                          "save_total_limit", "saves_per_epoch", "output_dir", "dataset_prepared_path"})
LOSS_FIELDS = ["step", "epoch", "loss", "eval_loss", "grad_norm", "learning_rate", "kind"]
# What a finished run leaves at the top of its output dir (full weights or an adapter).
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors",
               "adapter_model.bin")


class NoLossRecorded(RuntimeError):
    pass


def config_identity(resolved: dict[str, Any], data_files: list[Path]) -> tuple[str, dict[str, Any]]:
    """(sha256, what it covers): the resolved config and the content of the data it trains on."""
    payload: dict[str, Any] = {"config": {k: v for k, v in resolved.items() if k not in NOT_IDENTITY},
                               "data": {str(p): sha256_file(p) for p in sorted(data_files, key=str)}}
    # A local starting model (DPO's merged SFT model, a checkpoint) can be rewritten under the same
    # path; its files' sizes and times stand in for hashing gigabytes of weights.
    for key in ("base_model", "lora_model_dir"):
        value = resolved.get(key)
        d = Path(value) if isinstance(value, str) and value else None
        if d is not None and d.is_dir():
            payload[key + "_files"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns]
                                       for f in sorted(d.iterdir()) if f.is_file()}
    return sha256_text(canonical_json(payload)), payload


def checkpoint_step(path: Path) -> int | None:
    tail = path.name.removeprefix("checkpoint-")
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def _state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint whose trainer state was written for its own step, oldest first."""
    found = []
    for p in out_dir.glob("checkpoint-*") if out_dir.is_dir() else []:
        step = checkpoint_step(p)
        state = _state(p) if step is not None and p.is_dir() else None
        if state is not None and state.get("global_step") == step:
            found.append((step, p))
    return sorted(found)


def last_complete_checkpoint(out_dir: Path) -> Path | None:
    done = complete_checkpoints(out_dir)
    return done[-1][1] if done else None


def has_trained_output(out_dir: Path) -> bool:
    """A model, an adapter or any checkpoint: something a training run paid for."""
    if not out_dir.is_dir():
        return False
    return any((out_dir / f).exists() for f in MODEL_FILES) or any(
        checkpoint_step(p) is not None for p in out_dir.glob("checkpoint-*"))


@dataclass
class OutputPlan:
    out_dir: Path
    identity: str
    resume_from: Path | None = None
    resume_step: int | None = None
    total_steps: int | None = None  # the trainer's max_steps, as recorded in the checkpoint
    moved_aside: Path | None = None
    removed_incomplete: list[Path] | None = None

    def describe(self) -> list[str]:
        lines = []
        if self.moved_aside is not None:
            lines.append(f"the config changed since {self.out_dir.name} was trained: the earlier output was moved to "
                         f"{self.moved_aside} (its manifest entry with it); training into a fresh {self.out_dir}")
        for p in self.removed_incomplete or []:
            lines.append(f"removed {p.name}: a kill left it half-written (no trainer state), nothing can resume from it")
        if self.resume_from is not None:
            of = f" of {self.total_steps}" if self.total_steps else ""
            lines.append(f"resuming from {self.resume_from.name} (step {self.resume_step}{of}, the last complete "
                         "checkpoint of this config)"
                         + ("; training had finished: nothing left to train, the model is saved again from it"
                            if self.total_steps and (self.resume_step or 0) >= self.total_steps else ""))
        return lines


def prepare_output_dir(run: RunDir, name: str, identity: str, payload: dict[str, Any], *, stage: str,
                       source: Path) -> OutputPlan:
    """Resume, or move a different config's output aside; then record this config's identity."""
    run.stage_dir("train")
    out_dir = run.layout.train_output(name)
    plan = OutputPlan(out_dir=out_dir, identity=identity)
    recorded = _read_identity(out_dir)
    same = recorded is not None and recorded.get("sha256") == identity
    if not same and has_trained_output(out_dir):
        plan.moved_aside = _move_aside(run, out_dir, recorded, stage=stage)
    elif same:
        last = last_complete_checkpoint(out_dir)
        last_step = checkpoint_step(last) if last is not None else -1
        stale = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and (checkpoint_step(p) or -1) > last_step]
        for p in sorted(stale):
            shutil.rmtree(p)
        plan.removed_incomplete = sorted(stale)
        if last is not None:
            plan.resume_from, plan.resume_step = last, last_step
            plan.total_steps = (_state(last) or {}).get("max_steps")
        elif has_trained_output(out_dir):  # a finished model without checkpoints: keep it, train afresh beside
            plan.moved_aside = _move_aside(run, out_dir, recorded, stage=stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not same or plan.moved_aside is not None:
        atomic_write_text(out_dir / IDENTITY_FILE, json.dumps(
            {"config": name, "sha256": identity, "source": str(source), "created": _now(), **payload},
            indent=2, default=str) + "\n")
    return plan


def _read_identity(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _move_aside(run: RunDir, out_dir: Path, recorded: dict[str, Any] | None, *, stage: str) -> Path:
    """`train/<name>` -> `train/superseded/<name>-<time>-<sha8>`, with the stage's manifest entry."""
    sha = (recorded or {}).get("sha256", "unknown")[:8]
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    dest = run.layout.train_dir / SUPERSEDED_DIR / f"{out_dir.name}-{stamp}-{sha}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{out_dir.name}-{stamp}-{sha}-{n}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    out_dir.rename(dest)
    entry = run.stage_info(stage) or {}
    entry = entry if entry.get("config") == out_dir.name else {}  # the manifest's entry is this config's
    record = {"config": out_dir.name, "path": str(dest.relative_to(run.path)), "identity": sha,
              "moved_at": _now(), "stage": stage, "manifest_entry": entry}
    atomic_write_text(dest / "manifest_entry.json", json.dumps(record, indent=2) + "\n")

    def put(m: dict[str, Any]) -> None:
        m.setdefault("superseded_training", []).append(record)

    run.update_manifest(put)
    return dest


# --------------------------------------------------------------------------------------------
# Losses from the trainer's own state


def trainer_state(out_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest trainer state under `out_dir`: the root one (if the backend saved one) or the newest
    complete checkpoint's, whichever reached the higher step (the root one on a tie: it also holds
    the end-of-training summary)."""
    candidates: list[tuple[int, int, dict[str, Any], Path]] = []
    root = _state(out_dir)
    if root is not None:
        candidates.append((int(root.get("global_step") or 0), 1, root, out_dir / STATE_FILE))
    for step, p in complete_checkpoints(out_dir):
        state = _state(p)
        if state is not None:
            candidates.append((step, 0, state, p / STATE_FILE))
    if not candidates:
        return None
    _, _, state, path = max(candidates, key=lambda c: (c[0], c[1]))
    return state, path


def _num(v: Any) -> float | None:
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def rows_from_log_history(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(loss rows in loss.csv's columns, the end-of-training summary) from HF's `log_history`."""
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for entry in history:
        if not isinstance(entry, dict):
            continue
        for k, v in entry.items():  # Axolotl logs device memory per step: keep the peak of each
            if k.startswith("memory/") and _num(v) is not None:
                summary[k] = max(summary.get(k) or 0.0, _num(v) or 0.0)
        if "train_runtime" in entry:
            summary.update({k: _num(v) for k, v in entry.items()})
        elif "loss" in entry:
            rows.append({"step": entry.get("step"), "epoch": _num(entry.get("epoch")), "loss": _num(entry["loss"]),
                         "eval_loss": None, "grad_norm": _num(entry.get("grad_norm")),
                         "learning_rate": _num(entry.get("learning_rate")), "kind": "train"})
        elif "eval_loss" in entry:
            rows.append({"step": entry.get("step"), "epoch": _num(entry.get("epoch")), "loss": None,
                         "eval_loss": _num(entry["eval_loss"]), "grad_norm": None, "learning_rate": None,
                         "kind": "eval"})
    return rows, summary


def recorded_losses(out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], Path]:
    """(loss rows, summary, trainer state, its path); NoLossRecorded when the trainer recorded no loss."""
    found = trainer_state(out_dir)
    if found is None:
        raise NoLossRecorded(f"the trainer left no {STATE_FILE} in {out_dir} or its checkpoints: no loss was "
                             "recorded, so this run cannot be trusted as trained")
    state, path = found
    rows, summary = rows_from_log_history(state.get("log_history") or [])
    if not any(r["kind"] == "train" and r["loss"] is not None for r in rows):
        raise NoLossRecorded(f"{path}: the trainer recorded no training loss (global_step "
                             f"{state.get('global_step')}, log_history has {len(state.get('log_history') or [])} "
                             "entries): it ran no logged optimizer step")
    return rows, summary, state, path
