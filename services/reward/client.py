"""The reward service's clients: :class:`RewardClient` (blocking: the CLI, the demo, the
benchmark, the trainer, TRL through :mod:`plaudit.services.reward.trl`) and
:class:`AsyncRewardClient` (grpc.aio: generation rerank, feedback active learning).

Both behave the same way:

* **Deadline.** ``timeout`` (default ``timeout_s``) bounds the whole call: every chunk, every
  retry and every backoff pause; each RPC gets what is left of it.
* **Retries.** A call that fails with ``UNAVAILABLE`` (the server is not up yet, restarting, or
  the connection dropped) is tried again, up to ``retry.max_attempts`` attempts in all, after an
  exponential backoff with jitter, as long as the deadline leaves room for the pause. Nothing
  else is retried: ``RESOURCE_EXHAUSTED`` (overloaded: retrying at once would make it worse),
  ``DEADLINE_EXCEEDED``, ``INVALID_ARGUMENT``, ``UNAUTHENTICATED``, ... fail at once. Scoring
  changes nothing on the server, so a retry can never count twice.
* **Chunking.** :meth:`RewardClient.score` splits a batch into requests of at most
  ``max_items_per_request`` items (the server's ``max_items_per_request``, 256 by default) and
  reassembles the rewards **in input order**. The blocking client sends the chunks one after the
  other, the asyncio one concurrently.
* **All or nothing, one model version.** A call returns a reward for every item or raises; and
  every reward of a call comes from the one model version it returns. If the server swaps
  versions between two chunks, the chunks scored by the older version are scored again; while
  replicas disagree (a fleet mid-rollout), each further round waits the retry backoff first, so
  the fleet can converge, for up to ``_MAX_VERSION_ROUNDS`` rounds within the deadline.
* **Errors.** A failed call raises :class:`RewardRpcError`: a ``grpc.aio.AioRpcError`` (so also a
  ``grpc.RpcError``) whose ``code()`` is the final gRPC status and whose ``details()`` say which
  call failed, after how many attempts, and what the server said. :func:`domain_error` maps it to
  a Plaudit error for a service that relays it.
* **Security.** ``credentials`` (:class:`ClientCredentials`) carry the API key (role ``score``)
  and the TLS files, if the server wants them.
* **Many replicas.** ``address`` may name several reward-service processes: a list of
  ``IP:port`` (or one string of them, comma-separated), or one DNS name that resolves to every
  replica (``dns:///plaudit-reward-headless:50051``, a Kubernetes headless Service). The channel
  uses gRPC's own ``round_robin`` load balancing (:func:`channel_target`,
  :data:`ROUND_ROBIN`): one connection per replica, calls spread over the ready ones, a replica
  that goes away skipped (its calls fail UNAVAILABLE and are retried on another). While the
  replicas converge on a newly promoted version, chunks of one call may be answered by two
  versions: the older ones are scored again (see above).

Usage::

    from plaudit.services.common.security.client import ClientCredentials
    from plaudit.services.reward.client import RetryPolicy, RewardClient

    creds = ClientCredentials(api_key="...", ca_file=Path("ca.pem"))
    with RewardClient("reward.internal:50051", creds, retry=RetryPolicy(max_attempts=6)) as rc:
        rewards, version = rc.score(prompts, completions, timeout=30)

    # two replicas, round robin (or one "dns:///NAME:PORT" that resolves to every replica):
    with RewardClient(["10.0.0.7:50051", "10.0.0.8:50051"]) as rc:
        rewards, version = rc.score(prompts, completions)

    # asyncio (create it inside the loop that uses it):
    client = AsyncRewardClient("127.0.0.1:50051", timeout_s=30)
    rewards, version = await client.score(prompts, completions)
    await client.close()
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plaudit.services.common.errors import (
    FailedPreconditionError,
    PlauditError,
    ResourceExhaustedError,
    UnavailableError,
)
from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.v1 import reward_pb2, reward_pb2_grpc

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
"""The statuses a call is retried on."""
MAX_ITEMS_PER_REQUEST = 256
"""The server's default ``max_items_per_request``: the clients' default chunk size."""
_MAX_VERSION_ROUNDS = 8  # rescoring rounds after a model swap before a call gives up (ABORTED)
ROUND_ROBIN = (("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),)
"""The clients' channel options: gRPC's ``round_robin`` policy over every address the target
resolves to (one for a plain ``host:port`` behind a ClusterIP, every replica for a list of
addresses or a headless Service's name)."""

R = TypeVar("R")


@dataclass(frozen=True)
class RetryPolicy:
    """How a call that failed with a status in :data:`RETRIED_CODES` is tried again.

    ``max_attempts`` counts the first try (1: never retry). Before retry ``k`` (1, 2, ...) the
    client pauses ``d/2 + uniform(0, d/2)`` seconds with
    ``d = min(max_backoff_s, initial_backoff_s * multiplier ** (k - 1))``; it gives up early when
    the pause would outlast the call's deadline.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 3.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be non-negative and multiplier at least 1")

    def backoff(self, retry: int) -> float:
        """Seconds to pause before retry number ``retry`` (1 for the first retry)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return cap / 2 + random.uniform(0, cap / 2)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


class RewardRpcError(grpc.aio.AioRpcError):
    """A reward call that failed: ``code()`` is the final gRPC status, ``details()`` name the
    call, the attempts made and the server's own message; ``attempts`` counts the tries."""

    def __init__(
        self, address: str, code: grpc.StatusCode, details: str, attempts: int = 0
    ) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
        self.address = address
        self.attempts = attempts

    def __str__(self) -> str:
        return f"reward service at {self.address}: {self.code().name}: {self.details()}"

    __repr__ = __str__


_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _ip_endpoint(entry: str) -> tuple[int, str]:
    """``(IP version, entry)`` for ``IP:port`` / ``[IPv6]:port``; ValueError otherwise."""
    host, sep, port = entry.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address: {entry!r} is not IP:port")
    try:
        ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(
            f"address: {entry!r}: several replicas are listed by IP:port; give names as one "
            "target that resolves to every replica instead (dns:///NAME:PORT, e.g. a "
            "Kubernetes headless Service)"
        ) from None
    return ip.version, entry


def channel_target(address: str | Sequence[str]) -> str:
    """The one gRPC target for ``address``: one reward service, or several replicas of it.

    A single address (``host:port``, or any gRPC target: ``dns:///NAME:PORT``,
    ``ipv4:IP:PORT,IP:PORT``) is used as it is. Several addresses (a sequence, or one string of
    comma-separated entries) must be ``IP:port`` of one IP version and become one ``ipv4:`` or
    ``ipv6:`` target listing them all. Raises ValueError naming ``address`` otherwise.
    """
    entries = [address] if isinstance(address, str) else list(address)
    if any(entry.strip().startswith(_TARGET_SCHEMES) for entry in entries):
        if len(entries) > 1:
            raise ValueError("address: a gRPC target (dns:///..., ipv4:...) goes alone")
        return entries[0].strip()
    parts = [part.strip() for entry in entries for part in entry.split(",")]
    if not parts or any(not part for part in parts):
        raise ValueError(f"address: empty entry in {address!r}")
    if len(parts) == 1:
        return parts[0]
    endpoints = [_ip_endpoint(part) for part in parts]
    versions = {version for version, _ in endpoints}
    if len(versions) > 1:
        raise ValueError(f"address: mixes IPv4 and IPv6 addresses: {address!r}")
    return f"ipv{versions.pop()}:" + ",".join(entry for _, entry in endpoints)


def _describe(address: str | Sequence[str]) -> str:
    return address if isinstance(address, str) else ",".join(address)


def score_request(
    prompts: Sequence[str],
    completions: Sequence[str],
    normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
    *,
    model: str = "",
    objective: str = "",
    tags: Sequence[Sequence[str]] | None = None,
) -> reward_pb2.ScoreRequest:
    """One ``Score`` request of (prompt, completion) pairs, in order, for the named ``model``
    or ``objective`` (neither: the service's default model), with each prompt's ``tags``."""
    item_tags = tags if tags is not None else [()] * len(prompts)
    items = [
        reward_pb2.ScoreItem(prompt=p, completion=c, tags=list(t))
        for p, c, t in zip(prompts, completions, item_tags, strict=True)
    ]
    return reward_pb2.ScoreRequest(
        items=items, normalization=normalization, model=model, objective=objective
    )


def _single_request(
    prompts: Sequence[str],
    completions: Sequence[str],
    limit: int,
    normalization: reward_pb2.Normalization,
    model: str,
) -> reward_pb2.ScoreRequest:
    _check_pairs(prompts, completions)
    if len(prompts) > limit:
        raise ValueError(f"{len(prompts)} items exceed max_items_per_request ({limit}): score()")
    return score_request(prompts, completions, normalization, model=model)


def domain_error(address: str, exc: grpc.RpcError) -> PlauditError:
    """The Plaudit error a failed reward call becomes for a service that relays it:
    UNAVAILABLE when the reward service cannot answer in time, RESOURCE_EXHAUSTED when it is
    overloaded, FAILED_PRECONDITION otherwise."""
    code, details = exc.code(), exc.details()
    message = f"reward service at {address}: {code.name}: {details}"
    if code in _UNAVAILABLE:
        return UnavailableError(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(message)
    return FailedPreconditionError(message)


def wait_until_serving(
    address: str,
    timeout: float = 120.0,
    service: str = "",
    credentials: ClientCredentials = INSECURE,
) -> None:
    """Block until the server's health check says SERVING (raise TimeoutError otherwise).

    Health needs no API key; ``credentials`` matter for a TLS server.
    """
    deadline = time.monotonic() + timeout
    with credentials.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} did not report SERVING within {timeout:.0f}s")


# -- what both clients share: planning chunks, deciding on retries, wording errors ---------------
def _chunk_slices(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _check_pairs(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def _what(part: slice, n: int) -> str:
    return f"Score of items {part.start}..{part.stop - 1} (of {n})"


class _Attempts:
    """One RPC's attempts against one call deadline: decides whether to retry, words the error."""

    def __init__(
        self, address: str, what: str, deadline: float, budget: float, retry: RetryPolicy
    ) -> None:
        self.address, self.what, self.deadline, self.budget = address, what, deadline, budget
        self.retry = retry
        self.made = 0

    def remaining(self) -> float:
        """Seconds left for the next attempt; raises DEADLINE_EXCEEDED when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RewardRpcError(
                self.address,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{self.what}: the call's {self.budget:g} s deadline passed "
                f"after {self.made} attempt(s)",
                self.made,
            )
        self.made += 1
        return left

    def pause_or_raise(self, exc: grpc.RpcError) -> float:
        """The backoff before the next attempt, or raise the final error for ``exc``."""
        code = exc.code()
        if code in RETRIED_CODES and self.made < self.retry.max_attempts:
            pause = self.retry.backoff(self.made)
            if time.monotonic() + pause < self.deadline:
                return pause
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            why = f"no answer within the call's {self.budget:g} s deadline"
        else:
            why = str(exc.details())
        raise RewardRpcError(
            self.address,
            code,
            f"{self.what}: {why} ({self.made} attempt(s), deadline {self.budget:g} s)",
            self.made,
        ) from exc


def _assemble(
    address: str, n: int, parts: list[slice], replies: list[tuple[list[float], str]]
) -> list[float]:
    """The chunks' rewards put back in input order."""
    rewards: list[float] = [0.0] * n
    for part, (got, _) in zip(parts, replies, strict=True):
        if len(got) != part.stop - part.start:
            raise RewardRpcError(
                address,
                grpc.StatusCode.INTERNAL,
                f"{_what(part, n)}: {len(got)} rewards came back",
            )
        rewards[part] = got
    return rewards


def _version_churn(address: str) -> RewardRpcError:
    return RewardRpcError(
        address,
        grpc.StatusCode.ABORTED,
        "the model version kept changing: the chunks' answers named different versions through "
        f"{_MAX_VERSION_ROUNDS} rounds of rescoring (or until the deadline)",
    )


def _convergence_pause(retry: RetryPolicy, round_: int, deadline: float) -> float | None:
    """The pause before rescoring round ``round_`` (0 at once: one server swapped between
    chunks; later rounds mean replicas still disagree, so wait the retry backoff for them to
    converge); None when the deadline leaves no room for it."""
    pause = retry.backoff(round_) if round_ else 0.0
    return pause if time.monotonic() + pause < deadline else None


def _stale(replies: list[tuple[list[float], str]], target: str) -> list[int]:
    return [i for i, (_, version) in enumerate(replies) if version != target]


class RewardClient:
    """Blocking client: ``score`` and ``compare`` return plain Python values.

    ``address``: one reward service, or several replicas balanced round robin (a list of
    ``IP:port``, or one ``dns:///NAME:PORT`` that resolves to all of them; :func:`channel_target`).
    ``credentials`` carry the API key (role ``score``) and TLS files, if the server wants them.
    ``timeout_s`` is the default deadline of a call, ``max_items_per_request`` the chunk size of
    :meth:`score` (at most the server's limit), ``retry`` the retry policy (see the module doc).
    Thread-safe: one client (one channel) can serve many threads.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        credentials: ClientCredentials = INSECURE,
        *,
        timeout_s: float = 60.0,
        max_items_per_request: int = MAX_ITEMS_PER_REQUEST,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if max_items_per_request < 1:
            raise ValueError("max_items_per_request must be at least 1")
        target = channel_target(address)
        self.address = _describe(address)
        self.timeout_s = timeout_s
        self.max_items_per_request = max_items_per_request
        self.retry = retry
        self.channel = credentials.channel(target, ROUND_ROBIN)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    def _call(
        self, rpc: Callable[..., R], request: Any, what: str, deadline: float, budget: float
    ) -> R:
        attempts = _Attempts(self.address, what, deadline, budget, self.retry)
        while True:
            timeout = attempts.remaining()
            try:
                return rpc(request, timeout=timeout)
            except grpc.RpcError as exc:
                time.sleep(attempts.pause_or_raise(exc))

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        budget = self.timeout_s if timeout is None else timeout
        return time.monotonic() + budget, budget

    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        timeout: float | None = None,
        normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
        *,
        model: str = "",
        objective: str = "",
        tags: Sequence[Sequence[str]] | None = None,
    ) -> tuple[list[float], str]:
        """Rewards in input order and the one reward-model version that gave them all.

        ``model`` names a reward model, ``objective`` an objective combining several (the
        version is then ``name=version,...``); ``tags`` are each prompt's tags (gated
        objectives read them). Sent as requests of at most ``max_items_per_request`` items,
        one after the other; ``timeout`` (default ``timeout_s``) bounds the whole call. No
        items: ``([], "")``. Raises :class:`RewardRpcError` (nothing is returned unless every
        item was scored).
        """
        _check_pairs(prompts, completions)
        if tags is not None and len(tags) != len(prompts):
            raise ValueError(f"{len(tags)} tag lists for {len(prompts)} prompts")
        n = len(prompts)
        parts = _chunk_slices(n, self.max_items_per_request)
        deadline, budget = self._deadline(timeout)

        finished: list[int] = []  # chunk indices in the order their answers arrived

        def one(i: int) -> tuple[list[float], str]:
            part = parts[i]
            request = score_request(
                prompts[part],
                completions[part],
                normalization,
                model=model,
                objective=objective,
                tags=None if tags is None else tags[part],
            )
            reply = self._call(self.stub.Score, request, _what(part, n), deadline, budget)
            finished.append(i)
            return list(reply.rewards), reply.model_version

        replies = [one(i) for i in range(len(parts))]
        if not replies:
            return [], ""
        for round_ in range(_MAX_VERSION_ROUNDS):
            target = replies[finished[-1]][1]  # the version that answered last: the newest one
            stale = _stale(replies, target)
            if not stale:
                return _assemble(self.address, n, parts, replies), target
            pause = _convergence_pause(self.retry, round_, deadline)
            if pause is None:
                break
            time.sleep(pause)
            for i in stale:
                replies[i] = one(i)
        raise _version_churn(self.address)

    def compare(
        self,
        prompt: str,
        a: str,
        b: str,
        timeout: float | None = None,
        normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
        *,
        model: str = "",
        objective: str = "",
        tags: Sequence[str] = (),
    ) -> reward_pb2.CompareResponse:
        """Both rewards and the probability that ``a`` is preferred (one version of each
        model), by the named ``model`` or ``objective`` (neither: the default model)."""
        request = reward_pb2.CompareRequest(
            prompt=prompt,
            completion_a=a,
            completion_b=b,
            normalization=normalization,
            model=model,
            objective=objective,
            tags=list(tags),
        )
        return self._call(self.stub.Compare, request, "Compare", *self._deadline(timeout))

    def score_response(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        timeout: float | None = None,
        normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
        *,
        model: str = "",
    ) -> reward_pb2.ScoreResponse:
        """One ``Score`` request (at most ``max_items_per_request`` items), the whole reply: with
        an ensemble version also each item's ``spread`` and every head's ``member_rewards``."""
        request = _single_request(
            prompts, completions, self.max_items_per_request, normalization, model
        )
        return self._call(self.stub.Score, request, "Score", *self._deadline(timeout))

    def model(self, timeout: float | None = 10.0, name: str = "") -> reward_pb2.GetModelResponse:
        """The version of the named model (default: the service's default) serving now, with
        every served model in ``models``."""
        request = reward_pb2.GetModelRequest(model=name)
        return self._call(self.stub.GetModel, request, "GetModel", *self._deadline(timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRewardClient:
    """grpc.aio client (make it inside the loop that uses it); ``timeout_s`` caps every call.

    The same behaviour as :class:`RewardClient` (see the module doc; ``address`` as there);
    :meth:`score` sends its chunks concurrently, at most ``max_concurrent_requests`` at a time.
    """

    def __init__(
        self,
        address: str | Sequence[str],
        timeout_s: float = 60.0,
        *,
        credentials: ClientCredentials = INSECURE,
        max_items_per_request: int = MAX_ITEMS_PER_REQUEST,
        max_concurrent_requests: int = 8,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        if max_items_per_request < 1 or max_concurrent_requests < 1:
            raise ValueError("max_items_per_request and max_concurrent_requests must be >= 1")
        target = channel_target(address)
        self.address = _describe(address)
        self.timeout_s = timeout_s
        self.max_items_per_request = max_items_per_request
        self.max_concurrent_requests = max_concurrent_requests
        self.retry = retry
        self._channel = credentials.aio_channel(target, ROUND_ROBIN)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def _call(
        self,
        rpc: Callable[..., Awaitable[R]],
        request: Any,
        what: str,
        deadline: float,
        budget: float,
    ) -> R:
        attempts = _Attempts(self.address, what, deadline, budget, self.retry)
        while True:
            timeout = attempts.remaining()
            try:
                return await rpc(request, timeout=timeout)
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.pause_or_raise(exc))

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        budget = self.timeout_s if timeout is None else min(timeout, self.timeout_s)
        return time.monotonic() + budget, budget

    async def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        timeout: float | None = None,
        normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
        *,
        model: str = "",
        objective: str = "",
        tags: Sequence[Sequence[str]] | None = None,
    ) -> tuple[list[float], str]:
        """Rewards in input order and the one reward-model version that gave them all.

        ``timeout`` (e.g. the caller's own deadline) can only shorten ``timeout_s``; it bounds
        the whole call. If one chunk fails the others are cancelled and the call raises
        :class:`RewardRpcError`. No items: ``([], "")``.
        """
        _check_pairs(prompts, completions)
        if tags is not None and len(tags) != len(prompts):
            raise ValueError(f"{len(tags)} tag lists for {len(prompts)} prompts")
        n = len(prompts)
        parts = _chunk_slices(n, self.max_items_per_request)
        deadline, budget = self._deadline(timeout)
        gate = asyncio.Semaphore(self.max_concurrent_requests)
        finished: list[int] = []  # chunk indices in the order their answers arrived

        async def one(i: int) -> tuple[list[float], str]:
            part = parts[i]
            request = score_request(
                prompts[part],
                completions[part],
                normalization,
                model=model,
                objective=objective,
                tags=None if tags is None else tags[part],
            )
            async with gate:
                reply = await self._call(
                    self._stub.Score, request, _what(part, n), deadline, budget
                )
            finished.append(i)
            return list(reply.rewards), reply.model_version

        async def run(indices: list[int]) -> list[tuple[list[float], str]]:
            tasks = [asyncio.ensure_future(one(i)) for i in indices]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for task in tasks:
                    task.cancel()
                raise

        replies = await run(list(range(len(parts))))
        if not replies:
            return [], ""
        for round_ in range(_MAX_VERSION_ROUNDS):
            target = replies[finished[-1]][1]  # the version that answered last: the newest one
            stale = _stale(replies, target)
            if not stale:
                return _assemble(self.address, n, parts, replies), target
            pause = _convergence_pause(self.retry, round_, deadline)
            if pause is None:
                break
            await asyncio.sleep(pause)
            for i, reply in zip(stale, await run(stale), strict=True):
                replies[i] = reply
        raise _version_churn(self.address)

    async def score_response(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        timeout: float | None = None,
        normalization: reward_pb2.Normalization = reward_pb2.NORMALIZATION_UNSPECIFIED,
        *,
        model: str = "",
    ) -> reward_pb2.ScoreResponse:
        """One ``Score`` request (at most ``max_items_per_request`` items), the whole reply: with
        an ensemble version also each item's ``spread`` and every head's ``member_rewards``."""
        request = _single_request(
            prompts, completions, self.max_items_per_request, normalization, model
        )
        deadline, budget = self._deadline(timeout)
        return await self._call(self._stub.Score, request, "Score", deadline, budget)

    async def model(
        self, timeout: float | None = 10.0, name: str = ""
    ) -> reward_pb2.GetModelResponse:
        """The version of the named model (default: the service's default) serving now, with
        every served model in ``models``."""
        request = reward_pb2.GetModelRequest(model=name)
        return await self._call(self._stub.GetModel, request, "GetModel", *self._deadline(timeout))

    async def close(self) -> None:
        await self._channel.close()
