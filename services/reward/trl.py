"""Plaudit as a reward function for TRL (``GRPOTrainer``, ``RLOOTrainer``, ...): the served reward
model scores the policy's completions.

TRL calls a custom reward function as ``f(prompts=..., completions=..., completion_ids=...,
**columns)`` and wants one float per completion; it logs the rewards as
``rewards/<f.__name__>/mean``. :class:`PlauditReward` is such a function (blocking; TRL calls it
from its training loop). :class:`AsyncPlauditReward` has an ``async __call__``: TRL (1.x) runs
async reward functions on its own event loop, concurrently with the other async ones, so a
Plaudit call overlaps the other rewards' work; it suits other asyncio trainers too.

How TRL's inputs become ``Score`` items (:func:`score_pair`):

* **plain** (``prompts`` and ``completions`` are strings): ``(prompt, completion)`` as they are.
* **conversational** (lists of ``{"role", "content"}`` messages): the prompt's messages become an
  HH-style dialogue (``\\n\\nHuman: ...\\n\\nAssistant:``, :func:`messages_to_dialogue`), the
  last completion message is the completion, earlier completion messages (tool calls and their
  results) join the dialogue. The reward model then renders that dialogue in *its own* text
  format (the ``pair`` segments or its own chat template), exactly as it was trained; the
  policy's chat template plays no part. A prompt that ends with an assistant message (the
  policy continues it) has that message's text put in front of the completion.

Each instance remembers the reward-model versions that answered (``model_versions``,
``last_model_version``) and, with ``keep_calls=True``, every call's texts and rewards
(``calls``), so a run can be traced back to the model that shaped it.

Usage::

    from trl import GRPOConfig, GRPOTrainer
    from plaudit.services.common.security.client import ClientCredentials
    from plaudit.services.reward.trl import PlauditReward

    reward = PlauditReward("reward.internal:50051", ClientCredentials(api_key="..."))
    trainer = GRPOTrainer(
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        reward_funcs=[reward],  # logged as rewards/plaudit_reward/mean
        args=GRPOConfig(output_dir="out"),
        train_dataset=dataset,  # a "prompt" column: strings or lists of messages
    )
    trainer.train()
    print(reward.model_versions)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.services.common.textfmt import messages_to_dialogue
from plaudit.services.reward.client import (
    DEFAULT_RETRY,
    MAX_ITEMS_PER_REQUEST,
    AsyncRewardClient,
    RetryPolicy,
    RewardClient,
)
from plaudit.v1 import reward_pb2

Message = Mapping[str, Any]
TrlText = str | Sequence[Message]
"""A TRL prompt or completion: plain text or a list of chat messages."""


def _content(message: Message) -> str:
    """A message's text (content blocks: their text parts, in order)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        str(part.get("text", "")) if isinstance(part, Mapping) else str(part) for part in content
    )


def score_pair(prompt: TrlText, completion: TrlText) -> tuple[str, str]:
    """The ``(prompt, completion)`` texts of one ``Score`` item for a TRL prompt and completion
    (see the module doc)."""
    if isinstance(prompt, str) and isinstance(completion, str):
        return prompt, completion
    messages: list[dict[str, str]] = []
    if isinstance(prompt, str):
        if prompt:
            messages.append({"role": "user", "content": prompt})
    else:
        messages += [{"role": str(m["role"]), "content": _content(m)} for m in prompt]
    if isinstance(completion, str):
        text = completion
    else:
        turns = [{"role": str(m["role"]), "content": _content(m)} for m in completion]
        text = turns.pop()["content"] if turns else ""
        messages += turns
    if messages and messages[-1]["role"] == "assistant":  # the completion continues this turn
        text = messages.pop()["content"] + text
    return messages_to_dialogue(messages), text


@dataclass(frozen=True)
class RewardCall:
    """One call of a reward function: the texts sent, the rewards returned, and who gave them."""

    prompts: list[str]
    completions: list[str]
    rewards: list[float]
    model_version: str


