"""How a (prompt, completion) pair becomes model input: the one implementation shared by
serving and training, so a reward model is scored exactly the way it was trained.

* ``pair`` format (encoder models such as BERT/MiniLM): prompt and completion are the two
  segments of a text pair, with the tokenizer's own special tokens (``[CLS] p [SEP] c [SEP]``).
* ``chat_template`` format (chat models): the prompt becomes the conversation so far (an HH-style
  ``\\n\\nHuman: ... \\n\\nAssistant: ...`` dialogue is split into turns), the completion the final
  assistant turn, rendered with the model's own chat template.
* Generation (:class:`PromptFormatter`): the same conversation, rendered with the template's
  generation prompt (the opening of the next assistant turn); a policy without a template
  (``plain``) reads the prompt text as it is.

Truncation keeps the END of the text: the completion is what differs between candidates and the
most recent turns matter most, so tokens are dropped from the start of the prompt first, then
from the start of the completion.

Only the Rust ``tokenizers`` library and jinja2 are used here: no torch, no transformers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
from tokenizers import Encoding, Tokenizer

# "plain": a policy without a chat template reads the prompt text as it is (generation only)
TextFormatKind = Literal["pair", "chat_template", "plain"]

_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass(frozen=True)
class TextFormat:
    """Everything needed to turn text into model input; stored in each model version's manifest."""

    kind: TextFormatKind
    max_length: int
    pad_token_id: int
    chat_template: str | None = None
    special_tokens: dict[str, str] | None = None
    uses_token_type_ids: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextFormat:
        return cls(**data)


def dialogue_to_messages(prompt: str) -> list[dict[str, str]]:
    """Split an HH-RLHF style dialogue into chat messages; any other text is one user turn.

    ``"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: bye\\n\\nAssistant:"`` becomes
    user "hi", assistant "hello", user "bye".
    """
    parts = _TURN.split(prompt)
    if len(parts) < 3:
        return [{"role": "user", "content": prompt}]
    messages = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        if content.strip() or role == "user":
            messages.append({"role": role, "content": content.strip()})
    return messages


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a Hugging Face chat template the way transformers does (sandboxed jinja2)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


@dataclass
class EncodedBatch:
    """Padded model inputs for a group of items, plus per-item token counts."""

    inputs: dict[str, np.ndarray]
    lengths: np.ndarray
    truncated: np.ndarray

    @property
    def padded_tokens(self) -> int:
        return int(self.inputs["input_ids"].size)


