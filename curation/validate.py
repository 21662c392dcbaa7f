"""Step 1: parse and validate teacher outputs per task type, and check rationales.

- classification: the label must be one of the classes after normalisation and the alias map
  (the shared `stepwise.pipelines.parsing.LabelMatcher`); agreement with gold is teacher accuracy, and
  (`curation.on_gold_mismatch: drop`) a row whose teacher label contradicts gold is dropped,
  since its rationale argues for a wrong answer. With `rationalize` (either task type) the row's
  `rationalization` (the teacher explaining the gold answer, asked by curate before this step,
  `stepwise.curation.rationalization`) takes the teacher's place when its answer is the gold one,
  and its rationale goes through the checks below, plus one of its own: it must say more than
  the hint and the answer (`rationale_restates_hint`); a failure is rejected as `rationalize_*` /
  `rationalized_<check>`. Kept rows record `rationale_source` (`teacher` or `rationalized`).
- structured JSON: must parse; for `validator: opensearch_query_dsl` it must validate against the
  vendored OpenSearch spec (`stepwise.curation.dsl_schema`), the failing JSON path in the detail. A bare
  query clause is wrapped as `{"query": ...}` first (`dsl_schema.wrap_bare_query`, the repair
  eval applies too), noted in the row's `checks.repaired` and counted in the funnel's `repaired`.
  Answers are canonicalised (sorted keys) so later steps compare meaning, not formatting.
- rationales (DSS format): present, within length bounds, not a copy of the input, and not
  arguing for another label (classification: the last class it names, unless negated, must be
  the answer; JSON: an object it quotes must equal the answer).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

from stepwise.curation.funnel import Rejection, StepOutcome
from stepwise.curation.text import normalize, split_input, words
from stepwise.pipelines.parsing import LabelMatcher
from stepwise.pipelines.prompts import RATIONALIZE_HINT

from stepwise.io import canonical_json
from stepwise.recipe import Recipe, TaskSpec

_NEGATION = re.compile(r"\b(not|no|never|isn't|isnt|rather than|instead of|unlike|nor|than)\W+(\w+\W+){0,2}$")


# words a restated hint uses besides the hint template's own ("The intended/right label is X.")
_HINT_WORDS = frozenset({"a", "an", "intended", "right", "label", "so", "therefore", "thus", "hence", "it", "that"})


def _class_patterns(task: TaskSpec) -> list[tuple[str, re.Pattern[str]]]:
    forms: dict[str, set[str]] = {c: {c, c.replace("_", " "), c.replace("-", " ")} for c in task.label_set}
    for alias, target in task.label_aliases.items():
        forms.setdefault(target, set()).update({alias, alias.replace("_", " ")})
    out = []
    for cls, fs in forms.items():
        alts = "|".join(re.escape(f.lower()) for f in sorted(fs, key=len, reverse=True) if f.strip())
        out.append((cls, re.compile(rf"(?<![\w])({alts})(?![\w])")))
    return out


def argued_label(rationale: str, patterns: list[tuple[str, re.Pattern[str]]]) -> str | None:
    """The class the rationale concludes with: the last class named without a negation before it."""
    text = rationale.lower()
    best: tuple[int, str] | None = None
    for cls, pat in patterns:
        for m in pat.finditer(text):
            if _NEGATION.search(text[max(0, m.start() - 40) : m.start()]):
                continue
            if best is None or m.start() > best[0]:
                best = (m.start(), cls)
    return best[1] if best else None


def _json_objects(text: str) -> list[Any]:
    """JSON objects quoted in a text (balanced-brace scan)."""
    out, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0 and start is not None:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(text[start : i + 1]))
    return out


def copies_input(rationale: str, input_text: str) -> bool:
    r, i = normalize(rationale), normalize(input_text)
    if not r or not i:
        return False
    if r == i or (r in i and len(r) >= 0.5 * len(i)):
        return True
    rw, iw = set(r.split()), set(i.split())
    return len(rw) >= 3 and len(rw & iw) / len(rw | iw) >= 0.9


class Validator:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.task = recipe.task
        self.cur = recipe.curation
        self.fmt = recipe.teacher.format
        if self.task.is_classification:
            self.matcher = LabelMatcher(self.task.label_set, self.task.label_aliases)
            self.patterns = _class_patterns(self.task)
        self.gold_total = 0
        self.gold_correct = 0
        self.parsed = 0
        self.repaired: dict[str, int] = {}  # repair -> rows kept with it (the funnel's `repaired`)
        # on_gold_mismatch: rationalize -> `kept` or the reason each rationalized row was rejected
        self.rationalize_outcomes: Counter[str] = Counter()

    def check(self, row: dict[str, Any]) -> Rejection | None:
        """Validate one row in place (canonical label, `checks`); a Rejection when it fails."""
        checks: dict[str, Any] = dict(row.get("checks") or {})
        row["checks"] = checks
        status = row.get("parse_status")
        if status != "ok" and not (status == "missing_rationale" and self.fmt == "label_only"):
            detail = row.get("parse_detail") or row.get("error")
            return Rejection(row, status or "missing_parse_status", detail)
        label, rej = self._label(row)
        if rej:
            return rej
        row["label"] = label
        self.parsed += 1
        rationalized = False
        if row.get("gold") is not None:
            agrees = self._agrees_with_gold(label, row["gold"])
            checks["gold_agrees"] = agrees  # the teacher's own answer: teacher accuracy
            self.gold_total += 1
            self.gold_correct += int(agrees)
            if not agrees and self.cur.on_gold_mismatch == "rationalize":
                label, rej = self._rationalized(row, label)
                if rej:
                    self.rationalize_outcomes[rej.reason] += 1
                    return rej
                rationalized = True
            elif not agrees and self.task.is_classification and self.cur.on_gold_mismatch == "drop":
                return Rejection(row, "disagrees_with_gold", f"teacher said '{label}', gold is '{row['gold']}'")
        if self.fmt == "dss":
            rej = self.rationalized_rationale(row, label) if rationalized else self._rationale(row, label)
            if rej:
                if rationalized:  # its own reason in the funnel: the teacher could not explain the gold answer
                    rej.reason = f"rationalized_{rej.reason}"
                    rej.detail = f"{rej.detail} (rationalized toward the gold answer)"
                    self.rationalize_outcomes[rej.reason] += 1
                return rej
            row.setdefault("rationale_source", "teacher")
        if rationalized:
            self.rationalize_outcomes["kept"] += 1
        agreement = row.get("agreement")
        # self-consistency measured the teacher's own label; a rationalized row's label is the gold one
        if agreement is not None and agreement < self.cur.min_agreement and not rationalized:
            return Rejection(row, "low_agreement", f"self-consistency {agreement:.2f} < {self.cur.min_agreement:g}")
        checks["valid"] = True
        for fix in checks.get("repaired") or []:
            self.repaired[fix] = self.repaired.get(fix, 0) + 1
        return None

    def _label(self, row: dict[str, Any]) -> tuple[Any, Rejection | None]:
        label = row.get("label")
        if self.task.is_classification:
            text = label if isinstance(label, str) else row.get("answer_text")
            matched = self.matcher.match(text) if isinstance(text, str) else None
            if matched is None:
                return None, Rejection(row, "invalid_label", f"'{str(text)[:80]}' is not one of the task's classes")
            return matched, None
        if label is None or isinstance(label, str):
            text = label if isinstance(label, str) else row.get("answer_text")
            if not isinstance(text, str) or not text.strip():
                return None, Rejection(row, "missing_answer", "no JSON answer")
            try:
                label = json.loads(text)
            except json.JSONDecodeError as exc:
                return None, Rejection(row, "invalid_json", f"{exc.msg} at line {exc.lineno} column {exc.colno}")
        if not isinstance(label, dict | list):
            return None, Rejection(row, "invalid_json", f"answer is a JSON {type(label).__name__}, not an object")
        canonical = canonical_json(label)
        label = json.loads(canonical)  # sorted keys, no formatting left
        if self.task.validator == "opensearch_query_dsl":
            from stepwise.curation.dsl_schema import BARE_QUERY_REPAIR, validate_search_body, wrap_bare_query

            label, wrapped = wrap_bare_query(label)
            problem = validate_search_body(label)
            if problem:
                if wrapped:
                    problem += " (a bare query clause, validated as {\"query\": ...})"
                return None, Rejection(row, "invalid_dsl", problem)
            if wrapped:
                row.setdefault("checks", {})["repaired"] = [BARE_QUERY_REPAIR]
        return label, None

    def _rationalized(self, row: dict[str, Any], teacher_label: Any) -> tuple[Any, Rejection | None]:
        """Swap in the row's rationalization (the teacher's explanation of the gold answer, asked by
        curate before validation, `stepwise.pipelines.rationalize`) when its answer is the gold one;
        the teacher's own answer stays in `teacher_answer`. The rationale is then checked like any."""
        rat = row.get("rationalization")
        gold = row["gold"]
        if not isinstance(rat, dict):
            return None, Rejection(row, "not_rationalized", f"teacher said '{teacher_label}', gold is '{gold}'; no "
                                   "rationalization was asked for this row")
        if rat.get("status") != "ok":
            return None, Rejection(row, f"rationalize_{rat.get('status') or 'error'}",
                                   rat.get("detail") or rat.get("error"))
        candidate = {**row, "label": rat.get("label"), "answer_text": rat.get("answer_text"), "checks": {}}
        label, rej = self._label(candidate)
        if rej is not None or not self._agrees_with_gold(label, gold):
            said = rej.detail if rej is not None else f"it answered '{answer_text(label)[:80]}'"
            return None, Rejection(row, "rationalize_wrong_answer", f"asked to explain the gold answer '{gold}', {said}")
        row["teacher_answer"] = {"label": teacher_label, "rationale": row.get("rationale"), "raw": row.get("raw")}
        row.update(label=label, answer_text=rat.get("answer_text"), rationale=rat.get("rationale"),
                   raw=rat.get("raw"), rationale_source="rationalized")
        if candidate["checks"].get("repaired"):
            row["checks"]["repaired"] = candidate["checks"]["repaired"]
        return label, None

    def _agrees_with_gold(self, label: Any, gold: Any) -> bool:
        if self.task.is_classification:
            gold_label = self.matcher.match(str(gold))
            return gold_label == label
        if isinstance(gold, str):
            try:
                gold = json.loads(gold)
            except json.JSONDecodeError:
                return False
        return canonical_json(self._as_body(gold)) == canonical_json(label)

    def gold_answer(self, gold: Any) -> Any:
        """The gold label as curation keeps answers (canonical class; canonical JSON body), or None
        when it cannot be read as one."""
        if self.task.is_classification:
            return self.matcher.match(str(gold))
        if isinstance(gold, str):
            try:
                gold = json.loads(gold)
            except json.JSONDecodeError:
                return None
        if not isinstance(gold, dict | list):
            return None
        return json.loads(canonical_json(self._as_body(gold)))

    def _as_body(self, obj: Any) -> Any:
        """A quoted or gold DSL object in the form answers are kept in (bare clause wrapped)."""
        if self.task.validator != "opensearch_query_dsl":
            return obj
        from stepwise.curation.dsl_schema import wrap_bare_query

        return wrap_bare_query(obj)[0]

    def rationalized_rationale(self, row: dict[str, Any], label: Any) -> Rejection | None:
        """The checks of any rationale, plus one for an explanation asked with the answer as a hint:
        it must say more than the hint and the answer did (a 135M teacher often just echoes them)."""
        rej = self._rationale(row, label)
        if rej is not None or not self.cur.rationale.min_words_beyond_hint:
            return rej
        given = set(words(RATIONALIZE_HINT.format(answer=""))) | _HINT_WORDS
        given |= set(words(answer_text(label))) | set(words(answer_text(label).replace("_", " ")))
        own = [w for w in words(row["rationale"]) if w not in given]
        if len(own) < self.cur.rationale.min_words_beyond_hint:
            return Rejection(row, "rationale_restates_hint", f"{len(own)} words beyond the hint and the answer "
                             f"< {self.cur.rationale.min_words_beyond_hint} (curation.rationale.min_words_beyond_hint)")
        return None

    def _rationale(self, row: dict[str, Any], label: Any) -> Rejection | None:
        spec = self.cur.rationale
        rationale = row.get("rationale")
        if not isinstance(rationale, str) or not rationale.strip():
            return Rejection(row, "missing_rationale", "DSS format needs a rationale")
        n = len(rationale.strip())
        if n < spec.min_chars:
            return Rejection(row, "rationale_too_short", f"{n} chars < {spec.min_chars}")
        if n > spec.max_chars:
            return Rejection(row, "rationale_too_long", f"{n} chars > {spec.max_chars}")
        if spec.reject_copy_of_input:
            text, _ = split_input(row.get("input"), self.task.input_fields)
            if copies_input(rationale, text):
                return Rejection(row, "rationale_copies_input", "rationale repeats the input")
        if spec.check_consistency:
            if self.task.is_classification:
                argued = argued_label(rationale, self.patterns)
                if argued is not None and argued != label:
                    return Rejection(row, "rationale_inconsistent", f"rationale argues for '{argued}', answer is '{label}'")
            else:
                for obj in _json_objects(rationale):
                    if (isinstance(obj, dict) and ("query" in obj or len(obj) > 1)
                            and canonical_json(self._as_body(obj)) != canonical_json(label)):
                        return Rejection(row, "rationale_inconsistent", "rationale quotes a JSON body that differs from the answer")
        return None

    def teacher_accuracy(self) -> dict[str, Any]:
        return {
            "rows_with_gold": self.gold_total,
            "agree": self.gold_correct,
            "accuracy": round(self.gold_correct / self.gold_total, 4) if self.gold_total else None,
            "metric": "label accuracy" if self.task.is_classification else "canonical JSON exact match",
        }


