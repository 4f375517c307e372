"""Sampling from a policy, log-probs of samples, scoring them with the reward service, and the
held-out evaluation every policy method ends with (mean reward, win rate, KL to the reference)."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm
from transformers import GenerationConfig

from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.trainer.policy_data import PolicyTokenizer, TokenBatch, TokenRow, collate_rows
from plaudit.trainer.policy_objective import (
    length_controlled_win_rate,
    token_logprobs,
    win_rate,
)
from plaudit.trainer.sharding import is_sharded, no_grad

log = logging.getLogger(__name__)

SCORE_CHUNK = 128  # items per Score request (the service accepts 256 by default)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


class Scorer(Protocol):
    """Rewards of (prompt, completion) pairs, in order."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray: ...


class RewardServiceScorer:
    """Scores through the reward service (:class:`plaudit.services.reward.client.RewardClient`); the
    rewards are the service's default, standardised by the version's reference statistics, from
    the named ``model`` or the ``objective`` (neither: the service's default model)."""

    def __init__(
        self,
        address: str,
        *,
        wait_s: float = 60.0,
        timeout_s: float = 120.0,
        credentials: ClientCredentials = INSECURE,
        model: str = "",
        objective: str = "",
    ) -> None:
        from plaudit.services.reward.client import RewardClient, wait_until_serving

        wait_until_serving(address, wait_s, credentials=credentials)
        self.address = address
        self.timeout_s = timeout_s
        self.client = RewardClient(address, credentials)
        self.model, self.objective = model, objective
        self.versions: set[str] = set()  # the reward-model versions that answered

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        rewards: list[float] = []
        for start in range(0, len(prompts), SCORE_CHUNK):
            end = start + SCORE_CHUNK
            got, version = self.client.score(
                prompts[start:end],
                completions[start:end],
                timeout=self.timeout_s,
                model=self.model,
                objective=self.objective,
            )
            rewards += got
            self.versions.add(version)
        return np.asarray(rewards, dtype=np.float64)

    def close(self) -> None:
        self.client.close()


def _plain_head(lm: Any) -> bool:
    """Whether the logits are just the output projection of the decoder's last hidden state
    (no logit scaling or soft-capping), so it can be applied to the completion positions only."""
    config = lm.config
    scaled = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return isinstance(head, torch.nn.Linear) and hasattr(lm, "get_decoder") and not scaled


