"""`stepwise run`: the stages in sequence, each the same function its own command runs.

Each `Stage` declares what it reads and writes: the recipe sections (`sections`, or single settings
of a section, `fields`), the files it reads (`inputs`) and the files or folders it writes
(`outputs`), all named through the run's `RunLayout` (stepwise.layout).
tests/test_stage_declarations.py runs the stages with a recipe view that records which sections
they touch and checks both against these declarations.

A stage is skipped when its fingerprint (the recipe sections it reads + the sha256 of its input
files + the run options it depends on) equals the one recorded when it last finished, and its
outputs are still there. Any upstream change changes the downstream inputs, so it cascades.
Each stage has its own exit code so a pipeline step can tell which one failed.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.io import atomic_write_json, canonical_json, sha256_file, sha256_text
from stepwise.layout import SPLITS, RunLayout
from stepwise.recipe import Recipe
from stepwise.rundir import STAGES, RunDir

# exit codes: 0 ok, 2 bad input, 3 stopped by a limit / waiting for reviewers, 4 forgetting gate,
# 10 + stage number for a stage that failed (generate=11 ... report=18, package=19)
STAGE_EXIT = {name: 11 + i for i, name in enumerate(STAGES)}


class StageStopped(Exception):
    """A stage ended early on purpose (cost cap, reviewers still working): exit 3, resumable."""


class GateFailed(Exception):
    """The forgetting gate failed, or was configured and measured nothing: exit 4 (after the
    report is written). `status` is the stage's status in the run summary."""

    def __init__(self, detail: str, status: str = "gate_failed"):
        super().__init__(detail)
        self.status = status


@dataclass
class RunOptions:
    offline: bool = False
    review: str | None = None  # override recipe.review.mode
    accept_pending: bool = False  # pull with rows still pending: they train with the teacher's answer
    cpu: bool = False
    max_steps: int | None = None
    from_stage: str | None = None
    until_stage: str | None = None
    force: bool = False
    progress: bool = True
    max_cost: float | None = None
    retry_unparsed: bool = True  # ask malformed teacher answers again (--no-retry-unparsed: keep them)


@dataclass
class StageOutcome:
    stage: str
    status: str  # done | skipped | failed | stopped | not_run | gate_failed
    wall_s: float = 0.0
    detail: str = ""


@dataclass
class RunSummary:
    run: RunDir
    outcomes: list[StageOutcome] = field(default_factory=list)
    exit_code: int = 0


@dataclass
class Stage:
    name: str
    sections: tuple[str, ...]
    inputs: Callable[[Recipe, RunDir], list[Path]]
    run: Callable[[Recipe, RunDir, RunOptions], str]
    options: Callable[[RunOptions], Any] = lambda o: None
    # work left over although the inputs did not change (e.g. teacher requests still owed): a
    # reason to run the stage again instead of skipping it, or None
    owed: Callable[[Recipe, RunDir, RunOptions], str | None] = lambda r, run, o: None
    # the files (or folders, for a trained model) the stage writes inside the run
    outputs: Callable[[RunLayout], list[Path]] = lambda lay: []
    # single settings read from sections not in `sections` ("section.field"): only these are in the
    # fingerprint, so other settings of that section do not re-run the stage
    fields: tuple[str, ...] = ()


# -- stage bodies ------------------------------------------------------------------------------


