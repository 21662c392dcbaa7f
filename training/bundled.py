"""The committed example configs in `axolotl_configs/<recipe>/`, regenerated and diffed by the tests.

They are generated without reading any data (`use_data=False`), with paths relative to the
repository root pointing at each recipe's latest run (`examples/<x>/runs/<recipe>/latest/export/`),
so the files are identical on every machine, with or without runs. Regenerate with
`python -m stepwise.training.bundled` (or `stepwise configs <recipe> --no-data` from the repository root).
"""

from __future__ import annotations

import sys
from pathlib import Path

from stepwise.training.backends import generate_configs

from stepwise.recipe import load_recipe

BUNDLED_RECIPES = ("examples/support-tickets/recipe.yaml", "examples/nl2dsl/recipe.yaml")


def bundled_configs(repo: Path) -> dict[Path, str]:
    """Output path (relative to the repo) -> file text, for every bundled example."""
    out: dict[Path, str] = {}
    for rel in BUNDLED_RECIPES:
        recipe = load_recipe(repo / rel)
        for gc in generate_configs(recipe, use_data=False, relative_to=repo, recipe_label=rel):
            out[Path("axolotl_configs") / recipe.name / f"{gc.name}.yaml"] = gc.text()
    return out


def main(argv: list[str] | None = None) -> int:
    from stepwise.io import atomic_write_text

    repo = Path(argv[0] if argv else ".").resolve()
    for rel, text in bundled_configs(repo).items():
        atomic_write_text(repo / rel, text)
        print(rel)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
