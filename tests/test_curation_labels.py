"""Gold labels not spelled as in task.classes (a typo, another case) stop `stepwise validate` and
`stepwise curate` with exit 2, naming the file, line and label with "did you mean"; an entry in
task.label_aliases is the explicit way to accept a spelling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stepwise.curation.fixtures import simulated_responses, write_responses
from stepwise.curation.labels import suggestion
from typer.testing import CliRunner

from stepwise.cli import app
from stepwise.recipe import load_recipe
from stepwise.rundir import create_run

REPO = Path(__file__).resolve().parent.parent


def _relabel(path: Path, changes: dict[int, str]) -> None:
    """Set the label of the given 1-based lines."""
    lines = path.read_text().splitlines()
    for n, label in changes.items():
        row = json.loads(lines[n - 1])
        row["label"] = label
        lines[n - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def _example(tmp_path: Path) -> Path:
    dst = tmp_path / "support-tickets"
    shutil.copytree(REPO / "examples" / "support-tickets", dst, ignore=shutil.ignore_patterns("runs", "*.sqlite*"))
    return dst


def test_misspelt_gold_labels_exit_2_at_validate_naming_file_line_and_label(tmp_path):
    ex = _example(tmp_path)
    _relabel(ex / "data" / "test.jsonl", {3: "Lost_or_stolen_card", 7: "Lost_or_stolen_card"})
    _relabel(ex / "data" / "tickets.jsonl", {5: "card_arival", 6: "stolen_card"})  # stolen_card: an alias
    runner = CliRunner()
    res = runner.invoke(app, ["validate", str(ex / "recipe.yaml")])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert (f"{ex / 'data' / 'test.jsonl'}:3: label (label) 'Lost_or_stolen_card' is not one of task.classes "
            "(did you mean 'lost_or_stolen_card'?") in out
    assert "2 rows carry it (lines 3, 7)" in out
    assert f"{ex / 'data' / 'tickets.jsonl'}:5: label (label) 'card_arival'" in out
    assert "did you mean 'card_arrival'?" in out
    assert "'stolen_card'" not in out  # an alias key is a known spelling

    # the explicit way: aliases for both spellings make the same files valid
    recipe = ex / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(
        "    lost_card: lost_or_stolen_card\n",
        "    lost_card: lost_or_stolen_card\n    Lost_or_stolen_card: lost_or_stolen_card\n"
        "    card_arival: card_arrival\n"))
    res = runner.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output


def test_curate_refuses_misspelt_gold_labels(tmp_path):
    ex = _example(tmp_path)
    recipe = load_recipe(ex / "recipe.yaml")
    run = create_run(recipe, tmp_path / "run")
    write_responses(run.path, simulated_responses(recipe, limit=40))
    _relabel(ex / "data" / "test.jsonl", {2: "Lost_Or_Stolen_Card"})
    res = CliRunner().invoke(app, ["curate", str(ex / "recipe.yaml"), "--run-dir", str(run.path)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "test.jsonl:2: label (label) 'Lost_Or_Stolen_Card'" in out and "did you mean 'lost_or_stolen_card'?" in out
    assert json.loads((run.path / "manifest.json").read_text())["stages"]["curate"]["status"] == "failed"

    # the gold a response row carries is checked too, named by its input file and line
    _relabel(ex / "data" / "test.jsonl", {2: "lost_or_stolen_card"})
    rows = simulated_responses(recipe, limit=40)
    rows[4]["gold"] = "Balance"
    write_responses(run.path, rows)
    res = CliRunner().invoke(app, ["curate", str(ex / "recipe.yaml"), "--run-dir", str(run.path)])
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and f"tickets.jsonl:{rows[4]['source']['line']}: label (label) 'Balance'" in out


def test_suggestion_prefers_a_spelling_match_then_the_closest_class():
    classes = ["card_arrival", "exchange_rate", "balance"]
    assert suggestion("Balance", classes, {}) == "balance"
    assert suggestion("card arrival", classes, {}) == "card_arrival"
    assert suggestion("exchange_rates", classes, {}) == "exchange_rate"
    assert suggestion("Payments", classes, {"payments": "balance"}) == "balance"
    assert suggestion("weather_forecast", classes, {}) is None
