"""Review: the stage between curation and export, and its `stepwise review ...` commands.

- `stage`: push curated rows to Argilla, pull the reviews (or accept every row in `auto` mode),
  decide each row and write reviewed.jsonl / rejected.jsonl / agreement.json.
- `argilla`: the Argilla dataset settings and the record traffic (argilla SDK).
- `agreement`: inter-annotator agreement and teacher accuracy (hand-written statistics).
- `preferences`: DPO preference pairs from reviewers' corrections.
- `cli`: the `stepwise review` commands (the embedded server itself lives in
  `stepwise.argilla_embedded`, which runs in its own venv).
"""
