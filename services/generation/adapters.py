"""Promoted policies into an OpenAI-compatible backend as LoRA adapters (``--backend-adapters``).

vLLM serves a base model and loads LoRA adapters at run time: ``POST /v1/load_lora_adapter``
with ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter`` with ``{"lora_name"}``
(vLLM's ``entrypoints/openai/serving_models.py``; the server needs ``--enable-lora``, a
``--max-lora-rank`` at least the adapter's, and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). A
loaded adapter is then a model like any other: ``/v1/models`` lists it and a request names it in
``model``. A policy trained with ``--lora-r`` ships its adapter in PEFT's format beside the merged
graph (the manifest's ``lora_adapter``), so the backend can serve it without a new deployment.

Every ``backend_poll_s``, :meth:`AdapterFollower.sync` reads the registry's promoted policy and,
when it is not the one in use:

1. checks it out (every file's sha256 verified; a remote registry's copy lands in the cache);
2. refuses it, logged once and counted (``refused``), when it has no adapter or its adapter was
   trained on another policy (``stacked_on``: the adapter alone is not that policy);
3. loads it under the version's own name (vLLM's "already been loaded" counts as loaded), from
   ``backend_adapter_root/<version>/<adapter path>`` (or this service's own path when no root
   is set: the same machine, or a volume mounted at the same path);
4. switches: requests from then on name the version, and responses say so. The adapter it
   replaces is unloaded once no request of this service uses it and ``unload_grace_s`` has
   passed (time for other replicas sharing the backend to switch as well).

A load the backend refuses or cannot answer (``failed``) keeps the version in use and is tried
again, after one poll, then twice as long each time (at most a minute). An adapter in use that
the backend stops listing (a restarted vLLM forgets adapters loaded at run time) is loaded again
at the next poll. At start, until the registry has been read and the promoted version loaded,
:attr:`blocked` says why and the service is NOT_SERVING: it would otherwise answer as a policy
nobody promoted; with nothing promoted (or a promoted version that can never be served this way)
the backend's base model serves, under its own name. ``expected_base`` (when set) refuses
adapters trained on another base model (the manifest's ``lora_adapter.base``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp

from plaudit.services.common.registry import ModelRegistry

log = logging.getLogger(__name__)

Outcome = Callable[[str], None]  # counts "loaded", "unloaded", "failed", "refused"


class AdapterFollower:
    """Which adapter requests name now (:attr:`model`), kept in step with the registry (see the
    module doc). :meth:`sync` runs on the service's event loop, one call at a time."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        adapter_root: str,
        poll_s: float,
        unload_grace_s: float,
        expected_base: str = "",
        outcome: Outcome = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._root = adapter_root.rstrip("/")
        self._poll_s = poll_s
        self._grace_s = unload_grace_s
        self._base = expected_base
        self._outcome = outcome
        self._clock = clock
        self.model: str | None = None  # the version requests name; None: the base model
        self.blocked: str | None = "the registry has not been read yet"  # why nothing serves
        self._lost = False  # the backend no longer lists self.model (restarted): load it again
        self._refused: dict[str, str] = {}  # version -> why it can never be loaded
        self._failures: dict[str, tuple[int, float]] = {}  # version -> (failures, next try)
        self._retired: dict[str, float] = {}  # adapter this service loaded -> when replaced
        self._busy: Counter[str] = Counter()  # model name -> requests in flight
        here = Path(registry.versions_dir if registry.is_local else registry.cache_dir).resolve()
        log.info("following promoted policies as adapters",
                 extra={"version_folders_here": str(here),
                        "backend_root": self._root or "(the same paths)"})  # fmt: skip

    def enter(self, name: str) -> None:
        """A request naming ``name`` started."""
        self._busy[name] += 1

    def leave(self, name: str) -> None:
        """That request finished."""
        self._busy[name] -= 1
        if self._busy[name] <= 0:
            del self._busy[name]

    def listed(self, ids: list[str]) -> None:
        """What the backend's ``/v1/models`` lists now: an adapter in use that is gone (a
        restarted server forgets run-time adapters) is loaded again at the next :meth:`sync`."""
        if self.model is not None and self.model not in ids and not self._lost:
            self._lost = True
            log.warning("the backend no longer lists the adapter in use; loading it again",
                        extra={"version": self.model})  # fmt: skip

    async def sync(self, session: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
        """One poll: follow a new promotion (or reload a lost adapter), then unload what is
        retired and idle."""
        wait = aiohttp.ClientTimeout(total=timeout_s)
        try:
            promoted = await asyncio.to_thread(self._registry.promoted)
        except Exception as exc:  # any store failure: keep what serves
            log.warning("registry unreadable; adapter unchanged", extra={"error": str(exc)})
            if self.model is None:
                self.blocked = f"the registry cannot be read: {exc}"
            return
        if promoted is None:
            if self.model is None:
                self.blocked = None  # nothing promoted: the base model serves
        elif (
            (promoted != self.model or self._lost)
            and promoted not in self._refused
            and self._clock() >= self._failures.get(promoted, (0, 0.0))[1]  # backoff
        ):
            await self._switch(session, url, wait, promoted)
        now = self._clock()
        idle = [
            name
            for name, since in self._retired.items()
            if name != self.model and not self._busy[name] and now - since >= self._grace_s
        ]
        for name in idle:
            if await self._post(session, url, wait, "unload", {"lora_name": name}, (404,)):
                del self._retired[name]
                self._outcome("unloaded")

    def _refuse(self, version: str, why: str) -> None:
        self._refused[version] = why
        self._outcome("refused")
        log.error("promoted policy cannot be served as an adapter",
                  extra={"version": version, "why": why})  # fmt: skip
        if self.model is None:
            self.blocked = None  # nothing this service can load: the base model serves

    async def _switch(
        self, session: aiohttp.ClientSession, url: str, wait: aiohttp.ClientTimeout, version: str
    ) -> None:
        try:
            manifest, folder = await asyncio.to_thread(self._registry.checkout, version)
        except Exception as exc:  # damaged, unsigned, unreachable: try later
            self._fail(version, f"checkout failed: {exc}")
            return
        adapter = manifest.lora_adapter
        if adapter is None:
            self._refuse(version, "it has no LoRA adapter (trained without --lora-r, or exported)")
            return
        if adapter.stacked_on is not None:
            self._refuse(
                version,
                f"its adapter was trained on policy {adapter.stacked_on}, not the base model: "
                "alone it is not this policy (train it with --base set to the base model)",
            )
            return
        if self._base and adapter.base != self._base:
            self._refuse(
                version,
                f"its adapter was trained on {adapter.base!r}, not on the backend's base "
                f"{self._base!r} (--backend-adapter-base)",
            )
            return
        local = Path(folder).resolve() / adapter.path
        path = f"{self._root}/{version}/{adapter.path}" if self._root else str(local)
        body = {"lora_name": version, "lora_path": path}
        if not await self._post(session, url, wait, "load", body, (), "has already been loaded"):
            self._fail(version, f"the backend did not load {path}")
            return
        self._outcome("loaded")
        log.info("adapter loaded; requests name it now",
                 extra={"version": version, "path": path, "base": adapter.base,
                        "replaces": self.model})  # fmt: skip
        if self.model is not None and self.model != version:
            self._retired[self.model] = self._clock()
        self._retired.pop(version, None)
        self._failures.pop(version, None)
        self.model, self.blocked, self._lost = version, None, False

    def _fail(self, version: str, why: str) -> None:
        """Count a failed load; the next try waits ``poll * 2**(failures - 1)``, at most 60 s."""
        failures = self._failures.get(version, (0, 0.0))[0] + 1
        delay = min(self._poll_s * 2 ** (failures - 1), 60.0)
        self._failures[version] = (failures, self._clock() + delay)
        self._outcome("failed")
        if self.model is None:
            self.blocked = f"promoted policy {version} is not loaded at the backend yet: {why}"
        log.warning("adapter not loaded; trying again later",
                    extra={"version": version, "why": why, "retry_in_s": delay,
                           "serving": self.model})  # fmt: skip

    @staticmethod
    async def _post(
        session: aiohttp.ClientSession,
        url: str,
        wait: aiohttp.ClientTimeout,
        verb: str,
        body: dict[str, str],
        also_ok: tuple[int, ...],
        ok_text: str = "",
    ) -> bool:
        """``POST /v1/{verb}_lora_adapter``: True when done (200, a status in ``also_ok``, or
        an answer containing ``ok_text``); False (logged) otherwise."""
        try:
            async with session.post(f"{url}/v1/{verb}_lora_adapter", json=body, timeout=wait) as r:
                text = await r.text()
                if r.status == 200 or r.status in also_ok or (ok_text and ok_text in text):
                    return True
                log.warning(f"{verb}_lora_adapter refused",
                            extra={"status": r.status, "answer": text[:500], **body})  # fmt: skip
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(f"{verb}_lora_adapter failed", extra={"error": str(exc), **body})
        return False