def _generate(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.pipelines.generate import run_generate

    res = run_generate(recipe, run, offline=opts.offline, max_cost=opts.max_cost, progress=opts.progress,
                       retry_unparsed=opts.retry_unparsed)
    if res.stopped_reason:
        raise StageStopped(res.stopped_reason)
    held = f", held out for test {res.extra['held_out']} (not sent)" if res.extra.get("held_out") else ""
    return ", ".join(f"{k} {v}" for k, v in sorted(res.status_counts.items())) + held


def _curate(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.curation.curate import TooFewTrainRows, run_curate
    from stepwise.curation.rationalization import RationalizeStopped

    try:
        funnel = run_curate(recipe, run, offline=opts.offline, max_cost=opts.max_cost, progress=opts.progress,
                            retry_unparsed=opts.retry_unparsed)
    except (TooFewTrainRows, RationalizeStopped) as exc:  # a weak teacher is named here; a cap stop resumes
        raise StageStopped(str(exc)) from None
    kept = funnel.get("kept") or {}
    detail = ", ".join(f"{k} {v}" for k, v in kept.items()) + f", rejected {funnel.get('rejected', 0)}"
    rat = funnel.get("rationalize")
    if rat:
        detail += f", rationalized {sum(rat['in_splits'].values())} of {rat['requested']} gold mismatches"
    return detail


def _curate_owed(recipe: Recipe, run: RunDir, opts: RunOptions) -> str | None:
    from stepwise.curation.rationalization import owed_rationalizations

    n = owed_rationalizations(recipe, run, offline=opts.offline, retry_unparsed=opts.retry_unparsed)
    return f"{n} rationalization requests still owed" if n else None


def _review(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.review import stage as rv

    # What was pushed decides how it is pulled: once this run pushed rows to Argilla, a recipe
    # that says `review.mode: auto` still pulls the reviewers' work; only an explicit `--review
    # auto` accepts without it, and says so.
    pushed = run.layout.review_push
    mode = opts.review or ("argilla" if pushed.exists() else recipe.review.mode)
    if mode == "auto":
        summary = rv.review_auto(recipe, run)
        detail = f"auto-accepted {summary['counts']['auto_accepted']} rows"
        if pushed.exists():
            detail += f" (--review auto: the reviews in Argilla recorded by {pushed} are NOT used)"
        return detail
    if not pushed.exists():
        report = rv.push(recipe, run)
        raise StageStopped(f"pushed {getattr(report, 'sent', '?')} records to Argilla for review; when reviewers are "
                           f"done run `stepwise run {recipe.source_path} --from review` to pull")
    try:
        summary = rv.pull(recipe, run, accept_pending=opts.accept_pending, offline=opts.offline, max_cost=opts.max_cost)
    except rv.ReviewPending as exc:
        fresh = exc.progress.get("never_pushed")
        if fresh:  # curation ran again after the push: its new rows go to the reviewers first
            report = rv.push(recipe, run)
            raise StageStopped(f"pushed {fresh} curated rows Argilla had not seen (curation changed after the "
                               f"last push; {report.sent} records sent, earlier reviews kept); when reviewers are "
                               f"done run `stepwise run {recipe.source_path} --from review` to pull") from None
        raise StageStopped(f"review: {exc}") from None
    c = summary["counts"]
    return (f"{c['submitted']} submitted ({c['corrected']} corrected, {c['rationale_dropped_after_correction']} "
            f"rationales dropped), {c['discarded']} discarded, {c['pending']} pending, "
            f"{c['reviewed_rows']} rows to export")


def _export(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.curation.export import run_export

    summary = run_export(recipe, run)
    return ", ".join(f"{k} {v}" for k, v in (summary.get("counts") or summary).items() if isinstance(v, int | float))


def _configs(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.training.configs_stage import OPENAI_NOTE, write_checked_configs

    # the same function as `stepwise configs --run-dir`: a failed check fails the stage (ConfigsFailed)
    outcome = write_checked_configs(recipe, run=run, relative_to=Path.cwd())
    if outcome.backend == "openai":
        return OPENAI_NOTE
    return f"{len(outcome.paths)} configs, training {outcome.train_config}"


def _train(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.training.backends import get_backend, train

    if get_backend(recipe.training.backend).hosted:  # openai: a provider's job from the recipe, no config
        return _train_openai(recipe, run)
    import sys

    info = run.stage_info("configs") or {}
    name = info.get("train_config")
    if info.get("status") != "done" or not name:
        why = f": {info['error'].splitlines()[-1]}" if info.get("error") else ""
        raise ValueError(f"the configs stage has not finished (status {info.get('status', 'not run')}{why}): run "
                         f"`stepwise run {recipe.source_path} --from configs` (or `stepwise configs --run-dir`)")
    recorded = info.get("train_config_path")  # relative to the run; an absolute path stays itself
    config = run.path / recorded if recorded else run.layout.config_file(name)

    def on_event(kind: str, payload: Any) -> None:
        if kind == "note":  # resuming from a checkpoint, or an earlier model moved aside
            print(f"train: {payload}", file=sys.stderr, flush=True)

    result = train(config, run_dir=run.path, cpu=opts.cpu, max_steps=opts.max_steps, base_dir=Path.cwd(),
                   num_gpus=recipe.training.num_gpus, on_event=on_event)
    losses = result.train_losses  # floats, one per logged optimizer step, from the trainer state
    resumed = f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step is not None else ""
    return f"{name}: {len(losses)} steps{resumed} in {result.wall_s:.0f}s, last loss {losses[-1]:.4f}"


def _train_openai(recipe: Recipe, run: RunDir) -> str:
    """The hosted job (stepwise.training.openai_ft): resumes a recorded job; Ctrl-C cancels it (exit 3)."""
    import sys

    from stepwise.training.openai_ft import FineTuneRun

    out = FineTuneRun(recipe, run, log=lambda m: print(m, file=sys.stderr, flush=True)).execute()
    if out.status != "succeeded":
        raise StageStopped(f"fine-tuning job {out.job_id} {out.status}; recorded in {out.state_path}")
    return f"{out.fine_tuned_model} ({out.trained_tokens or '?'} trained tokens, job {out.job_id})"


def _eval(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.evals.runner import gate_summary, run_eval

    # the teacher is scored beside the student (eval.task.compare_teacher) under the run's --offline / --max-cost
    outcome = run_eval(recipe, run, log=lambda *a, **k: None, offline=opts.offline, max_cost=opts.max_cost)
    parts = []
    if outcome.task:
        head = outcome.task.get("headline") or {}
        parts.append(", ".join(f"{k} {v['value']:.3f}" if isinstance(v, dict) and "value" in v else f"{k} {v}"
                               for k, v in head.items()))
    # always say what the gate concluded: a disabled or unmeasured gate is never a silent pass
    # (the notes themselves are in the manifest; `stepwise run` prints them under its table)
    parts.append(gate_summary(outcome.gate))
    detail = "; ".join(p for p in parts if p)
    if outcome.gate_blocks:
        raise GateFailed(detail, status="not_measured" if outcome.gate_verdict == "not_measured" else "gate_failed")
    return detail


def _report(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.report import write_report

    path = write_report(recipe, run)
    return str(path)


def _package(recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    from stepwise.training.backends import get_backend
    from stepwise.training.package import run_package

    if get_backend(recipe.training.backend).hosted:  # no weights here: nothing to merge or convert
        return f"nothing to package: training.backend {recipe.training.backend} hosts the student (its weights stay with the provider)"
    res = run_package(recipe, run)  # the GGUF formats: recipe.package.gguf
    files = ", ".join(p.name for p in res.gguf.values()) or "no GGUF (package.gguf: []), so no Ollama Modelfile"
    return f"{run.layout.package_dir}: merged model, {files}, model card ({res.timings.get('total_s')}s)"


def _files(paths: Callable[[RunLayout], list[Path]]) -> Callable[[Recipe, RunDir], list[Path]]:
    """Inputs inside the run: those of `paths(run.layout)` that exist (review's output is optional)."""
    return lambda recipe, run: [p for p in paths(run.layout) if p.exists()]


def _generate_inputs(recipe: Recipe, run: RunDir) -> list[Path]:
    return [p for p in (recipe.resolve(f) for f in recipe.data.input_files) if p is not None]


def _generate_owed(recipe: Recipe, run: RunDir, opts: RunOptions) -> str | None:
    from stepwise.pipelines.generate import owed_requests

    n = owed_requests(recipe, offline=opts.offline, retry_unparsed=opts.retry_unparsed)
    return f"{n} teacher requests still owed (failed or malformed answers to ask again)" if n else None


def _curate_inputs(recipe: Recipe, run: RunDir) -> list[Path]:
    held = run.layout.held_out_test  # the gold test split generate held out (absent in older runs)
    paths = [run.layout.responses, *([held] if held.exists() else [])]
    for extra in (recipe.data.test_file, recipe.curation.general_mix.file if recipe.curation.general_mix else None):
        p = recipe.resolve(extra)
        if p is not None:
            paths.append(p)
    return paths


PIPELINE: list[Stage] = [
    # --offline only forbids new requests; it never changes outputs, so it is not in the fingerprint
    # the gold test split is held out of the inputs before any request: a changed split or seed re-splits
    Stage("generate", ("task", "data", "teacher"), _generate_inputs, _generate,
          owed=_generate_owed, outputs=lambda lay: [lay.responses, lay.held_out_test],
          fields=("curation.split", "curation.seed")),
    # curate reads teacher.format (a label_only teacher writes no rationale to check)
    # with on_gold_mismatch: rationalize it asks the teacher too (owed: requests not answered yet)
    Stage("curate", ("task", "data", "teacher", "curation"), _curate_inputs, _curate, owed=_curate_owed,
          outputs=lambda lay: [*(lay.curated(s) for s in SPLITS), lay.curate_rejected, lay.funnel]),
    # a pull checks reviewers' rewrites like curation (task, curation, teacher.format) and, with
    # review.rationalize_corrections, asks the teacher
    Stage("review", ("review", "task", "curation", "teacher"), _files(lambda lay: [lay.curated("train"), lay.curated("val")]), _review,
          lambda o: (o.review, "accept_pending") if o.accept_pending else o.review,
          # waiting for reviewers it writes progress.json (and push.json when it pushed) instead
          outputs=lambda lay: [lay.reviewed, lay.review_rejected, lay.agreement]),
    # export also writes the data's card: its sources and licences (data, curation.general_mix) and teacher
    Stage("export", ("task", "training", "data", "teacher", "curation"),
          _files(lambda lay: [lay.reviewed, lay.curated("train"), lay.curated("val")]), _export,
          outputs=lambda lay: [lay.chat("train"), lay.chat("val"), lay.lineage("train"), lay.lineage("val"),
                               lay.overlong, lay.dataset_card, lay.dataset_parquet("train"),
                               lay.dataset_parquet("val")]),
    Stage("configs", ("training",), _files(lambda lay: [lay.chat("train"), lay.chat("val")]), _configs,
          outputs=lambda lay: [lay.configs_dir]),
    Stage("train", ("training",), _files(lambda lay: [lay.chat("train"), lay.chat("val"), lay.configs_dir]), _train,
          lambda o: (o.cpu, o.max_steps), outputs=lambda lay: [lay.train_dir]),
    Stage("eval", ("eval", "training", "teacher"), _files(lambda lay: [lay.curated("test"), lay.train_dir]), _eval,
          outputs=lambda lay: [lay.eval_dir]),
    # always re-run (it reads every stage's files through the manifest), so its fingerprint decides nothing
    Stage("report", (), _files(lambda lay: [lay.manifest]), _report, outputs=lambda lay: [lay.report_html]),
    # the shippable student (merged weights, GGUF, model card): skip it with `--until report`
    Stage("package", ("task", "data", "teacher", "curation", "training", "package"),
          _files(lambda lay: [lay.train_dir, lay.chat("train"), lay.chat("val"), lay.dataset_card, lay.eval_dir]),
          _package, outputs=lambda lay: [lay.package_dir]),
]


def fingerprint(stage: Stage, recipe: Recipe, run: RunDir, opts: RunOptions) -> str:
    dump = recipe.model_dump(mode="json")
    parts = {
        "sections": {s: dump.get(s) for s in stage.sections}
                    | {f: dump.get(f.split(".")[0], {}).get(f.split(".")[1]) for f in stage.fields},
        "inputs": {str(p.relative_to(run.path)) if p.is_relative_to(run.path) else str(p):
                   _hash_path(p, run) for p in stage.inputs(recipe, run)},
        "options": stage.options(opts),
    }
    return sha256_text(canonical_json(parts))[:20]


_HASH_CACHE = ".content_hashes.json"  # in the run dir: {abs path: [size, mtime_ns, inode, sha256]}
_RACY_NS = 2_000_000_000  # files modified this recently are re-read next time (coarse fs clocks)


def _hash_path(p: Path, run: RunDir | None = None) -> str:
    """Content hash of a file or a directory (trained models: relative names + each file's sha256),
    so a retrain that writes same-sized weights still changes the fingerprint. Each file is read
    streaming; with `run`, a file whose (size, mtime, inode) is unchanged since it was last hashed
    reuses that hash from the run's cache, so a multi-GB model is read once, not on every run."""
    cache_path = run.path / _HASH_CACHE if run is not None else None
    cache: dict[str, list[Any]] = {}
    if cache_path is not None and cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}  # a damaged cache only costs a re-read
    changed = False

    def digest(f: Path) -> str:
        nonlocal changed
        st = f.stat()
        key, sig = str(f.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = cache.get(key)
        if isinstance(hit, list) and hit[:3] == sig:
            return str(hit[3])
        sha = sha256_file(f)
        # a file written within the last moments could be rewritten within the same clock tick
        if time.time_ns() - st.st_mtime_ns > _RACY_NS:
            cache[key] = [*sig, sha]
            changed = True
        return sha

    if p.is_dir():
        out = sha256_text(canonical_json([(str(f.relative_to(p)), digest(f))
                                          for f in sorted(p.rglob("*")) if f.is_file()]))
    else:
        out = digest(p)
    if changed and cache_path is not None and cache_path.parent.exists():
        atomic_write_json(cache_path, {k: v for k, v in cache.items() if Path(k).exists()})  # deleted: forgotten
    return out


def run_pipeline(recipe: Recipe, run: RunDir, opts: RunOptions,
                 on_stage: Callable[[StageOutcome], None] | None = None) -> RunSummary:
    names = [s.name for s in PIPELINE]
    start = names.index(opts.from_stage) if opts.from_stage else 0
    stop = names.index(opts.until_stage) if opts.until_stage else len(names) - 1
    summary = RunSummary(run)
    manifest = run.read_manifest()
    recorded = manifest.get("run_fingerprints", {})
    gate_failed: str | None = None
    for i, stage in enumerate(PIPELINE):
        if i < start or i > stop:
            summary.outcomes.append(StageOutcome(stage.name, "not_run"))
            continue
        fp = fingerprint(stage, recipe, run, opts)
        info = run.stage_info(stage.name) or {}
        forced = opts.force or stage.name == "report" or (opts.from_stage == stage.name)
        if not forced and recorded.get(stage.name) == fp and info.get("status") == "done" \
                and not stage.owed(recipe, run, opts):
            outcome = StageOutcome(stage.name, "skipped", 0.0, "inputs unchanged")
            if stage.name == "eval":  # the recorded gate still decides the exit code
                passed, gate_text = _gate_passed(run, recipe)
                outcome.detail = f"inputs unchanged; {gate_text}"
                if not passed:
                    gate_failed = outcome.detail
            _record_outcome(run, outcome)
            summary.outcomes.append(outcome)
            if on_stage:
                on_stage(outcome)
            continue
        t0 = time.time()
        try:
            detail = stage.run(recipe, run, opts)
            outcome = StageOutcome(stage.name, "done", time.time() - t0, detail)
            _record_fingerprint(run, stage.name, fingerprint(stage, recipe, run, opts) if stage.name != "report" else fp)
        except StageStopped as exc:
            outcome = StageOutcome(stage.name, "stopped", time.time() - t0, str(exc))
            summary.exit_code = 3
        except GateFailed as exc:
            outcome = StageOutcome(stage.name, exc.status, time.time() - t0, str(exc))
            _record_fingerprint(run, stage.name, fingerprint(stage, recipe, run, opts))
            gate_failed = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported with the stage's own exit code
            outcome = StageOutcome(stage.name, "failed", time.time() - t0, f"{type(exc).__name__}: {exc}")
            run.layout.error_log(stage.name).write_text(traceback.format_exc(), encoding="utf-8")
            summary.exit_code = STAGE_EXIT[stage.name]
        if outcome.status != "failed":  # a traceback from an earlier attempt no longer describes this stage
            run.layout.error_log(stage.name).unlink(missing_ok=True)
        _record_outcome(run, outcome)
        summary.outcomes.append(outcome)
        if on_stage:
            on_stage(outcome)
        if outcome.status in ("stopped", "failed"):
            for rest in PIPELINE[i + 1:]:
                summary.outcomes.append(StageOutcome(rest.name, "not_run"))
            break
    if gate_failed and summary.exit_code == 0:
        summary.exit_code = 4
    _refresh_report(recipe, run, summary)
    return summary


def _refresh_report(recipe: Recipe, run: RunDir, summary: RunSummary) -> None:
    """The report is rendered before package: when a stage after it ran in this invocation (done,
    skipped or failed), render the page again so it shows how that stage ended, not `pending`."""
    names = [o.stage for o in summary.outcomes]
    if "report" not in names:
        return
    at = names.index("report")
    if summary.outcomes[at].status != "done" or all(o.status == "not_run" for o in summary.outcomes[at + 1:]):
        return
    from stepwise.report import refresh_report

    try:
        refresh_report(recipe, run)
    except Exception:  # noqa: BLE001 - the page from before package stays; why it was not redrawn is kept
        run.layout.error_log("report").write_text(traceback.format_exc(), encoding="utf-8")


def _gate_passed(run: RunDir, recipe: Recipe) -> tuple[bool, str]:
    """(does not block, one-line verdict) of the gate the last eval recorded in the manifest: a
    run whose eval measured nothing it was configured to is not a pass (stepwise.evals.runner.recorded_gate)."""
    from stepwise.evals.runner import BLOCKING, gate_summary, recorded_gate

    gate = recorded_gate(run, recipe)
    return gate.get("verdict") not in BLOCKING, gate_summary(gate)


def _record_outcome(run: RunDir, outcome: StageOutcome) -> None:
    """What `stepwise run` printed for the stage (status, its wall time around the whole stage
    function, detail), kept in the manifest under `stages.<stage>.pipeline` so the report shows the
    same numbers. A later attempt of the stage (its own command) starts a fresh entry without it."""
    def put(m: dict[str, Any]) -> None:
        info = m.setdefault("stages", {}).setdefault(outcome.stage, {})
        entry = {"status": outcome.status, "wall_s": round(outcome.wall_s, 3), "detail": outcome.detail}
        if outcome.status == "skipped":  # keep what the stage took when it last ran
            prev = info.get("pipeline") or {}
            earlier = prev.get("earlier_wall_s") if prev.get("status") == "skipped" else prev.get("wall_s")
            entry["earlier_wall_s"] = earlier if earlier is not None else info.get("wall_s")
        info["pipeline"] = entry

    run.update_manifest(put)


def _record_fingerprint(run: RunDir, stage: str, fp: str) -> None:
    def put(m: dict[str, Any]) -> None:
        m.setdefault("run_fingerprints", {})[stage] = fp

    run.update_manifest(put)
