"""Evaluation: did the student learn the task, and did it forget what it knew?

- `stepwise.evals.classification`, `stepwise.evals.structured`: task metrics on parsed student answers.
- `stepwise.evals.stats`: bootstrap confidence intervals and paired comparisons of two runs.
- `stepwise.evals.forgetting`: lm-eval on bundled benchmark subsets, before vs after, and the gate.
- `stepwise.evals.task_eval`: generation on the held-out test split + the contamination guard.
- `stepwise.evals.compare`: side-by-side tables and charts of runs.
"""
