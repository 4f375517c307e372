"""Policy inputs: prompts rendered as serving renders them, completions appended as tokens.

A prompt is turned into token ids by :class:`plaudit.services.common.textfmt.PromptFormatter` (the
chat
template with its generation prompt for chat models, the text as it is otherwise), built from the
tokenizer.json the published version ships, so training sees what the generation service feeds the
model. A completion is its own tokens plus the end-of-sequence token, the way a generated
completion ends. Truncation keeps the END of the prompt (``max_prompt_length``) and the START of
the completion (what is left of ``max_length``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from plaudit.services.common.textfmt import PromptFormatter
from plaudit.services.runtime.contract import TOKENIZER_FILE
from plaudit.trainer.policy_export import prompt_format_for


@dataclass(frozen=True)
class TokenRow:
    """One sequence: prompt ids then completion ids (either may be empty)."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


@dataclass
class TokenBatch:
    """Padded rows: ``completion_mask`` marks the completion tokens (the ones scored);
    ``position_ids`` count real tokens only, so left and right padding give the same positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in vars(self).values()))

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def collate_rows(rows: Sequence[TokenRow], pad_id: int, *, left: bool = False) -> TokenBatch:
    """Pad rows to the longest one, on the right (training) or the left (generation)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n, p = len(row), len(row.prompt)
        start = width - n if left else 0
        ids[i, start : start + n] = torch.tensor(row.prompt + row.completion, dtype=torch.long)
        mask[i, start : start + n] = 1
        completion[i, start + p : start + n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(ids, mask, completion, positions)


class PolicyTokenizer:
    """Prompts and completions to :class:`TokenRow`, and generated ids back to text."""

    def __init__(
        self, tokenizer: Any, model: PreTrainedModel, max_length: int, max_prompt_length: int
    ) -> None:
        self.format = prompt_format_for(tokenizer, model, max_length)  # as export records it
        self.max_length = self.format.max_length
        self.max_prompt_length = min(max_prompt_length, self.max_length - 1)
        with tempfile.TemporaryDirectory(prefix="plaudit-tok-") as tmp:
            tokenizer.save_pretrained(tmp)  # the tokenizer.json the version will ship
            self.formatter = PromptFormatter.from_files(Path(tmp) / TOKENIZER_FILE, self.format)
        eos = tokenizer.eos_token_id
        self.eos_id: int | None = int(eos) if eos is not None else None
        self.pad_id = int(self.format.pad_token_id)

    def prompt_ids(self, prompt: str) -> tuple[int, ...]:
        """The rendered prompt's ids, cut to ``max_prompt_length`` keeping the end."""
        ids = self.formatter.encode(prompt)
        return tuple(ids[-self.max_prompt_length :])

    def completion_ids(self, completion: str) -> tuple[int, ...]:
        ids = self.formatter.tokenizer.encode(completion, add_special_tokens=False).ids
        return (*ids, *(() if self.eos_id is None else (self.eos_id,)))

    def rows(self, prompts: Sequence[str], completions: Sequence[str]) -> list[TokenRow]:
        """(prompt, completion) rows within ``max_length`` (the completion's end is cut)."""
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            p = self.prompt_ids(prompt)
            out.append(TokenRow(p, self.completion_ids(completion)[: self.max_length - len(p)]))
        return out

    def generated(self, prompt: tuple[int, ...], new_ids: Sequence[int]) -> TokenRow:
        """A sampled completion as a row: cut after the first end-of-sequence token (kept,
        since sampling chose it), the padding that follows it dropped."""
        ids = list(new_ids)
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id) + 1]
        return TokenRow(prompt, tuple(ids))

    def decode(self, completion: Sequence[int]) -> str:
        return self.formatter.decode(completion).strip()