class RewardTextEncoder:
    """Tokenizes (prompt, completion) pairs with end-keeping truncation; see the module doc."""

    def __init__(self, tokenizer: Tokenizer, fmt: TextFormat) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.format = fmt
        self._template = compile_chat_template(fmt.chat_template) if fmt.chat_template else None
        if fmt.kind == "chat_template" and self._template is None:
            raise ValueError("chat_template format needs a chat template")
        self._empty = tokenizer.encode("", add_special_tokens=False)
        self._budget = fmt.max_length - tokenizer.num_special_tokens_to_add(fmt.kind == "pair")
        if self._budget < 2:
            raise ValueError(f"max_length {fmt.max_length} leaves no room for text")

    @classmethod
    def from_files(cls, tokenizer_json: Path, fmt: TextFormat) -> RewardTextEncoder:
        return cls(Tokenizer.from_file(str(tokenizer_json)), fmt)

    def render(self, prompt: str, completion: str) -> str:
        """The chat-template text for one pair (chat_template format only)."""
        assert self._template is not None
        messages = [*dialogue_to_messages(prompt), {"role": "assistant", "content": completion}]
        return self._template.render(
            messages=messages, add_generation_prompt=False, **(self.format.special_tokens or {})
        )

    def encode(
        self, prompts: Sequence[str], completions: Sequence[str]
    ) -> list[tuple[Encoding, bool]]:
        """Tokenize and truncate each pair; returns (encoding, was_truncated) per item."""
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions differ in length")
        if self.format.kind == "chat_template":
            texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
            out = []
            for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False):
                truncated = len(enc.ids) > self._budget
                if truncated:
                    enc.truncate(self._budget, direction="left")
                out.append(
                    (self.tokenizer.post_process(enc, None, add_special_tokens=True), truncated)
                )
            return out
        prompt_encs = self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)
        completion_encs = self.tokenizer.encode_batch(list(completions), add_special_tokens=False)
        out = []
        for p_enc, c_enc in zip(prompt_encs, completion_encs, strict=True):
            n_p, n_c = len(p_enc.ids), len(c_enc.ids)
            truncated = n_p + n_c > self._budget
            if truncated:
                if n_c >= self._budget:
                    c_enc.truncate(self._budget, direction="left")
                    p_enc = self._empty
                else:
                    p_enc.truncate(self._budget - n_c, direction="left")
            out.append(
                (self.tokenizer.post_process(p_enc, c_enc, add_special_tokens=True), truncated)
            )
        return out

    def pad(self, encoded: Sequence[tuple[Encoding, bool]]) -> EncodedBatch:
        """Right-pad a group to its longest member."""
        lengths = np.fromiter((len(e.ids) for e, _ in encoded), dtype=np.int64, count=len(encoded))
        width = int(lengths.max()) if len(encoded) else 0
        ids = np.full((len(encoded), width), self.format.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        types = np.zeros((len(encoded), width), dtype=np.int64)
        for row, (enc, _) in enumerate(encoded):
            n = lengths[row]
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
            types[row, :n] = enc.type_ids
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.format.uses_token_type_ids:
            inputs["token_type_ids"] = types
        truncated = np.fromiter((t for _, t in encoded), dtype=bool, count=len(encoded))
        return EncodedBatch(inputs=inputs, lengths=lengths, truncated=truncated)

    def encode_padded(self, prompts: Sequence[str], completions: Sequence[str]) -> EncodedBatch:
        return self.pad(self.encode(prompts, completions))


_ASSISTANT = "\n\nAssistant:"


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split an HH-RLHF (chosen, rejected) pair of whole dialogues into (prompt, chosen, rejected).

    The prompt is the shared dialogue up to and including the final ``\\n\\nAssistant:``; the
    completions are what follows it, without the separating space.
    """
    cut = chosen.rfind(_ASSISTANT)
    if cut < 0 or not rejected.startswith(chosen[: cut + len(_ASSISTANT)]):
        # fall back to the longest common prefix, cut at a turn boundary when there is one
        n = 0
        for a, b in zip(chosen, rejected, strict=False):
            if a != b:
                break
            n += 1
        turn = chosen.rfind(_ASSISTANT, 0, n)
        cut = turn if turn >= 0 else n - len(_ASSISTANT)
        if cut < 0:
            raise ValueError("chosen and rejected share no dialogue prefix")
    end = cut + len(_ASSISTANT)
    return chosen[:end], chosen[end:].removeprefix(" "), rejected[end:].removeprefix(" ")


def length_groups(lengths: np.ndarray, group_tokens: int) -> list[np.ndarray]:
    """Cut item indices into groups of similar length whose padded size fits ``group_tokens``.

    Items are taken longest first; each group holds as many items as fit when all are padded to
    its first (longest) member, so padding waste stays small and no group exceeds the budget
    (a single item longer than the budget forms a group of its own).
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    groups = []
    start = 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)
        rows = max(1, group_tokens // width)
        groups.append(order[start : start + rows])
        start += rows
    return groups


def messages_to_dialogue(messages: Sequence[Mapping[str, str]]) -> str:
    """The HH-style dialogue of a conversation, ending with an open assistant turn.

    The inverse of :func:`dialogue_to_messages` (system turns are kept as leading text, which it
    reads back as a user turn): how a conversation is sent to the reward service as a prompt.
    """
    parts = []
    for message in messages:
        if message["role"] == "system":
            parts.append(message["content"])
        else:
            speaker = "Assistant" if message["role"] == "assistant" else "Human"
            parts.append(f"\n\n{speaker}: {message['content']}")
    return "".join(parts) + _ASSISTANT


class PromptFormatter:
    """Turns a generation input (a prompt or a conversation) into a policy's prompt token ids.

    ``chat_template``: the conversation (a prompt is split with :func:`dialogue_to_messages`) is
    rendered with the template and its generation prompt, then tokenized without adding special
    tokens (as ``transformers``' ``apply_chat_template`` does). ``plain``: the prompt text (a
    conversation becomes an HH-style dialogue) is tokenized with the tokenizer's special tokens.
    Training a policy should build its prompts with this class so that serving feeds the model
    exactly what it was trained on.
    """

    def __init__(self, tokenizer: Tokenizer, fmt: TextFormat) -> None:
        if fmt.kind == "pair":
            raise ValueError("a policy needs the chat_template or plain text format")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.format = fmt
        self._template = compile_chat_template(fmt.chat_template) if fmt.chat_template else None
        if fmt.kind == "chat_template" and self._template is None:
            raise ValueError("chat_template format needs a chat template")

    @classmethod
    def from_files(cls, tokenizer_json: Path, fmt: TextFormat) -> PromptFormatter:
        return cls(Tokenizer.from_file(str(tokenizer_json)), fmt)

    def render(
        self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None
    ) -> str:
        """The prompt text the policy continues; give exactly one of prompt and messages."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.format.kind == "plain":
            return prompt if prompt is not None else messages_to_dialogue(messages or [])
        assert self._template is not None
        turns = dialogue_to_messages(prompt) if prompt is not None else list(messages or [])
        return self._template.render(
            messages=turns, add_generation_prompt=True, **(self.format.special_tokens or {})
        )

    def encode(
        self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None
    ) -> list[int]:
        """Prompt token ids (not truncated: the caller checks them against the context)."""
        text = self.render(prompt, messages)
        return list(self.tokenizer.encode(text, add_special_tokens=self.format.kind == "plain").ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Generated text, special tokens left out."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))