def completion_token_logprobs(
    model: Any, batch: TokenBatch, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completion tokens alone, flattened, and the row each belongs to.

    The output projection and softmax (a 49k vocabulary for SmolLM2) run on the completion
    positions only, not on prompt and padding; models whose head does more than a projection
    take the full-logits path (:func:`plaudit.trainer.policy_objective.token_logprobs`).
    """
    logps, rows, _ = completion_token_outputs(model, batch, temperature)
    return logps, rows


def completion_token_outputs(
    model: Any, batch: TokenBatch, temperature: float = 1.0, *, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`completion_token_logprobs`, and with ``hidden`` the decoder's last hidden state
    at the positions that predict those tokens (flattened alike, for a value head)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA: injected
    target = batch.completion_mask[:, 1:].bool()  # token t is predicted at position t - 1
    rows = torch.arange(len(target), device=target.device).unsqueeze(1).expand_as(target)[target]
    if not _plain_head(lm) or is_sharded(model):  # FSDP: through the root's forward
        out = model(**batch.model_inputs(), use_cache=False, output_hidden_states=hidden)
        states = out.hidden_states[-1][:, :-1][target] if hidden else None
        return token_logprobs(out.logits, batch.input_ids, temperature)[target], rows, states
    last = lm.get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
    states = last[:, :-1][target]
    logits = lm.get_output_embeddings()(states).float()
    if temperature != 1.0:
        logits = logits / temperature
    labels = batch.input_ids[:, 1:][target].unsqueeze(-1)
    logps = torch.gather(logits.log_softmax(-1), 1, labels).squeeze(-1)
    return logps, rows, states if hidden else None


def completion_token_hidden(model: Any, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden state at the positions that predict the completion tokens
    (no output projection), flattened as :func:`completion_token_logprobs` flattens, and the
    row of each."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    target = batch.completion_mask[:, 1:].bool()
    rows = torch.arange(len(target), device=target.device).unsqueeze(1).expand_as(target)[target]
    if not _plain_head(lm) or is_sharded(model):
        out = model(**batch.model_inputs(), use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1][:, :-1][target], rows
    last = lm.get_decoder()(**batch.model_inputs(), use_cache=False).last_hidden_state
    return last[:, :-1][target], rows


def pad_tokens(flat: torch.Tensor, rows: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Per-token numbers of ``count`` rows, flattened row by row (as
    :func:`completion_token_outputs` gives them), as (count, width), 0-padded on the right."""
    lengths = torch.bincount(rows, minlength=count)
    mask = torch.arange(width, device=flat.device) < lengths.unsqueeze(1)
    return flat.new_zeros((count, width)).masked_scatter(mask, flat)


def completion_mask(rows: Sequence[TokenRow], device: torch.device) -> torch.Tensor:
    """(len(rows), longest completion) bool mask of each row's completion tokens."""
    lengths = torch.tensor([len(r.completion) for r in rows], device=device)
    width = int(lengths.max()) if len(rows) else 0
    return torch.arange(width, device=device) < lengths.unsqueeze(1)


def token_outputs(
    model: Any,
    rows: Sequence[TokenRow],
    pad_id: int,
    device: torch.device,
    temperature: float = 1.0,
    value_head: torch.nn.Module | None = None,
    value_model: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token completion log-probs of ``rows`` in one forward pass (keeps the graph), and
    ``value_head``'s values at the same positions, each (len(rows), longest completion),
    0-padded like :func:`completion_mask`. The head reads ``model``'s last hidden state, or
    ``value_model``'s when one is given (a separate value model: its own forward pass)."""
    batch = collate_rows(rows, pad_id).to(device)
    shared = value_head is not None and value_model is None
    logps, row, states = completion_token_outputs(model, batch, temperature, hidden=shared)
    width = max((len(r.completion) for r in rows), default=0)
    if value_head is not None and value_model is not None:
        states, row_v = completion_token_hidden(value_model, batch)
        values = value_head(states).squeeze(-1).float()
        return pad_tokens(logps, row, len(rows), width), pad_tokens(values, row_v, len(rows), width)
    values = None
    if value_head is not None and states is not None:
        values = pad_tokens(value_head(states).squeeze(-1).float(), row, len(rows), width)
    return pad_tokens(logps, row, len(rows), width), values


def token_outputs_no_grad(
    model: Any,
    rows: Sequence[TokenRow],
    pad_id: int,
    device: torch.device,
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    value_head: torch.nn.Module | None = None,
    value_model: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_outputs` without gradients, ``batch_size`` rows per forward pass, in eval
    mode; both (len(rows), longest completion) on ``device``."""
    width = max((len(r.completion) for r in rows), default=0)
    logps = torch.zeros((len(rows), width), device=device)
    values = torch.zeros((len(rows), width), device=device) if value_head is not None else None
    models = [m for m in (model, value_model) if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            lp, v = token_outputs(
                model, chunk, pad_id, device, temperature, value_head, value_model
            )
            logps[start : start + len(chunk), : lp.shape[1]] = lp
            if values is not None and v is not None:
                values[start : start + len(chunk), : v.shape[1]] = v
    for m, mode in zip(models, was_training, strict=True):
        m.train(mode)
    return logps, values


def forward_logprobs(
    model: Any,
    rows: Sequence[TokenRow],
    pad_id: int,
    device: torch.device,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Completion log-prob sums of ``rows`` in one forward pass (keeps the graph)."""
    batch = collate_rows(rows, pad_id).to(device)
    logps, row = completion_token_logprobs(model, batch, temperature)
    return torch.zeros(len(rows), device=device, dtype=logps.dtype).index_add(0, row, logps)


def completion_logprobs(
    model: torch.nn.Module,
    rows: Sequence[TokenRow],
    pad_id: int,
    device: torch.device,
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> np.ndarray:
    """Completion log-prob sums without gradients, rows grouped by length to pad little."""
    out = np.zeros(len(rows), dtype=np.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    was_training = model.training
    model.eval()
    with no_grad(model):  # a sharded model: no_grad (it trains on after this)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            logps = forward_logprobs(model, [rows[i] for i in index], pad_id, device, temperature)
            out[index] = logps.double().cpu().numpy()
    model.train(was_training)
    return out


def generate_rows(
    model: Any,
    tokens: PolicyTokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    device: torch.device,
    *,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[TokenRow]:
    """One sampled completion per prompt (repeat a prompt for more), as token rows.

    Pure sampling at ``temperature`` with nucleus ``top_p`` and no top-k cut, so with
    temperature 1 and top_p 1 the samples come from the policy itself (what RL and the KL
    estimate assume). Prompts are batched by length and left-padded.
    """
    config = GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=0,
        max_new_tokens=params.max_new_tokens,
        pad_token_id=tokens.pad_id,
        eos_token_id=tokens.eos_id,
    )
    prompt_ids = [tokens.prompt_ids(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    rows: list[TokenRow | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="sample", disable=desc is None, leave=False)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = collate_rows(
                [TokenRow(prompt_ids[i], ()) for i in index], tokens.pad_id, left=True
            )
            out = model.generate(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                generation_config=config,
            )
            new = out[:, batch.input_ids.shape[1] :].cpu().tolist()
            for i, ids in zip(index, new, strict=True):
                rows[i] = tokens.generated(prompt_ids[i], ids)
            bar.update(len(index))
    bar.close()
    model.train(was_training)
    return [r for r in rows if r is not None]


class Reference:
    """The frozen starting policy: the LoRA-wrapped model with its adapters switched off, or
    (full fine-tuning) a frozen copy of the initial weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lora = hasattr(model, "disable_adapter")
        self.copy: torch.nn.Module | None = None
        if not self.lora:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @contextmanager
    def use(self, policy: Any) -> Iterator[Any]:
        """The reference model (for scoring or sampling) while the block runs."""
        if self.copy is not None:
            yield self.copy
            return
        with policy.disable_adapter():
            yield policy


# prompts -> completion texts, sampled from the policy a candidate is compared with
Sampler = Callable[[Sequence[str]], list[str]]


def torch_sampler(
    model: Any,
    tokens: PolicyTokenizer,
    params: SamplingParams,
    device: torch.device,
    seed: int,
    progress: bool = False,
) -> Sampler:
    """Samples from a PyTorch causal LM, reproducibly (``seed``), without disturbing the
    global random state."""

    def sample(prompts: Sequence[str]) -> list[str]:
        desc = "baseline samples" if progress else None
        with seeded(seed, device):
            rows = generate_rows(model, tokens, prompts, params, device, desc=desc)
        return [tokens.decode(r.completion) for r in rows]

    return sample


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def evaluate_policy(
    model: Any,
    reference: Reference,
    tokens: PolicyTokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    device: torch.device,
    *,
    scorer: Scorer | None,
    baseline: Sampler | None,
    seed: int,
    progress: bool = False,
    samples_path: Path | None = None,
) -> dict[str, float]:
    """Held-out metrics of the policy on ``prompts``, one sample each (seeded); with
    ``samples_path`` every sample is written there too (JSONL: ``prompt``, ``completion``,
    ``reward``, and ``baseline`` / ``baseline_reward`` where there is a baseline), so what the
    gate judged can be read, or judged again by another reward model:

    * ``eval/kl``: mean over samples of ``log pi(y|x) - log ref(y|x)`` (sequence sums at the
      sampling temperature): a Monte-Carlo estimate of KL(pi || ref);
    * ``eval/reward``: mean reward of the samples under the reward service;
    * ``eval/win_rate``: share of prompts where the policy's sample outscores the baseline's
      (a tie counts one half), ``eval/wins`` the outright wins, ``eval/baseline_reward`` the
      baseline's mean reward;
    * ``eval/lc_win_rate``: the win rate at equal length
      (:func:`plaudit.trainer.policy_objective.length_controlled_win_rate`, lengths in
      characters), beside ``eval/completion_chars`` and ``eval/baseline_completion_chars``.
    """
    if not prompts:
        return {}
    with seeded(seed, device):
        desc = "policy samples" if progress else None
        rows = generate_rows(model, tokens, prompts, params, device, desc=desc)
    logp = completion_logprobs(model, rows, tokens.pad_id, device, temperature=params.temperature)
    with reference.use(model) as ref:
        ref_logp = completion_logprobs(
            ref, rows, tokens.pad_id, device, temperature=params.temperature
        )
    metrics = {
        "eval/kl": float(np.mean(logp - ref_logp)),
        "eval/completion_tokens": float(np.mean([len(r.completion) for r in rows])),
        "eval/prompts": float(len(prompts)),
    }
    texts = [tokens.decode(r.completion) for r in rows]
    samples: list[dict[str, Any]] = [
        {"prompt": p, "completion": t} for p, t in zip(prompts, texts, strict=True)
    ]
    if scorer is None:
        _write_samples(samples_path, samples)
        return metrics
    rewards = scorer(prompts, texts)
    metrics["eval/reward"] = float(np.mean(rewards))
    for sample, reward in zip(samples, rewards.tolist(), strict=True):
        sample["reward"] = reward
    if baseline is not None:
        try:
            baseline_texts = baseline(prompts)
        except Exception:  # no win rate, so the gate refuses; the run's other numbers stand
            log.exception("could not sample the baseline")
            _write_samples(samples_path, samples)
            return metrics
        baseline_rewards = scorer(prompts, baseline_texts)
        for sample, text, reward in zip(samples, baseline_texts, baseline_rewards.tolist(),
                                        strict=True):  # fmt: skip
            sample["baseline"], sample["baseline_reward"] = text, reward
        chars = np.array([len(t) for t in texts], dtype=np.float64)
        baseline_chars = np.array([len(t) for t in baseline_texts], dtype=np.float64)
        metrics.update(
            {
                "eval/baseline_reward": float(np.mean(baseline_rewards)),
                "eval/win_rate": win_rate(rewards, baseline_rewards),
                "eval/wins": float(np.sum(rewards > baseline_rewards)),
                "eval/lc_win_rate": length_controlled_win_rate(
                    rewards, baseline_rewards, chars, baseline_chars
                ),
                "eval/completion_chars": float(chars.mean()),
                "eval/baseline_completion_chars": float(baseline_chars.mean()),
            }
        )
    _write_samples(samples_path, samples)
    return metrics


def _write_samples(path: Path | None, samples: list[dict[str, Any]]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(s) + "\n" for s in samples))
