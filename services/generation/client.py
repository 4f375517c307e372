"""A small client for the generation service (used by the CLI, the tests and the trainer)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.v1 import generation_pb2, generation_pb2_grpc


def generate_request(
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    *,
    n: int = 1,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    max_new_tokens: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    rerank: bool = False,
) -> generation_pb2.GenerateRequest:
    """A GenerateRequest; give exactly one of ``prompt`` and ``messages``."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    sampling = generation_pb2.SamplingParams(
        top_k=top_k, max_new_tokens=max_new_tokens, stop=list(stop)
    )
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    request = generation_pb2.GenerateRequest(n=n, sampling=sampling, rerank=rerank)
    if prompt is not None:
        request.prompt = prompt
    else:
        request.conversation.messages.extend(
            generation_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()
        )
    return request


class GenerationClient:
    """Blocking client: ``generate`` takes the fields of :func:`generate_request`.

    ``credentials`` carry the API key (role ``generate``) and TLS files, if the server wants them.
    """

    def __init__(self, address: str, credentials: ClientCredentials = INSECURE) -> None:
        self.channel = credentials.channel(address)
        self.stub = generation_pb2_grpc.GenerationServiceStub(self.channel)

    def generate(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        *,
        timeout: float = 300.0,
        **sampling: object,
    ) -> generation_pb2.GenerateResponse:
        request = generate_request(prompt, messages, **sampling)  # type: ignore[arg-type]
        return self.stub.Generate(request, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
