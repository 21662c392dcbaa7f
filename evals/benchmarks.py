"""The bundled forgetting benchmarks: where their data lives and how lm-eval scores them.

Each benchmark has a task YAML template in `evals/tasks/stepwise_<name>.yaml` (lm-eval's own
prompt and metric for that benchmark, `dataset_path: json`) and data in `evals/data/<folder>/`:
a deterministic 500-row subset of the full split (see evals/data/README.md). `prepare_tasks`
writes the first `subset_size` rows into a folder of the run and renders the YAMLs to point at
them, so lm-eval (`--include_path`) reads exactly the chosen subset, offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stepwise.io import atomic_write_text, sha256_text

EVALS_DIR = Path(__file__).resolve().parent
BUNDLED_DATA = EVALS_DIR / "data"
TASKS_DIR = EVALS_DIR / "tasks"


@dataclass(frozen=True)
class Benchmark:
    name: str
    folder: str  # under evals/data (and shared/data/benchmarks)
    split_file: str  # the scored split
    metric: str  # headline metric as lm-eval names it
    filter: str = "none"
    extra_files: tuple[str, ...] = ()  # copied whole (few-shot exemplars)
    fewshot: bool = True  # whether num_fewshot applies
    generative: bool = False

    @property
    def task(self) -> str:
        return f"stepwise_{self.name}"

    @property
    def template(self) -> Path:
        return TASKS_DIR / f"{self.task}.yaml"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark("mmlu", "mmlu", "test.jsonl", "acc", extra_files=("dev.jsonl",)),
        Benchmark("arc_easy", "arc_easy", "test.jsonl", "acc"),
        Benchmark("arc_challenge", "arc_challenge", "test.jsonl", "acc"),
        Benchmark("hellaswag", "hellaswag", "validation.jsonl", "acc_norm"),
        Benchmark("gsm8k", "gsm8k", "test.jsonl", "exact_match", filter="flexible-extract", generative=True),
        Benchmark("truthfulqa_mc1", "truthfulqa_mc", "validation.jsonl", "acc", fewshot=False),
    ]
}
ALIASES = {"truthfulqa": "truthfulqa_mc1", "truthfulqa_mc": "truthfulqa_mc1", "arc": "arc_easy"}


def get_benchmark(name: str) -> Benchmark:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark '{name}' (bundled: {', '.join(BENCHMARKS)})")
    return BENCHMARKS[key]


def known_benchmark_names(*, aliases: bool = True) -> list[str]:
    """Names a recipe may use: the bundled benchmarks, plus (with `aliases`) their aliases and
    data folder names (`truthfulqa_mc`), which `get_benchmark` also resolves."""
    names = list(BENCHMARKS)
    if aliases:
        names += [n for n in [*ALIASES, *(b.folder for b in BENCHMARKS.values())] if n not in names]
    return names


def check_benchmark_name(name: str, *, aliases: bool = True) -> str:
    """`name` unchanged when it names a bundled benchmark; else a ValueError with the closest
    bundled name ("did you mean") and the full list. Used by the recipe at validate time, so a typo
    is exit 2 before anything runs, not a benchmark silently left out."""
    import difflib

    allowed = known_benchmark_names(aliases=aliases)
    if isinstance(name, str) and name in allowed:
        return name
    close = difflib.get_close_matches(str(name).strip().lower(), allowed, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown benchmark '{name}'{hint}; bundled: {', '.join(known_benchmark_names(aliases=False))}")


def bundled_folder(name: str) -> str:
    """The data folder under evals/data (and shared/data/benchmarks) for a benchmark name or alias."""
    return get_benchmark(name).folder


def _read_rows(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]


@dataclass
class PreparedTask:
    benchmark: Benchmark
    yaml_path: Path
    data_file: Path
    n: int
    available: int
    fingerprint: str  # hash of the rendered YAML + data: the cache key's task part


def prepare_tasks(
    names: list[str], subset_size: int | None, num_fewshot: int, out_dir: Path, data_dir: Path | None = None,
) -> list[PreparedTask]:
    """Write subsets + rendered task YAMLs under `out_dir` (`data/`, `tasks/`); return them.

    `subset_size=None` takes every row available. `data_dir` points at full benchmark folders
    with the same layout (e.g. shared/data/benchmarks) for larger runs than the bundled 500 rows.
    """
    source = Path(data_dir) if data_dir else BUNDLED_DATA
    data_root, task_root = out_dir / "data", out_dir / "tasks"
    prepared = []
    for name in names:
        b = get_benchmark(name)
        rows = _read_rows(source / b.folder / b.split_file)
        picked = rows[: subset_size] if subset_size else rows
        data_file = data_root / b.folder / b.split_file
        _write_if_changed(data_file, "\n".join(picked) + "\n")
        for extra in b.extra_files:
            _write_if_changed(data_root / b.folder / extra, "\n".join(_read_rows(source / b.folder / extra)) + "\n")
        text = b.template.read_text(encoding="utf-8").replace("@DATA@", str(data_root.resolve()))
        if b.fewshot:
            text += f"num_fewshot: {num_fewshot}\n"
        yaml_path = task_root / f"{b.task}.yaml"
        _write_if_changed(yaml_path, text)
        fingerprint = sha256_text(json.dumps([text, picked, [(source / b.folder / e).name for e in b.extra_files]]))
        prepared.append(PreparedTask(b, yaml_path, data_file, len(picked), len(rows), fingerprint[:16]))
    return prepared


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)