class _PlauditRewardBase:
    """What both reward functions share: settings, input mapping, and the record of answers."""

    def __init__(
        self,
        address: str,
        credentials: ClientCredentials = INSECURE,
        *,
        name: str = "plaudit_reward",
        timeout_s: float = 120.0,
        max_items_per_request: int = MAX_ITEMS_PER_REQUEST,
        retry: RetryPolicy = DEFAULT_RETRY,
        normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
        keep_calls: bool = False,
    ) -> None:
        self.__name__ = name  # TRL names the logged metric after it
        self.address = address
        self.credentials = credentials
        self.timeout_s = timeout_s
        self.max_items_per_request = max_items_per_request
        self.retry = retry
        self.normalization = normalization
        self.keep_calls = keep_calls
        self.model_versions: set[str] = set()
        """Every reward-model version that answered a call."""
        self.last_model_version: str | None = None
        self.calls: list[RewardCall] = []
        """Every call, when ``keep_calls`` (memory grows with the run: for tests and audits)."""

    @staticmethod
    def _texts(
        prompts: Sequence[TrlText], completions: Sequence[TrlText]
    ) -> tuple[list[str], list[str]]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        pairs = [score_pair(p, c) for p, c in zip(prompts, completions, strict=True)]
        return [p for p, _ in pairs], [c for _, c in pairs]

    def _note(
        self, prompts: list[str], completions: list[str], rewards: list[float], version: str
    ) -> list[float]:
        if version:
            self.model_versions.add(version)
            self.last_model_version = version
        if self.keep_calls:
            self.calls.append(RewardCall(prompts, completions, list(rewards), version))
        return rewards

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r}, name={self.__name__!r})"


class PlauditReward(_PlauditRewardBase):
    """A blocking TRL reward function backed by the reward service at ``address``.

    ``credentials``: API key (role ``score``) and TLS; ``name``: the ``__name__`` TRL logs under;
    ``timeout_s``: the deadline of one call (all its chunks and retries); ``max_items_per_request``
    and ``retry``: as :class:`~plaudit.services.reward.client.RewardClient`. A call returns a
    reward for every completion or raises ``RewardRpcError`` (TRL then stops: a reward it did
    not get is not made up). The channel opens on the first call; :meth:`close` closes it.
    """

    def __init__(self, address: str, credentials: ClientCredentials = INSECURE, **kw: Any) -> None:
        super().__init__(address, credentials, **kw)
        self._client: RewardClient | None = None

    def __call__(
        self,
        prompts: Sequence[TrlText],
        completions: Sequence[TrlText],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """One reward per completion, in order (the other TRL arguments are ignored)."""
        texts = self._texts(prompts, completions)
        if self._client is None:
            self._client = RewardClient(
                self.address,
                self.credentials,
                timeout_s=self.timeout_s,
                max_items_per_request=self.max_items_per_request,
                retry=self.retry,
            )
        rewards, version = self._client.score(*texts, normalization=self.normalization)
        return self._note(*texts, rewards, version)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> PlauditReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable (a channel is not): reconnect lazily
        return {**self.__dict__, "_client": None}


class AsyncPlauditReward(_PlauditRewardBase):
    """The asyncio twin of :class:`PlauditReward` (same arguments): ``await reward(prompts=...,
    completions=...)``. Chunks go out concurrently. The grpc.aio channel belongs to the event
    loop of the first call (TRL keeps one loop for the whole run); called from another loop it
    opens a new channel there. :meth:`aclose` closes it, on its loop."""

    def __init__(self, address: str, credentials: ClientCredentials = INSECURE, **kw: Any) -> None:
        super().__init__(address, credentials, **kw)
        self._client: AsyncRewardClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(
        self,
        prompts: Sequence[TrlText],
        completions: Sequence[TrlText],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """One reward per completion, in order (the other TRL arguments are ignored)."""
        texts = self._texts(prompts, completions)
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = AsyncRewardClient(
                self.address,
                self.timeout_s,
                credentials=self.credentials,
                max_items_per_request=self.max_items_per_request,
                retry=self.retry,
            )
            self._loop = loop
        rewards, version = await self._client.score(*texts, normalization=self.normalization)
        return self._note(*texts, rewards, version)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._loop = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_loop": None}
