"""Plaudit as verl's custom reward function: the served reward model scores verl's rollouts.

verl calls its custom reward function once per response, with keywords only (its reward
managers, ``verl/experimental/reward_loop/reward_manager/naive.py`` and, in older releases,
``verl/workers/reward_manager/naive.py``)::

    compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...,
                  **reward_kwargs)

``solution_str`` is the decoded response (special tokens skipped); the prompt is not passed, so
the dataset keeps it in ``extra_info``: ``extra_info["prompt"]`` (the chat messages, a list of
``{"role", "content"}``, or a string), else ``extra_info["question"]`` (what verl's own
GSM8K/MATH preprocessing scripts store). The pair becomes one ``Score`` item the way the TRL
reward function maps a conversation (:func:`~plaudit.services.reward.trl.score_pair`), so the
reward model scores it in its own format, whatever the policy's chat template. Returns the
reward as a float (``Score``'s default normalisation; ``normalization="NORMALIZATION_RAW"`` for
the raw head output); a call that cannot be scored raises (verl stops rather than train on a
made-up reward).

Configuration, through verl's ``reward_kwargs`` (Hydra needs the ``+`` to add them):
``address`` (required: ``host:port``, several ``IP:port`` comma-separated, or
``dns:///NAME:PORT``; balanced round robin), ``timeout_s``, ``normalization``. The API key and
TLS files come from the environment of verl's reward workers (``PLAUDIT_API_KEY``,
``PLAUDIT_TLS_CA_FILE``, ...), never from the command line verl logs. One blocking client per
worker process and address is kept open; verl's reward loop runs the calls in threads and the
service batches them.

Usage (``pkg://`` needs a verl with the reward loop; older ones take the file's path)::

    python -m verl.trainer.main_ppo ... \\
        reward.custom_reward_function.path=pkg://plaudit.services.reward.verl \\
        reward.custom_reward_function.name=compute_score \\
        +reward.custom_reward_function.reward_kwargs.address=reward.internal:50051
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, cast

from plaudit.services.common.security.client import ClientSecuritySettings
from plaudit.services.reward.client import RewardClient
from plaudit.services.reward.trl import TrlText, score_pair
from plaudit.v1 import reward_pb2

_clients: dict[tuple[str, float], RewardClient] = {}
_lock = threading.Lock()


def verl_prompt(extra_info: object) -> TrlText:
    """The prompt of one verl sample from its ``extra_info`` (see the module doc); ValueError
    naming the field when there is none."""
    if not isinstance(extra_info, Mapping):
        raise ValueError(
            "extra_info: must be a mapping holding the prompt (extra_info.prompt: the chat "
            f"messages or text), got {type(extra_info).__name__}"
        )
    for key in ("prompt", "question"):
        value = extra_info.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            return value
        if isinstance(value, Sequence) or hasattr(value, "tolist"):  # a list, or numpy from parquet
            messages = list(value)
            if all(isinstance(m, Mapping) and "role" in m for m in messages):
                return messages
        raise ValueError(
            f"extra_info.{key}: must be a string or a list of {{role, content}} messages"
        )
    raise ValueError(
        "extra_info.prompt: missing; verl passes no prompt to a reward function, so the dataset "
        "keeps it in extra_info (the chat messages or the text)"
    )


def _client(address: str, timeout_s: float) -> RewardClient:
    """This process's client for ``address`` (thread-safe: verl calls from several threads)."""
    with _lock:
        client = _clients.get((address, timeout_s))
        if client is None:
            credentials = ClientSecuritySettings().credentials
            client = RewardClient(address, credentials, timeout_s=timeout_s)
            _clients[(address, timeout_s)] = client
        return client


def compute_score(
    data_source: object = None,
    solution_str: str = "",
    ground_truth: object = None,
    extra_info: object = None,
    *,
    address: str = "",
    timeout_s: float = 120.0,
    normalization: str = "NORMALIZATION_UNSPECIFIED",
    **kwargs: Any,
) -> float:
    """The reward of ``solution_str`` for the prompt in ``extra_info`` (verl's custom reward
    function; see the module doc). Other keywords verl adds are ignored."""
    if not address:
        raise ValueError(
            "address: the reward service's address is required: "
            "+reward.custom_reward_function.reward_kwargs.address=HOST:PORT"
        )
    if not isinstance(solution_str, str):
        raise ValueError(f"solution_str: must be a string, got {type(solution_str).__name__}")
    names = list(reward_pb2.Normalization.keys())
    if normalization not in names:
        raise ValueError(f"normalization: must be one of {', '.join(names)}, got {normalization!r}")
    prompt, completion = score_pair(verl_prompt(extra_info), solution_str)
    mode = cast("reward_pb2.Normalization", reward_pb2.Normalization.Value(normalization))
    rewards, _ = _client(address, timeout_s).score([prompt], [completion], normalization=mode)
    return float(rewards[0])


def close() -> None:
    """Close the clients this process opened."""
    with _lock:
        for client in _clients.values():
            client.close()
        _clients.clear()
