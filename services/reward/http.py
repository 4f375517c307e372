"""HTTP JSON beside gRPC: the reward service's routes, served by the same core (so the same
batcher, model snapshot, limits and metrics) and the same API-key guard (``Authorization:
Bearer <key>``, roles in :data:`~plaudit.services.reward.access.ROUTE_ROLES`).

Routes (one table, :data:`ROUTES`, from which the OpenAPI document at ``GET /openapi.json`` is
built, so every route is described):

* Native, the gRPC messages in the proto JSON mapping (proto field names; lowerCamelCase and
  enum numbers are read too): ``POST /v1/score`` (``ScoreRequest`` -> ``ScoreResponse``),
  ``POST /v1/compare``, ``GET /v1/model`` (``?model=NAME`` for a named model); ``GET /healthz``
  (200 ``{"status": "SERVING"}`` once every named model is live, else 503).
* OpenRLHF's remote reward model (``openrlhf/cli/serve_rm.py``): ``POST /get_reward`` with
  ``{"query": [...], "prompts"?, "labels"?}``; each query is prompt and response as the policy
  rendered them, split back into turns (:mod:`~plaudit.services.reward.chat_parse`) and scored in
  the reward model's own format (``prompts`` and ``labels`` are checked and otherwise unused:
  the query holds the whole text). Answers ``{"rewards", "scores", "extra_logs"}``; ``extra_logs``
  holds one number per query: ``unparsed`` (1 when the text was scored as one plain string) and
  ``truncated``.
* vLLM's pooling API (as verl calls it): ``POST /classify`` and ``POST /pooling`` with ``input``
  (a string or a list of strings, each a policy-rendered text) or ``messages`` (one chat
  conversation ending with the assistant turn to score). ``probs`` (classify) is
  sigmoid(raw reward) unless ``activation``/``use_activation`` is false; ``data`` (pooling) is
  the raw reward unless one of them is true.
* Text-embeddings-inference: ``POST /predict`` (``inputs``: a string, a ``[prompt, completion]``
  pair, or a batch of them) and ``POST /rerank`` (``query``, ``texts``; sorted by score); scores
  are sigmoid(raw reward), or the raw reward with ``raw_scores``.

Errors are the domain's :class:`PlauditError` s, mapped in one place
(:func:`~plaudit.services.common.http.error_response`): a 4xx ``{"error": {"code", "field",
"message"}}`` naming the field as the client sent it (``query[3]``, ``inputs[0][1]``).
"""

from __future__ import annotations

import re
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.common.http import (
    Authenticator,
    HttpServer,
    json_app,
    message_from_json,
    read_json,
)
from plaudit.services.common.security.limits import InFlightLimit
from plaudit.services.reward.access import PUBLIC_ROUTES
from plaudit.services.reward.chat_parse import (
    ParsedText,
    conversation_pair,
    messages_from_json,
    parse_policy_text,
)
from plaudit.services.reward.core import RewardCore, ScoreResult, sigmoid
from plaudit.services.reward.metrics import RewardMetrics
from plaudit.services.reward.settings import RewardSettings
from plaudit.v1 import reward_pb2

LABEL = "LABEL_0"  # a scalar reward head's one class, as transformers names it

JsonHandler = Callable[["RewardHttpApi", web.Request], Awaitable[web.Response]]


def protected(path: str) -> bool:
    return path not in PUBLIC_ROUTES


