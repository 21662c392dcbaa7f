"""The DSS prompt task as a distilabel `Task`, for runs inside distilabel pipelines (e.g. on Ray).

`format_input` renders the DSS prompt (system instructions + format, task instructions, few-shot
turns, the input) with `stepwise.pipelines.prompts`; `format_output` parses with `stepwise.pipelines.parsing` into
rationale / label / parse_status. `process` is overridden so that, row by row, a cached response is
reused, a new one is committed to our SQLite cache as soon as it arrives, and a failure stays that
row's error: distilabel's default `process` hands the whole batch to `generate_outputs`, where a
single failure turns every row of the batch into None. Before a row is sent, its worst-case cost is
booked in the cache's ledger against `max_cost` (shared by all workers through SQLite); a row the
cap refuses is not sent and comes out `not_run`.
"""


import asyncio
from typing import Any

from distilabel.steps import StepInput
from distilabel.steps.tasks import Task
from pydantic import PrivateAttr
from stepwise.pipelines.cache import ResponseCache
from stepwise.pipelines.parsing import parse_answer
from stepwise.pipelines.prompts import build_messages

from stepwise.recipe import TaskSpec


class DSSTask(Task):
    """Rows carry `input` (the task's input fields) and `cache_key`; outputs are parsed DSS fields."""

    task_spec: dict[str, Any]
    teacher_format: str = "dss"
    cache_path: str | None = None
    generation_kwargs: dict[str, Any] = {}
    price_per_1k: tuple[float, float] = (0.0, 0.0)
    max_cost: float | None = None
    budget_prior: float = 0.0  # the ledger's spend on these inputs by earlier runs
    budget_session: str | None = None

    _spec: TaskSpec | None = PrivateAttr(None)
    _cache: ResponseCache | None = PrivateAttr(None)

    def load(self) -> None:
        super().load()
        self._spec = TaskSpec.model_validate(self.task_spec)
        if self.cache_path:
            self._cache = ResponseCache(self.cache_path)

    def unload(self) -> None:
        if self._cache is not None:
            self._cache.close()
        super().unload()

    @property
    def inputs(self) -> list[str]:
        return ["input", "cache_key"]

    @property
    def outputs(self) -> list[str]:
        return ["rationale", "label", "parse_status", "raw", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        assert self._spec is not None
        return build_messages(self._spec, input["input"], self.teacher_format)

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self._spec is not None
        parsed = parse_answer(output, self._spec, self.teacher_format)
        return {"rationale": parsed.rationale, "label": parsed.label, "parse_status": parsed.parse_status, "raw": output}

    def process(self, inputs: StepInput):  # type: ignore[override]
        if _is_async(self.llm):  # the LLM's own loop: its HTTP client is bound to it
            results = self.llm.event_loop.run_until_complete(self._process_rows(inputs))
        else:
            results = self._process_sync(inputs)
        yield [{**row, **out, "model_name": self.llm.model_name} for row, out in zip(inputs, results, strict=True)]

    def _price(self, itok: int, otok: int) -> float:
        return (itok * self.price_per_1k[0] + otok * self.price_per_1k[1]) / 1000.0

    def _cached(self, key: str) -> str | None:
        entry = self._cache.get(key) if self._cache else None
        return entry.text if entry and entry.status == "ok" else None

    def _book(self, row: dict[str, Any]) -> bool:
        """Reserve the row's worst case in the ledger; False when the cap would be passed."""
        if self._cache is None or self.budget_session is None:
            return True
        return self._cache.reserve(row["cache_key"], row.get("base_key") or row["cache_key"],
                                   float(row.get("worst_case_cost") or 0.0), self.budget_session,
                                   cap=self.max_cost, prior=self.budget_prior)

    def _kwargs(self, row: dict[str, Any]) -> dict[str, Any]:
        """A re-ask of a malformed answer carries a fresh sample seed."""
        if not row.get("attempt"):
            return self.generation_kwargs
        if _is_async(self.llm):
            extra = {**(self.generation_kwargs.get("extra_body") or {}), "seed": row["seed"]}
            return {**self.generation_kwargs, "extra_body": extra}
        return {**self.generation_kwargs, "seed": row["seed"]}

    def _commit(self, row: dict[str, Any], output: dict[str, Any]) -> str:
        key = row["cache_key"]
        text = output["generations"][0]
        stats = output.get("statistics") or {}
        itok = int((stats.get("input_tokens") or [0])[0] or 0)
        otok = int((stats.get("output_tokens") or [0])[0] or 0)
        if self._cache is not None and text is not None:
            self._cache.put_ok(key, text, itok, otok, self._price(itok, otok), self.llm.model_name,
                               base_key=row.get("base_key"), session=self.budget_session)
        elif self._cache is not None and self.budget_session:
            self._cache.release(key, self.budget_session)
        return text

    def _fail(self, row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
        key = row["cache_key"]
        if self._cache is not None:
            if self.budget_session:
                self._cache.release(key, self.budget_session)
            self._cache.put_error(key, f"{type(exc).__name__}: {str(exc)[:500]}", self.llm.model_name)
        return {"rationale": None, "label": None, "parse_status": "error", "raw": None}

    @staticmethod
    def _refused() -> dict[str, Any]:
        return {"rationale": None, "label": None, "parse_status": "not_run", "raw": None}

    async def _process_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        async def one(row: dict[str, Any]) -> dict[str, Any]:
            key = row["cache_key"]
            hit = self._cached(key)
            if hit is not None:
                return self.format_output(hit, row)
            if not self._book(row):
                return self._refused()
            try:
                output = await self.llm.agenerate(input=self.format_input(row), num_generations=1,
                                                  **self._kwargs(row))
                return self.format_output(self._commit(row, output), row)
            except Exception as exc:  # noqa: BLE001 - this row's failure only
                return self._fail(row, exc)

        return list(await asyncio.gather(*(one(r) for r in rows)))

    def _process_sync(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            key = row["cache_key"]
            hit = self._cached(key)
            if hit is not None:
                out.append(self.format_output(hit, row))
                continue
            if not self._book(row):
                out.append(self._refused())
                continue
            try:
                output = self.llm.generate(inputs=[self.format_input(row)], num_generations=1, **self._kwargs(row))[0]
                out.append(self.format_output(self._commit(row, output), row))
            except Exception as exc:  # noqa: BLE001
                out.append(self._fail(row, exc))
        return out


def _is_async(llm: Any) -> bool:
    from distilabel.models.llms.base import AsyncLLM

    return isinstance(llm, AsyncLLM)
