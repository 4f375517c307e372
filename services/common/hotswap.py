"""Hot swap: follow a registry's promotion pointer and replace the live model safely.

One :class:`ModelWatcher` per serving process. It polls the registry (and wakes at once on
:meth:`ModelWatcher.trigger`, e.g. from the admin RPC), and when the promotion pointer changes it
loads the promoted version *beside* the live one in a worker thread: ``load`` must verify the
files' sha256 against the manifest, build the session, warm it up and score a smoke batch, raising
on any problem. Only a candidate that passed every check is handed to ``activate`` (a coroutine
of the owner whose switch is one atomic reference assignment), so batches already running finish
on the model they started with, and the old model is released when its last batch drops it.

A candidate that fails never replaces a working model: the failure is logged, counted, and kept
as ``last_error`` (``GetModel`` shows it). A rejected candidate (bad hash, graph, smoke batch) is
retried only when the pointer changes again (a new promotion, a rollback, or the same version
promoted anew); a storage or network error (``OSError``: a cut-off download, a full disk) is
retried at the next poll.

The mechanism is model-agnostic: :class:`~plaudit.services.common.model_server.ModelServer` (the
reward and generation services) drives it, one watcher per named model, and one more per shadow:
a watcher given ``pointer=registry.shadow_record`` and ``unload`` follows the shadow pointer, and
unloads the candidate when the pointer is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plaudit.services.common.registry import ModelRegistry

log = logging.getLogger(__name__)

M = TypeVar("M")


class SwapMetrics:
    """Swap outcomes and durations, labelled by named model."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.swaps = Counter(
            f"{prefix}_model_swaps",
            "Attempts to make a promoted version live, by named model and result (success, "
            "failure).",
            ["model", "result"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            f"{prefix}_model_load_seconds",
            "Time to verify, load, warm up and smoke-test a candidate version.",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.last_swap = Gauge(
            f"{prefix}_model_last_swap_timestamp_seconds",
            "Unix time of the last successful swap, by named model.",
            ["model"],
            registry=registry,
        )
        self.swap_failing = Gauge(
            f"{prefix}_model_swap_failing",
            "1 while the promoted version could not be made live (the previous one serves), by "
            "named model.",
            ["model"],
            registry=registry,
        )


@dataclass(frozen=True)
class PointerState:
    """What the registry promotes, and when it was promoted (a re-promotion changes ``at``)."""

    version: str
    at: str


_UNREADABLE = PointerState("", "unreadable")


def read_pointer(pointer: Callable[[], dict[str, Any] | None]) -> PointerState | None:
    """The pointer now; None when nothing is promoted, ``_UNREADABLE`` when it cannot be read
    (a torn file, a storage outage: the live model keeps serving and the next poll tries
    again)."""
    try:
        data = pointer()
    except Exception as exc:
        log.warning("unreadable promotion pointer", extra={"error": str(exc)})
        return _UNREADABLE
    if data is None:
        return None
    return PointerState(str(data["version"]), str(data.get("at", "")))


@dataclass(frozen=True)
class SwapOutcome:
    live_version: str | None
    promoted_version: str | None
    swapped: bool
    error: str


class ModelWatcher(Generic[M]):
    """Follows ``registry`` (its promotion pointer, or ``pointer``) and calls ``activate(model)``
    for every version that loads cleanly; with ``unload``, a removed pointer unloads the model."""

    def __init__(
        self,
        registry: ModelRegistry,
        load: Callable[[str], M],
        activate: Callable[[M], Awaitable[None]],
        *,
        poll_interval_s: float,
        metrics: SwapMetrics | None = None,
        pointer: Callable[[], dict[str, Any] | None] | None = None,
        unload: Callable[[], Awaitable[None]] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self._pointer = pointer or registry.pointer_record
        self._unload = unload
        self._refresh = refresh  # the pointer changed but names the version already loaded
        self.name = registry.name
        self._load = load
        self._activate = activate
        self.poll_interval_s = poll_interval_s
        self._metrics = metrics
        self.live_version: str | None = None
        self.last_error = ""
        self._seen: PointerState | None = None  # last pointer state acted on (success or not)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._first_model = asyncio.Event()

    def trigger(self) -> None:
        """Check the registry now instead of at the next poll."""
        self._wake.set()

    async def wait_for_first_model(self, timeout: float) -> None:
        await asyncio.wait_for(self._first_model.wait(), timeout)

    async def check(self) -> SwapOutcome:
        """Act on the current pointer once (serialised with the background loop)."""
        async with self._lock:
            # a remote registry is a network call: keep it off the event loop
            state = await asyncio.to_thread(read_pointer, self._pointer)
            if state is _UNREADABLE:
                return SwapOutcome(self.live_version, None, False, self.last_error)
            if state is None and self._unload is not None and self.live_version is not None:
                await self._unload()  # the pointer was removed (a shadow stopped)
                self.live_version, self._seen, self.last_error = None, None, ""
                return SwapOutcome(None, None, True, "")
            if state is None or state == self._seen:
                return SwapOutcome(
                    self.live_version, state.version if state else None, False, self.last_error
                )
            self._seen = state
            if state.version == self.live_version:  # re-promotion of what already serves
                self.last_error = ""
                if self._refresh is not None:
                    await self._refresh()  # e.g. a shadow's new fraction
                return SwapOutcome(self.live_version, state.version, False, "")
            return await self._swap_to(state.version)

    async def _swap_to(self, version: str) -> SwapOutcome:
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._load, version)
        except Exception as exc:  # every failure is reported; the live model keeps serving
            self.last_error = f"{version}: {exc}"
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                # storage or network trouble (a download cut off, a full disk): not a verdict on
                # the candidate, so the next poll tries the same pointer again
                self._seen = None
            if self._metrics is not None:
                self._metrics.swaps.labels(self.name, "failure").inc()
                self._metrics.swap_failing.labels(self.name).set(1)
            log.error(
                "candidate model rejected; the live version keeps serving",
                extra={"candidate": version, "live": self.live_version, "error": str(exc)},
            )
            return SwapOutcome(self.live_version, version, False, self.last_error)
        previous = self.live_version
        await self._activate(model)
        self.live_version = version
        self.last_error = ""
        self._first_model.set()
        if self._metrics is not None:
            self._metrics.swaps.labels(self.name, "success").inc()
            self._metrics.load_seconds.labels(self.name).observe(time.perf_counter() - started)
            self._metrics.last_swap.labels(self.name).set(time.time())
            self._metrics.swap_failing.labels(self.name).set(0)
        log.info(
            "model version live",
            extra={"version": version, "previous": previous,
                   "load_s": round(time.perf_counter() - started, 3)},
        )  # fmt: skip
        return SwapOutcome(version, version, True, "")

    async def run(self) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            outcome = await self.check()
            if (
                outcome.promoted_version is None
                and self.live_version is None
                and self._unload is None  # a shadow watcher has nothing to wait for
            ):
                kind, label = self.registry.kind, self.registry.label
                log.warning(
                    "no promoted %s model yet; waiting (`plaudit export %s --promote "
                    "--registry %s` publishes one; `plaudit up` bootstraps one)",
                    label, kind, self.registry.root,
                    extra={"registry": self.registry.root, "once": f"no-{label}-model"},
                )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
