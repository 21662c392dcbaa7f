"""The configs stage: one code path for `stepwise configs` and `stepwise run`'s configs stage.

Hand-written. Generates the configs from the recipe's `training` section through its backend
(stepwise.training.backends: Axolotl, TRL; openai writes none), writes them, checks every one (the backend's check:
Axolotl's schema and ours) and, inside a run, records the `configs` stage in its manifest:
`done` with `train_config` (the config `stepwise run` trains: the one modality `auto` picks, else
the first) and its path only when every config passed. A config that fails a check fails the
stage (recorded `failed`, `ConfigsFailed` raised with the reports), so `stepwise run --from
train` never trains an unchecked config and never finds a `done` stage with nothing to train.
Without a run (`stepwise configs RECIPE`, the bundled templates) nothing is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepwise.training.backends import check_config, generate_configs, get_backend

from stepwise.recipe import Recipe
from stepwise.rundir import RunDir

OPENAI_NOTE = "training.backend openai: no configs (hosted fine-tuning takes the chat JSONL as it is)"


@dataclass
class ConfigsOutcome:
    backend: str
    configs: list[Any] = field(default_factory=list)  # GeneratedConfig
    paths: list[Path] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)  # CheckReport, one per path
    train_config: str | None = None
    train_config_path: Path | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)

    def errors(self) -> list[str]:
        return [p.format(r.label) for r in self.reports for p in r.problems if p.level == "error"]


class ConfigsFailed(Exception):
    """A generated config failed its checks; the outcome (configs, reports) goes with it."""

    def __init__(self, outcome: ConfigsOutcome):
        self.outcome = outcome
        super().__init__("generated config failed checks:\n" + "\n".join(outcome.errors()))


def pick_train_config(configs: list[Any]) -> Any:
    """The config `stepwise run` trains: the modality `auto` picks, else the first."""
    return next((gc for gc in configs if gc.auto_pick and gc.auto_pick == gc.modality), configs[0])


def write_checked_configs(
    recipe: Recipe,
    *,
    run: RunDir | None,
    out_dir: Path | None = None,
    use_data: bool = True,
    allow_missing_data: bool = False,
    relative_to: Path | None = None,
) -> ConfigsOutcome:
    """Generate, write and check the recipe's configs; inside a run, record the stage (see above).

    `out_dir` defaults to `<run>/configs/` inside a run, else `axolotl_configs/<recipe>/`.
    Raises ConfigsFailed (a check failed) or ValueError (the recipe cannot be turned into configs)."""
    outcome = ConfigsOutcome(backend=recipe.training.backend)
    if run is None:
        _generate(recipe, outcome, None, out_dir or Path("axolotl_configs") / recipe.name, use_data,
                  allow_missing_data, relative_to)
        if not outcome.ok:
            raise ConfigsFailed(outcome)
        return outcome
    with run.stage("configs", inputs=[run.layout.chat("train")]) as st:
        _generate(recipe, outcome, run, out_dir or run.layout.configs_dir, use_data, allow_missing_data, relative_to)
        if not get_backend(outcome.backend).writes_configs:
            st.extra(backend=outcome.backend)
            return outcome
        st.outputs(*outcome.paths)
        st.counts(configs=len(outcome.paths))
        if not outcome.ok:  # fails the stage in the manifest (no train_config): nothing unchecked is trained
            raise ConfigsFailed(outcome)
        assert outcome.train_config_path is not None
        path = outcome.train_config_path.resolve()
        st.extra(train_config=outcome.train_config, auto_pick=outcome.configs[0].auto_pick,
                 train_config_path=str(path.relative_to(run.path.resolve()))
                 if path.is_relative_to(run.path.resolve()) else str(path))
    return outcome


def _generate(recipe: Recipe, outcome: ConfigsOutcome, run: RunDir | None, out_dir: Path, use_data: bool,
              allow_missing_data: bool, relative_to: Path | None) -> None:
    if not get_backend(outcome.backend).writes_configs:
        return
    from stepwise.training.configgen import write_configs

    base = relative_to or Path.cwd()  # the configs' relative paths are relative to it
    outcome.configs = generate_configs(recipe, run_dir=run.path if run else None, use_data=use_data, relative_to=base)
    outcome.paths = write_configs(outcome.configs, out_dir)
    outcome.reports = [check_config(path, profile=recipe.training.profile, num_gpus=recipe.training.num_gpus,
                                    allow_missing_data=allow_missing_data or not use_data, base_dir=base)
                       for path in outcome.paths]
    picked = pick_train_config(outcome.configs)
    outcome.train_config = picked.name
    outcome.train_config_path = outcome.paths[outcome.configs.index(picked)]