def answer_text(label: Any) -> str:
    return label if isinstance(label, str) else canonical_json(label)


def gold_mismatches(recipe: Recipe, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Any]]:
    """(row, gold answer) for each parsed row whose teacher answer contradicts its gold label, the
    gold answer in the form curation keeps answers in (canonical label / canonical JSON body): the
    rows `on_gold_mismatch: rationalize` asks the teacher about. Rows are not changed."""
    v = Validator(recipe)
    out = []
    for row in rows:
        if row.get("gold") is None or row.get("parse_status") != "ok":
            continue
        label, rej = v._label({**row, "checks": {}})
        if rej is not None or v._agrees_with_gold(label, row["gold"]):
            continue
        gold = v.gold_answer(row["gold"])
        if gold is not None:
            out.append((row, gold))
    return out


def validate_step(rows: list[dict[str, Any]], recipe: Recipe) -> StepOutcome:
    v = Validator(recipe)
    kept, rejected = [], []
    for row in rows:
        rej = v.check(row)
        if rej:
            rejected.append(rej)
        else:
            kept.append(row)
    info: dict[str, Any] = {"teacher_accuracy": v.teacher_accuracy()}
    if recipe.curation.on_gold_mismatch == "rationalize":
        info["rationalized"] = dict(sorted(v.rationalize_outcomes.items()))
    if v.repaired:
        info["repaired"] = dict(sorted(v.repaired.items()))
    return StepOutcome(kept, rejected, info=info)


def _opensearch_answer(answer: Any) -> str | None:
    from stepwise.curation.dsl_schema import validate_search_body, wrap_bare_query

    # a bare query is first wrapped as {"query": ...}, the repair curation applies to answers
    return validate_search_body(wrap_bare_query(answer)[0])


# `task.validator` -> the check of one structured answer as curation accepts it: None when valid,
# else the error. The one table of schema validators: eval's schema-validity score looks its
# validator up here. A new validator is a function here plus its name in TaskSpec.validator.
SCHEMA_VALIDATORS: dict[str, Callable[[Any], str | None]] = {"opensearch_query_dsl": _opensearch_answer}
