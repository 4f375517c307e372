"""A policy version in ONNX Runtime and a numpy sampling loop over its KV cache.

Used by the generation service and by the trainer (export parity check, policy gate), so a
policy is checked exactly as it is served. The exported graph (``trainer/policy_export.py``)
takes ``input_ids``, ``attention_mask`` (over past and new tokens), ``position_ids`` and one past
key and value per layer, and returns the logits of the last position and the present keys and
values. Rows decode together in a :class:`DecodeBatch`:

1. **Prefill.** Jobs join in one graph call: prompts left-padded to the longest (mask 0 on
   padding, positions counted from each prompt's first real token), from an empty cache.
2. **Fan out and merge.** Each prompt's cache, mask and last logits are repeated for its ``n``
   candidates and joined to the rows already decoding (the shorter cache left-padded).
3. **Decode.** One token per row per step. A row that ends (end-of-sequence token, stop string,
   token limit) leaves the batch at once, so the others stop paying for it.

:func:`generate` runs one batch nothing joins (static batching: the trainer, the export checks,
``--batching static``); the generation service's continuous batcher
(:mod:`plaudit.services.generation.continuous`) admits new jobs between steps.

A job with a :class:`StreamSink` gets its text as it is decoded: after each step, each of its rows
hands on the new text that can no longer change (held back: an incomplete UTF-8 character, and
the last ``len(longest stop string) - 1`` characters, which may yet start a stop string), and the
rest of the final text when the row ends. The pieces of a row add up to its final text.

Sampling is numpy: temperature (0 is greedy), then top-k, then top-p, with one seeded generator
per request, so a request's completions do not depend on what it was batched with (beyond float
rounding). No torch, no transformers: tokenization is the ``tokenizers`` library.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

import jinja2
import numpy as np
import onnxruntime as ort

from plaudit.services.common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PlauditError,
)
from plaudit.services.common.onnx_runtime import OnnxModel
from plaudit.services.common.registry import GenerationConfig, ModelManifest, VersionFolder
from plaudit.services.common.textfmt import PromptFormatter, TextFormat
from plaudit.services.runtime.contract import (
    LOGITS,
    POLICY_INPUTS,
    TOKENIZER_FILE,
    past_names,
    present_names,
)

SMOKE_PROMPT = "What is the capital of France?"
_ORT_DTYPES: dict[str, type[np.floating]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}
# nucleus sampling looks at this many top tokens first; exact (falls back to a full sort)
_NUCLEUS_FIRST = 64


class FinishReason(StrEnum):
    EOS = "eos"
    STOP_STRING = "stop_string"
    LENGTH = "length"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; ``max_new_tokens`` 0 is the version's default."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class StreamSink(Protocol):
    """Where a streamed job's text goes as it is generated. Called from the generating thread
    (a batch's worker thread): implementations must be thread-safe and return at once."""

    def started(self, version: str) -> None:
        """The job's prompt was accepted and ``version`` generates it; text follows."""

    def text(self, index: int, delta: str) -> None:
        """More text of the job's completion ``index`` (0 <= index < n)."""


@dataclass(frozen=True)
class GenerateJob:
    """One request: a prompt or a conversation, and how many completions to sample; ``sink``
    (optional) receives the text while it is generated."""

    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    n: int = 1
    params: SamplingParams = SamplingParams()
    sink: StreamSink | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Candidate:
    """One completion. ``token_ids`` are the sampled ids (end-of-sequence included) where the
    engine knows them; ``count`` is the number of generated tokens where only that is known (a
    remote backend), else None."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    count: int | None = None

    @property
    def token_count(self) -> int:
        return len(self.token_ids) if self.count is None else self.count


@dataclass(frozen=True)
class GenerateResult:
    """A job's completions, the version that generated them and, where the engine knows them,
    when its first token was sampled and when its last row ended (``time.monotonic()``)."""

    completions: list[Candidate]
    version: str
    prompt_tokens: int
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(c.token_count for c in self.completions)


@dataclass
class LoadedPolicy(OnnxModel):
    """One policy version, ready to generate."""

    manifest: ModelManifest
    session: ort.InferenceSession
    formatter: PromptFormatter
    precision: str
    cache_dtype: type[np.floating]
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        gen = self.generation
        self._past = past_names(gen.num_layers)
        self._outputs = [LOGITS, *present_names(gen.num_layers)]
        self.eos_ids = frozenset(gen.eos_token_ids)

    @property
    def generation(self) -> GenerationConfig:
        assert self.manifest.generation is not None
        return self.manifest.generation

    @property
    def max_length(self) -> int:
        return self.formatter.format.max_length

    @classmethod
    def build(
        cls, folder: VersionFolder, session: ort.InferenceSession, precision: str
    ) -> LoadedPolicy:
        """Checks the graph's KV cache against the manifest's generation config."""
        manifest = folder.manifest
        if manifest.kind != "policy" or manifest.generation is None:
            raise FailedPreconditionError(f"version {manifest.version} is not a policy")
        gen = manifest.generation
        expected = [*POLICY_INPUTS, *past_names(gen.num_layers)]
        inputs = {i.name: i for i in session.get_inputs()}
        if sorted(inputs) != sorted(expected):
            raise FailedPreconditionError(
                f"graph inputs {sorted(inputs)} do not match a {gen.num_layers}-layer KV cache"
            )
        past = inputs["past_key_0"]
        if len(past.shape) != 4 or list(past.shape[1:2]) + list(past.shape[3:]) != [
            gen.num_kv_heads,
            gen.head_dim,
        ]:
            raise FailedPreconditionError(
                f"cache shape {past.shape} != (batch, {gen.num_kv_heads}, past, {gen.head_dim})"
            )
        if past.type not in _ORT_DTYPES:
            raise FailedPreconditionError(f"unsupported cache type {past.type}")
        formatter = PromptFormatter.from_files(
            folder.path(TOKENIZER_FILE), TextFormat.from_dict(manifest.text_format)
        )
        return cls(manifest, session, formatter, precision, _ORT_DTYPES[past.type])

    # -- the graph ---------------------------------------------------------------------------
    def empty_cache(self, batch: int) -> list[np.ndarray]:
        gen = self.generation
        shape = (batch, gen.num_kv_heads, 0, gen.head_dim)
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self._past]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: last-position logits (batch, vocab) and the present cache."""
        feeds = dict(zip(self._past, past, strict=True))
        feeds.update(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        out = self.session.run(self._outputs, feeds)
        return np.asarray(out[0], dtype=np.float32), list(out[1:])

    # -- requests ----------------------------------------------------------------------------
    def encode(self, job: GenerateJob) -> list[int]:
        """The prompt's token ids; raises InvalidArgumentError naming the input field."""
        field_name = "prompt" if job.prompt is not None else "conversation"
        try:
            ids = self.formatter.encode(job.prompt, job.messages)
        except jinja2.TemplateError as exc:
            raise InvalidArgumentError(field_name, f"the chat template refused it: {exc}") from exc
        if not ids:
            raise InvalidArgumentError(field_name, "renders to no tokens")
        if len(ids) >= self.max_length:
            raise InvalidArgumentError(
                field_name,
                f"{len(ids)} tokens leave no room to generate within the model's context of "
                f"{self.max_length} tokens",
            )
        return ids

    def token_budget(self, job: GenerateJob, prompt_tokens: int, limit: int) -> int:
        """Tokens to generate at most: requested (or the version's default, capped at
        ``limit``), and never past the model's context."""
        wanted = job.params.max_new_tokens or min(self.generation.max_new_tokens, limit)
        return max(1, min(wanted, self.max_length - prompt_tokens))

    def smoke_test(self) -> None:
        """Generate a few greedy tokens; raise if the graph misbehaves."""
        job = GenerateJob(
            prompt=SMOKE_PROMPT, n=2, params=SamplingParams(temperature=0.0, max_new_tokens=2)
        )
        ids = self.encode(job)
        (result,) = generate(self, [job], [ids], [2])
        if len(result.completions) != 2:
            raise FailedPreconditionError("smoke generation returned the wrong number of rows")


# -- sampling ----------------------------------------------------------------------------------
def _nucleus(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and probabilities of the smallest set whose mass reaches ``top_p``, most likely
    first. Looks at the top few tokens first; only a flat distribution needs a full sort."""
    vocab = probs.size
    k = min(vocab, _NUCLEUS_FIRST)
    while True:
        top = np.argpartition(probs, vocab - k)[vocab - k :] if k < vocab else np.arange(vocab)
        order = top[np.argsort(-probs[top], kind="stable")]
        mass = np.cumsum(probs[order])
        if mass[-1] >= top_p or k == vocab:
            keep = min(int(np.searchsorted(mass, top_p, side="left")) + 1, order.size)
            return order[:keep], probs[order[:keep]]
        k = min(vocab, k * 8)


def sample_tokens(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator
) -> np.ndarray:
    """One token per row of ``logits`` (rows, vocab): greedy at temperature 0, otherwise
    temperature, then top-k, then top-p; one draw from ``rng`` per row, in row order."""
    if params.temperature == 0:
        return np.asarray(logits.argmax(axis=-1), dtype=np.int64)
    x = logits.astype(np.float64) / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = np.partition(x, vocab - params.top_k, axis=-1)[:, vocab - params.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    x -= x.max(axis=-1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.empty(len(probs), dtype=np.int64)
    for i, row in enumerate(probs):
        ids: np.ndarray | None = None
        if params.top_p < 1.0:
            ids, row = _nucleus(row, params.top_p)
        cdf = np.cumsum(row)
        pick = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)
        out[i] = ids[pick] if ids is not None else pick
    return out


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _stream(
    sink: StreamSink, index: int, final: str | None, text: str | None, hold: int, sent: int
) -> int:
    """Hand ``sink`` the settled new text of completion ``index``: all of ``final`` once the row
    has ended, else ``text`` less the ``hold`` characters a stop string may yet claim and any
    incomplete UTF-8 character. Returns the characters handed on so far."""
    if final is not None:
        upto, text = len(final), final
    elif text is None:
        return sent
    else:
        upto = min(len(text) - hold, len(text.rstrip("\ufffd")))
    if upto > sent:
        sink.text(index, text[sent:upto])
        return upto
    return sent


# -- the decode loop ---------------------------------------------------------------------------
@dataclass(eq=False)
class JobHandle:
    """One job admitted to a :class:`DecodeBatch`: its sampling state and its completions so
    far. ``first_token_at``/``finished_at`` are ``time.monotonic()`` readings."""

    job: GenerateJob
    prompt_tokens: int
    rng: np.random.Generator
    hold: int  # characters a stop string may yet claim (streamed text holds them back)
    rows: list[_Row] = field(default_factory=list)
    open_rows: int = 0
    first_token_at: float | None = None

    def result(self, version: str) -> GenerateResult:
        completions = []
        for row in self.rows:
            assert row.finish is not None and row.text is not None
            completions.append(Candidate(row.text, row.tokens, row.finish))
        return GenerateResult(
            completions,
            version,
            self.prompt_tokens,
            first_token_at=self.first_token_at,
            finished_at=time.monotonic(),
        )


@dataclass(eq=False)
class _Row:
    """One completion being decoded."""

    handle: JobHandle
    index: int  # 0 <= index < n within its job
    budget: int
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    text: str | None = None
    sent: int = 0  # characters handed to the job's sink


class DecodeBatch:
    """Rows decoding together on one model version, joined and left at any step.

    Between steps the batch holds, aligned by row: the next-token logits, the KV cache (all rows
    left-padded to one past length; ``mask`` is 0 on padding), and the next token's position.
    :meth:`admit` prefills new jobs in one graph call (prompts left-padded to the longest,
    positions from each prompt's first real token), fans each prompt's cache out to its ``n``
    rows and merges them in (the shorter cache is left-padded). :meth:`step` samples one token
    per row, ends rows (end-of-sequence, stop string, budget), drops them, and runs the next
    graph call for the rest. Cache columns no row attends to any more are trimmed.

    A job's rows keep their order, and its tokens are drawn from its own generator, one draw per
    row in row order: its completions do not depend on what it is batched with (beyond float
    rounding). Not thread-safe: one thread drives a batch.
    """

    def __init__(self, model: LoadedPolicy) -> None:
        self.model = model
        self._rows: list[_Row] = []
        self._logits = np.zeros((0, 0), dtype=np.float32)
        self._cache: list[np.ndarray] = model.empty_cache(0)
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._position = np.zeros(0, dtype=np.int64)
        # the jobs the last :meth:`step` ended (final even when its graph call then failed)
        self.ended: list[JobHandle] = []

    @property
    def rows(self) -> int:
        return len(self._rows)

    @property
    def width(self) -> int:
        """Cache columns (past tokens, padding included) every row carries."""
        return int(self._mask.shape[1])

    def admit(
        self, jobs: Sequence[GenerateJob], prompts: Sequence[Sequence[int]], budgets: Sequence[int]
    ) -> list[JobHandle]:
        """Prefill ``jobs`` (their encoded ``prompts``, ``budgets`` new tokens at most) and add
        their rows. All or nothing: on an error the batch is unchanged."""
        model = self.model
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        width = int(lengths.max())
        pad = model.formatter.format.pad_token_id
        ids = np.full((len(jobs), width), pad, dtype=np.int64)
        mask = np.zeros((len(jobs), width), dtype=np.int64)
        for j, prompt in enumerate(prompts):
            ids[j, width - len(prompt) :] = prompt
            mask[j, width - len(prompt) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, cache = model.forward(ids, mask, positions, model.empty_cache(len(jobs)))
        if not np.all(np.isfinite(logits)):
            raise FailedPreconditionError(f"policy {model.version} produced non-finite logits")

        fan = np.repeat(np.arange(len(jobs)), [job.n for job in jobs])
        if len(fan) != len(jobs):
            logits, mask = logits[fan], mask[fan]
            cache = [c[fan] for c in cache]
        handles, rows = [], []
        for job, prompt, budget in zip(jobs, prompts, budgets, strict=True):
            hold = max((len(s) for s in job.params.stop), default=1) - 1
            handle = JobHandle(job, len(prompt), np.random.default_rng(job.params.seed), hold)
            handle.rows = [_Row(handle, i, budget) for i in range(job.n)]
            handle.open_rows = job.n
            handles.append(handle)
            rows.extend(handle.rows)
        for job in jobs:
            if job.sink is not None:
                job.sink.started(model.version)
        self._merge(rows, logits, cache, mask, lengths[fan])
        return handles

    def _merge(
        self,
        rows: list[_Row],
        logits: np.ndarray,
        cache: list[np.ndarray],
        mask: np.ndarray,
        position: np.ndarray,
    ) -> None:
        if not self._rows:
            self._rows, self._logits, self._cache = rows, logits, cache
            self._mask, self._position = mask, position
            return
        width = max(self.width, mask.shape[1])
        old = [_left_pad(c, width) for c in self._cache]
        new = [_left_pad(c, width) for c in cache]
        self._cache = [np.concatenate(pair) for pair in zip(old, new, strict=True)]
        self._mask = np.concatenate([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._logits = np.concatenate([self._logits, logits])
        self._position = np.concatenate([self._position, position])
        self._rows = self._rows + rows

    def drop(self, handles: Sequence[JobHandle]) -> None:
        """Remove the rows of ``handles`` (their callers gave up) without finishing them."""
        gone = set(map(id, handles))
        self._keep(np.array([id(r.handle) not in gone for r in self._rows], dtype=bool))

    def _keep(self, keep: np.ndarray) -> None:
        if keep.all():
            return
        idx = np.flatnonzero(keep)
        self._rows = [self._rows[i] for i in idx]
        self._logits, self._mask, self._position = (
            self._logits[idx],
            self._mask[idx],
            self._position[idx],
        )
        self._cache = [c[idx] for c in self._cache]
        if self._rows:  # padding columns every remaining row ignores
            lead = int(np.argmax(self._mask.any(axis=0)))
            if lead:
                self._mask = np.ascontiguousarray(self._mask[:, lead:])
                self._cache = [np.ascontiguousarray(c[:, :, lead:]) for c in self._cache]
        else:
            self._mask = self._mask[:, :0]
            self._cache = [c[:, :, :0] for c in self._cache]

    def step(self) -> list[JobHandle]:
        """One token for every row; returns the jobs whose last row ended at this step (their
        :meth:`JobHandle.result` is final)."""
        model = self.model
        chosen = np.empty(len(self._rows), dtype=np.int64)
        by_job: dict[int, list[int]] = {}
        for k, row in enumerate(self._rows):
            by_job.setdefault(id(row.handle), []).append(k)
        now = time.monotonic()
        for positions in by_job.values():
            handle = self._rows[positions[0]].handle
            if handle.first_token_at is None:
                handle.first_token_at = now
            sel = np.asarray(positions)
            chosen[sel] = sample_tokens(self._logits[sel], handle.job.params, handle.rng)
        done = np.zeros(len(self._rows), dtype=bool)
        finished: list[JobHandle] = []
        for k, row in enumerate(self._rows):
            done[k] = _advance(model, row, int(chosen[k]))
            if done[k]:
                row.handle.open_rows -= 1
                if row.handle.open_rows == 0:
                    finished.append(row.handle)
        self.ended = finished
        keep = ~done
        self._keep(keep)
        if self._rows:
            chosen = chosen[keep]
            self._mask = np.concatenate(
                [self._mask, np.ones((len(self._rows), 1), dtype=np.int64)], axis=1
            )
            self._logits, self._cache = model.forward(
                chosen[:, None], self._mask, self._position[:, None], self._cache
            )
            self._position = self._position + 1
        return finished


def _left_pad(array: np.ndarray, width: int) -> np.ndarray:
    """``array`` (a mask (rows, past) or a cache (rows, heads, past, dim)) with zero columns
    prepended on its past axis up to ``width``."""
    axis = 1 if array.ndim == 2 else 2
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)


def _advance(model: LoadedPolicy, row: _Row, token: int) -> bool:
    """Append ``token`` to ``row``, end it if it should end, stream its settled text; returns
    whether it ended."""
    row.tokens.append(token)
    handle = row.handle
    stops, sink = handle.job.params.stop, handle.job.sink
    text: str | None = None
    if token in model.eos_ids:
        row.finish = FinishReason.EOS
    elif stops or sink is not None:
        text = model.formatter.decode(row.tokens)
        cut = _find_stop(text, stops) if stops else -1
        if cut >= 0:
            row.finish, row.text = FinishReason.STOP_STRING, text[:cut]
    if row.finish is None and len(row.tokens) >= row.budget:
        row.finish = FinishReason.LENGTH
    if row.finish is not None and row.text is None:  # the final text, end-of-sequence left out
        if row.finish is FinishReason.EOS:
            row.text = model.formatter.decode(row.tokens[:-1])
        else:
            row.text = text if text is not None else model.formatter.decode(row.tokens)
    if sink is not None:
        row.sent = _stream(sink, row.index, row.text, text, handle.hold, row.sent)
    return row.finish is not None


def generate(
    model: LoadedPolicy,
    jobs: Sequence[GenerateJob],
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
) -> list[GenerateResult]:
    """Generate every job's ``n`` completions together, to the end (static batching: one
    :class:`DecodeBatch` nothing joins)."""
    batch = DecodeBatch(model)
    handles = batch.admit(jobs, prompts, budgets)
    results: dict[int, GenerateResult] = {}
    while batch.rows:
        for handle in batch.step():
            results[id(handle)] = handle.result(model.version)
    return [results[id(h)] for h in handles]


def generate_jobs(
    model: LoadedPolicy, jobs: Sequence[GenerateJob], max_new_tokens: int
) -> list[GenerateResult | PlauditError]:
    """Generate every job with ``model``; a job whose prompt is refused gets its error, the
    others their results (in order). ``max_new_tokens`` caps the version's default."""
    out: list[GenerateResult | PlauditError | None] = [None] * len(jobs)
    ready: list[int] = []
    prompts: list[list[int]] = []
    for i, job in enumerate(jobs):
        try:
            prompts.append(model.encode(job))
        except PlauditError as exc:
            out[i] = exc
            continue
        ready.append(i)
    if ready:
        budgets = [
            model.token_budget(jobs[i], len(p), max_new_tokens)
            for i, p in zip(ready, prompts, strict=True)
        ]
        results = generate(model, [jobs[i] for i in ready], prompts, budgets)
        for i, result in zip(ready, results, strict=True):
            out[i] = result
    return [r for r in out if r is not None]
