from stepwise.docs_gen import BEGIN, END, render
from tests.conftest import REPO


def test_readme_recipe_reference_matches_schema():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == render(), "README recipe reference is stale: run `python -m stepwise.docs_gen`"


def test_readme_opens_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```", 2)[1]
    assert first_block.strip().splitlines() == ["make demo", "make test"]
