"""The run layout: the one place that names the files inside a run directory (hand-written).

A run lives in `runs/<recipe-name>/<run-id>/`; every stage writes under its own folder there.
Stages, the pipeline, the report and the CLI ask a `RunLayout` for a path instead of spelling
`"curate/train.jsonl"` themselves, so a renamed file is renamed in one place, and a newcomer
finds here what each stage leaves behind.

    lay = RunLayout(run.path)        # or run.layout
    lay.curated("train")             # <run>/curate/train.jsonl
    lay.chat("val")                  # <run>/export/val.chat.jsonl

Properties only build paths; nothing here creates folders or touches the disk (a stage that
writes calls `RunDir.stage_dir(...)` for its folder, which is `layout.stage_dir(...)` created).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The splits curate writes; review and export carry train/val on (test stays for eval).
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    # -- the run itself ------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def manifest_lock(self) -> Path:
        return self.root / ".manifest.lock"

    @property
    def recipe_copy(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def error_log(self, stage: str) -> Path:
        """<stage>.error.txt: the traceback of a stage `stepwise run` saw fail."""
        return self.root / f"{stage}.error.txt"

    # -- generate ------------------------------------------------------------------------------
    @property
    def held_out_test(self) -> Path:
        """generate/held_out_test.jsonl: gold input rows held out as the test split before any
        teacher request (stepwise.curation.holdout; empty when nothing is held out)."""
        return self.stage_dir("generate") / "held_out_test.jsonl"

    @property
    def responses(self) -> Path:
        return self.stage_dir("generate") / "responses.jsonl"

    def batch_input(self, name: str) -> Path:
        """generate/batches/<name>.jsonl: one Batch API input file as uploaded (its lines' custom_ids
        are the cache keys of the requests it carries; a resume reads them back)."""
        return self.stage_dir("generate") / "batches" / f"{name}.jsonl"

    # -- curate --------------------------------------------------------------------------------
    def curated(self, split: str) -> Path:
        """curate/<split>.jsonl for split in train, val, test."""
        return self.stage_dir("curate") / f"{split}.jsonl"

    @property
    def curate_rejected(self) -> Path:
        return self.stage_dir("curate") / "rejected.jsonl"

    @property
    def funnel(self) -> Path:
        return self.stage_dir("curate") / "funnel.json"

    # -- review --------------------------------------------------------------------------------
    @property
    def reviewed(self) -> Path:
        return self.stage_dir("review") / "reviewed.jsonl"

    @property
    def review_rejected(self) -> Path:
        return self.stage_dir("review") / "rejected.jsonl"

    @property
    def agreement(self) -> Path:
        return self.stage_dir("review") / "agreement.json"

    @property
    def review_push(self) -> Path:
        return self.stage_dir("review") / "push.json"

    @property
    def review_push_errors(self) -> Path:
        return self.stage_dir("review") / "push_errors.jsonl"

    @property
    def review_progress(self) -> Path:
        return self.stage_dir("review") / "progress.json"

    # -- export (and preferences, which writes beside it) -------------------------------------
    def chat(self, split: str) -> Path:
        """export/<split>.chat.jsonl for split in train, val."""
        return self.stage_dir("export") / f"{split}.chat.jsonl"

    def lineage(self, name: str) -> Path:
        """export/<name>.lineage.jsonl: which source row each written example came from."""
        return self.stage_dir("export") / f"{name}.lineage.jsonl"

    @property
    def overlong(self) -> Path:
        return self.stage_dir("export") / "overlong.jsonl"

    def preferences(self, split: str) -> Path:
        """export/preferences.jsonl (train) or export/preferences.val.jsonl."""
        return self.stage_dir("export") / ("preferences.jsonl" if split == "train" else f"preferences.{split}.jsonl")

    # -- configs / train -----------------------------------------------------------------------
    @property
    def configs_dir(self) -> Path:
        return self.stage_dir("configs")

    def config_file(self, name: str) -> Path:
        """configs/<name>.yaml: one generated training config."""
        return self.configs_dir / f"{name}.yaml"

    @property
    def train_dir(self) -> Path:
        return self.stage_dir("train")

    def train_output(self, name: str) -> Path:
        """train/<config name>/: one training run's output (adapter, checkpoints)."""
        return self.train_dir / name

    @property
    def prepared(self) -> Path:
        return self.train_dir / "prepared"

    # -- eval ----------------------------------------------------------------------------------
    @property
    def eval_dir(self) -> Path:
        return self.stage_dir("eval")

    @property
    def task_report(self) -> Path:
        return self.eval_dir / "task.json"

    @property
    def task_predictions(self) -> Path:
        return self.eval_dir / "task_predictions.jsonl"

    @property
    def forgetting_report(self) -> Path:
        return self.eval_dir / "forgetting.json"

    @property
    def forgetting_items(self) -> Path:
        return self.eval_dir / "forgetting_items.jsonl"

    # -- package (the shippable student; the dataset card goes beside the export it describes) ---
    @property
    def package_dir(self) -> Path:
        return self.stage_dir("package")

    @property
    def package_model(self) -> Path:
        """package/model/: merged weights, tokenizer, chat template, model card (README.md)."""
        return self.package_dir / "model"

    @property
    def model_card(self) -> Path:
        return self.package_model / "README.md"

    def package_gguf(self, outtype: str) -> Path:
        """package/student-<outtype>.gguf (f16, q8_0)."""
        return self.package_dir / f"student-{outtype}.gguf"

    @property
    def modelfile(self) -> Path:
        """package/Modelfile: Ollama's recipe for the q8_0 GGUF."""
        return self.package_dir / "Modelfile"

    @property
    def serve_commands(self) -> Path:
        """package/SERVE.md: the vLLM and Ollama commands."""
        return self.package_dir / "SERVE.md"

    @property
    def dataset_card(self) -> Path:
        """export/README.md: the curated data's card (Hugging Face dataset card format)."""
        return self.stage_dir("export") / "README.md"

    def dataset_parquet(self, split: str) -> Path:
        """export/data/<split>.parquet: the `datasets`-loadable copy of a split."""
        return self.stage_dir("export") / "data" / f"{split}.parquet"

    @property
    def student_vs_teacher(self) -> Path:
        """eval/student_vs_teacher.json: accuracy, latency, cost per 1k requests and break-even of
        teacher, base and student (shape: stepwise.evals.teacher_compare's docstring)."""
        return self.eval_dir / "student_vs_teacher.json"

    @property
    def teacher_predictions(self) -> Path:
        """eval/teacher_task_predictions.jsonl: the teacher's per-item answers on the test items."""
        return self.eval_dir / "teacher_task_predictions.jsonl"


@dataclass(frozen=True)
class ExperimentLayout:
    """An experiment directory (`stepwise experiment`, stepwise.experiment): one shared run for the
    stages before training, one sub-run per grid point, the plan and the report.

        <exp>/experiment.json       the plan: the recipe, the axes, every point and its values
        <exp>/shared/               a run: generate, curate, review (shared by every point)
        <exp>/points/<point id>/    a run per point (export .. report) + point.json (its status)
        <exp>/results.json          per point: metric with CI, memory, time, teacher cost, forgetting
        <exp>/experiment.html       learning curves, alpha:rank, Pareto-best points
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def plan(self) -> Path:
        return self.root / "experiment.json"

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def points_dir(self) -> Path:
        return self.root / "points"

    def point(self, point_id: str) -> Path:
        return self.points_dir / point_id

    def point_status(self, point_id: str) -> Path:
        """points/<id>/point.json: done | failed | running, exit code, tracking run id."""
        return self.point(point_id) / "point.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def report_html(self) -> Path:
        return self.root / "experiment.html"