# -- reading requests ----------------------------------------------------------------------------
def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidArgumentError("body", "must be a JSON object")
    return body


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise InvalidArgumentError(where, f"must be a string, got {got}")
    return value


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise InvalidArgumentError(where, "must be a list of strings")
    if not value:
        raise InvalidArgumentError(where, "must not be empty")
    return [_string(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _flag(body: dict[str, Any], name: str, default: bool | None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidArgumentError(name, f"must be a boolean, got {type(value).__name__}")
    return value


def _optional_string(body: dict[str, Any], name: str) -> None:
    if body.get(name) is not None:
        _string(body[name], name)


_ITEM = re.compile(r"^items\[(\d+)\](?:\.(prompt|completion))?")


@dataclass
class _Items:
    """What a compatible route scores, and how to name its fields in errors: item i came from
    the request field ``names[i]``."""

    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    whole: str = "body"  # the request field holding the list

    def add(self, prompt: str, completion: str, name: str) -> None:
        self.prompts.append(prompt)
        self.completions.append(completion)
        self.names.append(name)

    def add_text(self, parsed: ParsedText, name: str) -> None:
        self.add(parsed.prompt, parsed.completion, name)

    def rename(self, exc: InvalidArgumentError) -> InvalidArgumentError:
        match = _ITEM.match(exc.field)
        if match is None:
            name = self.whole if exc.field == "items" else exc.field
            return InvalidArgumentError(name, exc.message.partition(": ")[2])
        name = self.names[int(match[1])]
        return InvalidArgumentError(name, exc.message.partition(": ")[2])


def _reply(message: Message) -> web.Response:
    return web.json_response(
        json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


def _activation(body: dict[str, Any], default: bool) -> bool:
    for name in ("use_activation", "activation"):
        value = _flag(body, name, None)
        if value is not None:
            return value
    return default


def _usage(tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def _predict_sequence(value: object, where: str) -> tuple[str, str]:
    """A TEI sequence: ``[text]`` or ``[prompt, completion]``."""
    if not isinstance(value, list) or not 1 <= len(value) <= 2:
        raise InvalidArgumentError(where, "must be [text] or [prompt, completion]")
    texts = [_string(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return (texts[0], texts[1]) if len(texts) == 2 else ("", texts[0])


# -- the application -----------------------------------------------------------------------------
def _vllm_list(prefix: str, result: Any, data: list[dict[str, Any]]) -> web.Response:
    """vLLM's list envelope (``ClassificationResponse``, ``PoolingResponse``) around ``data``."""
    return web.json_response(
        {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": result.version,
            "data": data,
            "usage": _usage(result.tokens),
        }
    )


class RewardHttpApi:
    """Request handlers: parse, one call into the :class:`RewardCore`, render."""

    def __init__(self, core: RewardCore) -> None:
        self._core = core

    async def _score(self, items: _Items, normalization: int = 0) -> ScoreResult:
        request = reward_pb2.ScoreRequest(
            items=[
                reward_pb2.ScoreItem(prompt=p, completion=c)
                for p, c in zip(items.prompts, items.completions, strict=True)
            ],
            normalization=normalization,  # type: ignore[arg-type]
        )
        try:
            return await self._core.run_score(request, None)
        except InvalidArgumentError as exc:
            raise items.rename(exc) from None

    # -- native -----------------------------------------------------------------------------------
    async def score(self, request: web.Request) -> web.Response:
        message = message_from_json(await read_json(request), reward_pb2.ScoreRequest)
        return _reply(await self._core.score(message, None))

    async def compare(self, request: web.Request) -> web.Response:
        message = message_from_json(await read_json(request), reward_pb2.CompareRequest)
        return _reply(await self._core.compare(message, None))

    async def model(self, request: web.Request) -> web.Response:
        return _reply(self._core.get_model(request.query.get("model", "")))

    async def healthz(self, request: web.Request) -> web.Response:
        serving = self._core.serving
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    # -- OpenRLHF ---------------------------------------------------------------------------------
    async def get_reward(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        queries = _strings(body.get("query"), "query")
        for name in ("prompts", "labels"):
            value = body.get(name)
            if value is not None and not isinstance(value, list):
                raise InvalidArgumentError(name, f"must be a list, got {type(value).__name__}")
        if body.get("prompts") is not None:
            prompts = body["prompts"]
            if len(prompts) != len(queries):
                raise InvalidArgumentError(
                    "prompts", f"has {len(prompts)} entries for {len(queries)} queries"
                )
            for i, prompt in enumerate(prompts):
                _string(prompt, f"prompts[{i}]")
        items = _Items(whole="query")
        unparsed = []
        for i, query in enumerate(queries):
            parsed = parse_policy_text(query)
            unparsed.append(0.0 if parsed.format else 1.0)
            items.add_text(parsed, f"query[{i}]")
        result = await self._score(items)
        rewards = [float(r) for r in result.rewards]
        truncated = [float(t) for t in result.truncated]
        return web.json_response(
            {
                "rewards": rewards,
                "scores": rewards,
                "extra_logs": {"unparsed": unparsed, "truncated": truncated},
            }
        )

    # -- vLLM -------------------------------------------------------------------------------------
    def _pooling_items(self, body: dict[str, Any]) -> _Items:
        _optional_string(body, "model")
        if body.get("messages") is not None:
            if body.get("input") is not None:
                raise InvalidArgumentError("input", "give input or messages, not both")
            messages = messages_from_json(body["messages"], "messages")
            pair = conversation_pair(messages)
            if pair is None:
                raise InvalidArgumentError(
                    "messages", "must end with the assistant turn to score, after a prompt"
                )
            items = _Items(whole="messages")
            items.add(pair[0], pair[1], f"messages[{len(messages) - 1}]")
            return items
        value = body.get("input")
        texts = (
            [_string(value, "input")] if not isinstance(value, list) else _strings(value, "input")
        )
        items = _Items(whole="input")
        for i, text in enumerate(texts):
            items.add_text(
                parse_policy_text(text), "input" if isinstance(value, str) else f"input[{i}]"
            )
        return items

    async def classify(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        activation = _activation(body, True)
        result = await self._score(self._pooling_items(body))
        data = [
            {
                "index": i,
                "label": LABEL,
                "probs": [sigmoid(float(raw)) if activation else float(raw)],
                "num_classes": 1,
            }
            for i, raw in enumerate(result.raw)
        ]
        return _vllm_list("classify", result, data)

    async def pooling(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        activation = _activation(body, False)
        result = await self._score(self._pooling_items(body))
        data = [
            {
                "index": i,
                "object": "pooling",
                "data": [sigmoid(float(raw)) if activation else float(raw)],
            }
            for i, raw in enumerate(result.raw)
        ]
        return _vllm_list("pool", result, data)

    # -- text-embeddings-inference ----------------------------------------------------------------
    async def predict(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        raw_scores = _flag(body, "raw_scores", False)
        _flag(body, "truncate", False)
        inputs = body.get("inputs")
        items = _Items(whole="inputs")
        batch = isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], list)
        if isinstance(inputs, str):
            items.add_text(parse_policy_text(inputs), "inputs")
        elif batch:
            assert isinstance(inputs, list)
            for i, sequence in enumerate(inputs):
                where = f"inputs[{i}]"
                prompt, completion = _predict_sequence(sequence, where)
                if prompt or len(sequence) == 2:
                    items.add(prompt, completion, where)
                else:
                    items.add_text(parse_policy_text(completion), where)
        elif isinstance(inputs, list) and inputs:
            prompt, completion = _predict_sequence(inputs, "inputs")
            if len(inputs) == 2:
                items.add(prompt, completion, "inputs")
            else:
                items.add_text(parse_policy_text(completion), "inputs")
        else:
            raise InvalidArgumentError(
                "inputs", "must be a string, a [prompt, completion] pair or a non-empty batch"
            )
        result = await self._score(items)
        predictions = [
            [{"score": float(raw) if raw_scores else sigmoid(float(raw)), "label": LABEL}]
            for raw in result.raw
        ]
        return web.json_response(predictions if batch else predictions[0])

    async def rerank(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        query = _string(body.get("query"), "query")
        texts = _strings(body.get("texts"), "texts")
        raw_scores = _flag(body, "raw_scores", False)
        return_text = _flag(body, "return_text", False)
        _flag(body, "truncate", False)
        items = _Items(whole="texts")
        for i, text in enumerate(texts):
            items.add(query, text, f"texts[{i}]")
        result = await self._score(items)
        ranks = []
        for i, raw in enumerate(result.raw):
            rank: dict[str, Any] = {"index": i}
            if return_text:
                rank["text"] = texts[i]
            rank["score"] = float(raw) if raw_scores else sigmoid(float(raw))
            ranks.append(rank)
        ranks.sort(key=lambda r: -r["score"])
        return web.json_response(ranks)


# -- the route table and its OpenAPI document ----------------------------------------------------
_STR = {"type": "string"}
_NUM = {"type": "number"}
_STR_LIST = {"type": "array", "items": _STR, "minItems": 1}
_NORMALIZATION = {
    "oneOf": [
        {"type": "string", "enum": list(reward_pb2.Normalization.keys())},
        {"type": "integer"},
    ]
}
_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": _STR,
        },
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "total_tokens"],
    "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
}


def _obj(
    properties: dict[str, Any], required: Sequence[str] = (), extra: bool = False
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if not extra:
        schema["additionalProperties"] = False
    return schema


_POOLING_REQUEST = {
    "oneOf": [
        _obj(
            {
                "model": _STR,
                "input": {"oneOf": [_STR, _STR_LIST]},
                "activation": {"type": "boolean"},
                "use_activation": {"type": "boolean"},
            },
            ["input"],
            extra=True,
        ),
        _obj(
            {
                "model": _STR,
                "messages": _MESSAGES,
                "activation": {"type": "boolean"},
                "use_activation": {"type": "boolean"},
            },
            ["messages"],
            extra=True,
        ),
    ]
}
_PREDICTION = _obj({"score": _NUM, "label": _STR}, ["score", "label"])
_TAGS = {"type": "array", "items": _STR, "maxItems": 16}
_MODEL_REWARDS = {
    "type": "array",
    "items": _obj(
        {"model": _STR, "model_version": _STR, "rewards": {"type": "array", "items": _NUM}}
    ),
}
_SEQUENCE = {"type": "array", "items": _STR, "minItems": 1, "maxItems": 2}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: JsonHandler
    summary: str
    response: dict[str, Any]
    request: dict[str, Any] | None = None


ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/score",
        RewardHttpApi.score,
        "Score (prompt, completion) items (gRPC Score)",
        _obj(
            {
                "rewards": {"type": "array", "items": _NUM},
                "model_version": _STR,
                "truncated": {"type": "array", "items": {"type": "boolean"}},
                "model": _STR,
                "objective": _STR,
                "models": _MODEL_REWARDS,
                "spread": {"type": "array", "items": _NUM},
                "ensemble_members": {"type": "integer"},
                "member_rewards": {"type": "array", "items": _NUM},
            },
            ["rewards", "model_version", "truncated"],
        ),
        _obj(
            {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj({"prompt": _STR, "completion": _STR, "tags": _TAGS}),
                },
                "normalization": _NORMALIZATION,
                "model": _STR,
                "objective": _STR,
            },
            ["items"],
        ),
    ),
    Route(
        "POST",
        "/v1/compare",
        RewardHttpApi.compare,
        "Compare two completions (gRPC Compare)",
        _obj(
            {
                "reward_a": _NUM,
                "reward_b": _NUM,
                "prob_a_preferred": _NUM,
                "model_version": _STR,
                "model": _STR,
                "objective": _STR,
                "models": _MODEL_REWARDS,
                "prob_a_preferred_spread": _NUM,
                "members_preferring_a": _NUM,
                "ensemble_members": {"type": "integer"},
            },
            ["reward_a", "reward_b", "prob_a_preferred", "model_version"],
        ),
        _obj(
            {
                "prompt": _STR,
                "completion_a": _STR,
                "completion_b": _STR,
                "normalization": _NORMALIZATION,
                "model": _STR,
                "objective": _STR,
                "tags": _TAGS,
            }
        ),
    ),
    Route(
        "GET",
        "/v1/model",
        RewardHttpApi.model,
        "The serving model version (gRPC GetModel)",
        _obj(
            {
                "version": _STR,
                "backbone": _STR,
                "execution_provider": _STR,
                "precision": _STR,
                "max_length": {"type": "integer"},
                "text_format": _STR,
                "normalization_mean": _NUM,
                "normalization_std": _NUM,
                "loaded_at": _STR,
                "last_swap_error": _STR,
                "calibration_temperature": _NUM,
                "calibrated": {"type": "boolean"},
                "heldout_accuracy": _NUM,
                "heldout_ece": _NUM,
                "heldout_pairs": {"type": "integer"},
                "data_cursor": _STR,
                "name": _STR,
                "models": {"type": "array", "items": {"type": "object"}},
                "objectives": {"type": "array", "items": _STR},
                "shadow": {"type": "object"},
                "ensemble_members": {"type": "integer"},
            },
            ["version", "max_length", "text_format"],
        ),
    ),
    Route(
        "GET",
        "/healthz",
        RewardHttpApi.healthz,
        "SERVING once a model version is live",
        _obj({"status": {"type": "string", "enum": ["SERVING", "NOT_SERVING"]}}, ["status"]),
    ),
    Route(
        "GET",
        "/openapi.json",
        RewardHttpApi.openapi,
        "This document",
        {"type": "object"},
    ),
    Route(
        "POST",
        "/get_reward",
        RewardHttpApi.get_reward,
        "OpenRLHF remote reward model: policy-rendered prompt+response texts",
        _obj(
            {
                "rewards": {"type": "array", "items": _NUM},
                "scores": {"type": "array", "items": _NUM},
                "extra_logs": {
                    "type": "object",
                    "additionalProperties": {"type": "array", "items": _NUM},
                },
            },
            ["rewards", "scores", "extra_logs"],
        ),
        _obj(
            {
                "query": _STR_LIST,
                "prompts": {"type": "array", "items": _STR},
                "labels": {"type": "array"},
            },
            ["query"],
            extra=True,
        ),
    ),
    Route(
        "POST",
        "/classify",
        RewardHttpApi.classify,
        "vLLM classification API",
        _obj(
            {
                "id": _STR,
                "object": _STR,
                "created": {"type": "integer"},
                "model": _STR,
                "data": {
                    "type": "array",
                    "items": _obj(
                        {
                            "index": {"type": "integer"},
                            "label": _STR,
                            "probs": {"type": "array", "items": _NUM},
                            "num_classes": {"type": "integer"},
                        },
                        ["index", "label", "probs", "num_classes"],
                    ),
                },
                "usage": _USAGE,
            },
            ["id", "object", "created", "model", "data", "usage"],
        ),
        _POOLING_REQUEST,
    ),
    Route(
        "POST",
        "/pooling",
        RewardHttpApi.pooling,
        "vLLM pooling API",
        _obj(
            {
                "id": _STR,
                "object": _STR,
                "created": {"type": "integer"},
                "model": _STR,
                "data": {
                    "type": "array",
                    "items": _obj(
                        {
                            "index": {"type": "integer"},
                            "object": _STR,
                            "data": {"type": "array", "items": _NUM},
                        },
                        ["index", "object", "data"],
                    ),
                },
                "usage": _USAGE,
            },
            ["id", "object", "created", "model", "data", "usage"],
        ),
        _POOLING_REQUEST,
    ),
    Route(
        "POST",
        "/predict",
        RewardHttpApi.predict,
        "text-embeddings-inference predict",
        {
            "oneOf": [
                {"type": "array", "items": _PREDICTION},
                {"type": "array", "items": {"type": "array", "items": _PREDICTION}},
            ]
        },
        _obj(
            {
                "inputs": {
                    "oneOf": [_STR, _SEQUENCE, {"type": "array", "minItems": 1, "items": _SEQUENCE}]
                },
                "raw_scores": {"type": "boolean"},
                "truncate": {"type": "boolean"},
            },
            ["inputs"],
            extra=True,
        ),
    ),
    Route(
        "POST",
        "/rerank",
        RewardHttpApi.rerank,
        "text-embeddings-inference rerank",
        {
            "type": "array",
            "items": _obj(
                {"index": {"type": "integer"}, "text": _STR, "score": _NUM}, ["index", "score"]
            ),
        },
        _obj(
            {
                "query": _STR,
                "texts": _STR_LIST,
                "raw_scores": {"type": "boolean"},
                "return_text": {"type": "boolean"},
                "truncate": {"type": "boolean"},
            },
            ["query", "texts"],
            extra=True,
        ),
    ),
)

_ERROR = _obj(
    {
        "error": _obj(
            {"code": _STR, "field": {"type": "string", "nullable": True}, "message": _STR},
            ["code", "message"],
        )
    },
    ["error"],
)
_ERRORS = {
    "400": "invalid request: bad JSON, wrong types, empty lists, limits (the field is named)",
    "401": "no or unknown API key",
    "403": "the key lacks the route's role",
    "413": "the body exceeds the size limit",
    "429": "rate limit or queue full",
    "503": "no model loaded yet, or shutting down",
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 description of :data:`ROUTES`."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": route.response}},
                },
                **{
                    code: {
                        "description": text,
                        "content": {"application/json": {"schema": _ERROR}},
                    }
                    for code, text in _ERRORS.items()
                    if route.path not in PUBLIC_ROUTES or code == "503"
                },
            },
        }
        if route.path not in PUBLIC_ROUTES:
            operation["security"] = [{"bearer": []}]
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": route.request}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "Plaudit reward service", "version": "1"},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def make_app(
    api: RewardHttpApi,
    metrics: RewardMetrics,
    authenticate: Authenticator,
    client_max_size: int,
    in_flight: InFlightLimit | None = None,
) -> web.Application:
    """The aiohttp application (:func:`~plaudit.services.common.http.json_app`) of
    :data:`ROUTES`, the authenticator on every route but health and the API description."""

    def bound(handler: JsonHandler) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def call(request: web.Request) -> web.Response:
            return await handler(api, request)

        return call

    return json_app(
        [web.route(r.method, r.path, bound(r.handler)) for r in ROUTES],
        requests=metrics.http_requests,
        duration=metrics.http_duration,
        authenticate=authenticate,
        protected=protected,
        client_max_size=client_max_size,
        in_flight=in_flight,
    )


def reward_http_server(
    core: RewardCore,
    *,
    metrics: RewardMetrics,
    settings: RewardSettings,
    authenticate: Authenticator,
    in_flight: InFlightLimit | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpServer:
    """The HTTP server of a reward service on ``settings.http_port``; bodies are bounded by
    ``max_message_bytes`` like gRPC messages; ``in_flight`` is the gRPC server's limit, shared."""
    app = make_app(
        RewardHttpApi(core), metrics, authenticate, settings.max_message_bytes, in_flight
    )
    return HttpServer(
        app,
        host=settings.host,
        port=settings.http_port or 0,
        grace_s=settings.grace_period_s,
        ssl_context=ssl_context,
    )
