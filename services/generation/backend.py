"""What samples completions for the generation service: one interface, two implementations.

:class:`GenerationBackend` is all the core (:mod:`.core`) and the front ends see. Plaudit's own
engine (:class:`~plaudit.services.generation.engine.OnnxBackend`: the promoted policy on ONNX
Runtime, batched, hot-swapped from the registry) is the default; with ``--backend openai``
sampling goes to an OpenAI-compatible server instead
(:class:`~plaudit.services.generation.openai_backend.OpenAIBackend`: vLLM, TGI, llama.cpp's
server). Both take a validated :class:`~plaudit.services.runtime.policy_model.GenerateJob` and
return a :class:`~plaudit.services.runtime.policy_model.GenerateResult` naming the version that
generated it, stream text to the job's ``sink`` when it has one, and raise the domain errors
(UNAVAILABLE when the policy or the server cannot answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from plaudit.services.runtime.policy_model import GenerateJob, GenerateResult


@dataclass(frozen=True)
class LiveVersion:
    """The policy a backend serves now: its version (what responses name), when it was made
    (Unix seconds; 0 when the backend does not say) and who serves it."""

    version: str
    created: int
    owned_by: str


class GenerationBackend(Protocol):
    """Samples completions; see the module doc."""

    def live(self) -> LiveVersion | None:
        """The version serving now, or None when nothing can answer (health NOT_SERVING)."""

    async def generate(
        self, job: GenerateJob, size: int, timeout: float | None = None
    ) -> GenerateResult:
        """The job's ``n`` completions (``size``: the UTF-8 bytes of its input; ``timeout``: the
        caller's remaining seconds). Raises the domain error of a refused job."""
