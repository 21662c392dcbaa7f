"""Evaluation: did the student learn the task, and did it forget what it knew?

- `evals.classification`, `evals.structured`: task metrics on parsed student answers.
- `evals.stats`: bootstrap confidence intervals and paired comparisons of two runs.
- `evals.forgetting`: lm-eval on bundled benchmark subsets, before vs after, and the gate.
- `evals.task_eval`: generation on the held-out test split + the contamination guard.
- `evals.compare`: side-by-side tables and charts of runs.
"""
