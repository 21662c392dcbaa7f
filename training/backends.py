"""The training backends behind one interface: `training.backend` axolotl | trl | openai (hand-written).

Each backend is a `Backend` with the same three functions, looked up in `BACKENDS` by the recipe's
`training.backend` (writing configs) or by a written config's `backend` key (checking, training;
no key = Axolotl's own YAML):

- `configs(recipe, run_dir=, use_data=, relative_to=, recipe_label=)` -> the GeneratedConfigs
  `stepwise configs` writes (openai: none; the hosted job takes the chat JSONL as it is);
- `check(cfg, label, index, profile=, num_gpus=, allow_missing_data=, base_dir=, run_axolotl=)` -> a
  CheckReport for one config (stepwise.training.checks for Axolotl, the TRL schema for trl);
- `train(config_path, run_dir=, cpu=, max_steps=, base_dir=, num_gpus=, on_event=)` -> TrainResult
  (the Axolotl launcher, the TRL child process). The openai backend trains from the recipe, not a
  config (`hosted`): stepwise.training.openai_ft.FineTuneRun, called by the pipeline and the CLI.

The backend modules share types through stepwise.training.common and never import each other or
this registry (the import contracts in pyproject check it): a new backend is a module with these
functions plus one entry below (and its name in `TrainingSpec.backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepwise.training import configgen, launcher, trl_backend
from stepwise.training.checks import check_axolotl_config
from stepwise.training.common import CheckReport, Problem, TrainResult, load_config
from stepwise.training.configgen import GeneratedConfig
from stepwise.training.dpo import dpo_generated

from stepwise.recipe import Recipe


@dataclass(frozen=True)
class Backend:
    name: str
    configs: Callable[..., list[GeneratedConfig]]
    check: Callable[..., CheckReport] | None = None
    train: Callable[..., TrainResult] | None = None
    hosted: bool = False  # trains from the recipe (a provider's job), not from a written config

    @property
    def writes_configs(self) -> bool:
        return not self.hosted


def _axolotl_configs(recipe: Recipe, *, run_dir: Path | None = None, use_data: bool = True,
                     relative_to: Path | None = None, recipe_label: str | None = None) -> list[GeneratedConfig]:
    base = Path(relative_to or Path.cwd())
    out: list[GeneratedConfig] = list(configgen.generate_axolotl_configs(
        recipe, run_dir=run_dir, use_data=use_data, relative_to=base, recipe_label=recipe_label))
    if recipe.training.dpo.enabled:
        # the recipe as written: DPO sizes its batch against the preference pairs, not the SFT rows
        out += dpo_generated(recipe, out, configgen.run_path_for(recipe, run_dir), lambda p: configgen._rel(p, base))
    return out


def _axolotl_check(cfg: dict[str, Any], label: str, index: dict[tuple[Any, ...], int], **kw: Any) -> CheckReport:
    return check_axolotl_config(cfg, label, index, **kw)


def _trl_configs(recipe: Recipe, *, run_dir: Path | None = None, use_data: bool = True,
                 relative_to: Path | None = None, recipe_label: str | None = None) -> list[GeneratedConfig]:
    return trl_backend.generate_trl_configs(recipe, run_dir=run_dir, use_data=use_data,
                                            relative_to=Path(relative_to or Path.cwd()))


def _trl_check(cfg: dict[str, Any], label: str, index: dict[tuple[Any, ...], int], *, base_dir: Path | None = None,
               allow_missing_data: bool = False, **_gpu_target: Any) -> CheckReport:
    # profile / num_gpus / run_axolotl describe an Axolotl launch; the TRL child runs one process
    return trl_backend.check_trl_config(cfg, label, index, base_dir or Path.cwd(), allow_missing_data)


def _no_configs(recipe: Recipe, **_: Any) -> list[GeneratedConfig]:
    return []


BACKENDS: dict[str, Backend] = {
    "axolotl": Backend("axolotl", configs=_axolotl_configs, check=_axolotl_check, train=launcher.train),
    "trl": Backend("trl", configs=_trl_configs, check=_trl_check, train=trl_backend.train),
    "openai": Backend("openai", configs=_no_configs, hosted=True),
}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"training.backend {name!r}: one of {', '.join(BACKENDS)}") from None


def config_backend(cfg: Any) -> Backend:
    """The backend a written config belongs to: its `backend` key (TRL's configs carry one), else Axolotl."""
    name = cfg.get("backend", "axolotl") if isinstance(cfg, dict) else "axolotl"
    backend = get_backend(str(name))
    if backend.hosted:
        raise ValueError(f"backend {name!r} trains from the recipe, not from a config file")
    return backend


def generate_configs(recipe: Recipe, *, run_dir: Path | None = None, use_data: bool = True,
                     relative_to: Path | None = None, recipe_label: str | None = None) -> list[GeneratedConfig]:
    """The configs of the recipe's `training.backend` (not yet written: configgen.write_configs)."""
    return get_backend(recipe.training.backend).configs(recipe, run_dir=run_dir, use_data=use_data,
                                                         relative_to=relative_to, recipe_label=recipe_label)


def check_config(config: dict[str, Any] | str | Path, *, profile: str | None = None, num_gpus: int | None = None,
                 allow_missing_data: bool = False, base_dir: Path | None = None,
                 run_axolotl: bool = True) -> CheckReport:
    """Every check on a config dict or file, by the backend it belongs to."""
    loaded = load_config(config)
    if isinstance(loaded, CheckReport):
        return loaded
    cfg, label, index = loaded
    if not isinstance(cfg, dict):
        return CheckReport(label, [Problem("error", "<root>", "a training config is a YAML mapping")])
    try:
        backend = config_backend(cfg)
    except ValueError as exc:
        return CheckReport(label, [Problem("error", "backend", str(exc), index.get(("backend",)))])
    assert backend.check is not None
    return backend.check(cfg, label, index, profile=profile, num_gpus=num_gpus, allow_missing_data=allow_missing_data,
                         base_dir=base_dir, run_axolotl=run_axolotl)


def read_config(config_path: Path) -> Any:
    loaded = load_config(config_path)
    return None if isinstance(loaded, CheckReport) else loaded[0]


def train(config_path: Path, *, run_dir: Path | None = None, cpu: bool = False, max_steps: int | None = None,
          base_dir: Path | None = None, num_gpus: int | None = None,
          on_event: Callable[[str, Any], None] | None = None) -> TrainResult:
    """Train one written config with the backend it belongs to; see launcher.train for `num_gpus`."""
    backend = config_backend(read_config(Path(config_path)))
    assert backend.train is not None
    return backend.train(config_path, run_dir=run_dir, cpu=cpu, max_steps=max_steps, base_dir=base_dir,
                         num_gpus=num_gpus, on_event=on_event)
