"""The reward service over HTTP JSON: native routes (the gRPC messages in the proto JSON mapping),
OpenRLHF's remote reward model, vLLM's pooling API and text-embeddings-inference, each posted the
exact JSON its real client sends and read the way that client reads it; the chat-template
splitter; keys, limits and errors; a schemathesis run against ``/openapi.json``. HTTP scores are
the gRPC scores (one core)."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from plaudit.services.common.security.keys import hash_key, new_api_key
from plaudit.services.reward.access import ROUTE_ROLES
from plaudit.services.reward.chat_parse import parse_policy_text
from plaudit.services.reward.http import ROUTES, openapi_document
from plaudit.v1 import reward_pb2, reward_pb2_grpc
from tests.conftest import ServerThread

CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n<|endoftext|>"
)
LLAMA3 = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>"
)
HH = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant: fine, thanks"
PLAIN = "no template here, just words"


@pytest.fixture(scope="module")
def server(tiny_registry: Path) -> Iterator[ServerThread]:
    running = ServerThread(registry=tiny_registry, http_port=0, log_level="WARNING").start()
    yield running
    running.stop()


def url(server: ServerThread, path: str) -> str:
    return f"http://127.0.0.1:{server.server.http_port}{path}"


def grpc_rewards(
    server: ServerThread, pairs: list[tuple[str, str]], raw: bool = False
) -> list[float]:
    request = reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(prompt=p, completion=c) for p, c in pairs],
        normalization=reward_pb2.NORMALIZATION_RAW if raw else reward_pb2.NORMALIZATION_UNSPECIFIED,
    )
    with grpc.insecure_channel(server.address) as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=30)
    return list(reply.rewards)


def f32(values: list[float]) -> list[float]:
    """Values as float32, as the gRPC message carries them."""
    return list(reward_pb2.ScoreResponse(rewards=values).rewards)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- the chat-template splitter (pure) -------------------------------------------------------------
def test_splitter_reads_chatml_llama3_gemma_and_hh() -> None:
    chatml = parse_policy_text(CHATML)
    assert chatml.format == "chatml"
    assert chatml.completion == "The capital of France is Paris."
    assert chatml.prompt == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "\n\nHuman: What is the capital of France?\n\nAssistant:"
    )
    llama = parse_policy_text(LLAMA3)
    assert (llama.format, llama.prompt, llama.completion) == (
        "llama3",
        "\n\nHuman: Name a colour.\n\nAssistant:",
        "Blue.",
    )
    hh = parse_policy_text(HH)
    assert hh.format == "hh" and hh.completion == "fine, thanks"
    assert (
        hh.prompt == "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: how are you?\n\nAssistant:"
    )
    gemma = parse_policy_text(
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"
    )
    assert (gemma.format, gemma.completion) == ("gemma", "yo")
    open_ended = parse_policy_text("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nno end")
    assert (open_ended.format, open_ended.completion) == ("chatml", "no end")


@pytest.mark.parametrize(
    "text",
    [
        PLAIN,
        "<|im_start|>user\nonly a prompt<|im_end|>\n",  # no assistant turn
        "<|im_start|>user\nhi<|im_end|>stray text<|im_start|>assistant\nyo<|im_end|>",
        "preamble <|im_start|>user\nhi<|im_end|><|im_start|>assistant\nyo",
        "<|im_start|>tool\nx<|im_end|><|im_start|>assistant\nyo",
    ],
)
def test_splitter_takes_anything_else_as_one_plain_string(text: str) -> None:
    parsed = parse_policy_text(text)
    assert (parsed.format, parsed.prompt, parsed.completion) == (None, "", text)


def test_every_route_has_a_role_or_is_public_and_is_described() -> None:
    document = openapi_document()
    described = {f"{m.upper()} {p}" for p, ops in document["paths"].items() for m in ops}
    assert described == {f"{r.method} {r.path}" for r in ROUTES}
    assert described - set(ROUTE_ROLES) == {"GET /healthz", "GET /openapi.json"}


# -- native routes ---------------------------------------------------------------------------------
def test_native_score_compare_model_health_match_grpc(server: ServerThread) -> None:
    pairs = [("Q?", "a fine answer"), ("\n\nHuman: hi\n\nAssistant:", "hello")]
    body = {"items": [{"prompt": p, "completion": c} for p, c in pairs]}
    reply = requests.post(url(server, "/v1/score"), json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    score = reply.json()
    assert f32(score["rewards"]) == grpc_rewards(server, pairs)  # the JSON of a float32
    assert score["truncated"] == [False, False] and score["model_version"]
    raw = requests.post(
        url(server, "/v1/score"), json={**body, "normalization": "NORMALIZATION_RAW"}, timeout=30
    ).json()
    assert f32(raw["rewards"]) == grpc_rewards(server, pairs, raw=True)
    camel = {"prompt": "Q?", "completionA": "yes", "completionB": "no"}
    compare = requests.post(url(server, "/v1/compare"), json=camel, timeout=30).json()
    a, b = grpc_rewards(server, [("Q?", "yes"), ("Q?", "no")])
    assert f32([compare["reward_a"], compare["reward_b"]]) == [a, b]
    raw_a, raw_b = grpc_rewards(server, [("Q?", "yes"), ("Q?", "no")], raw=True)
    assert compare["prob_a_preferred"] == pytest.approx(sigmoid(raw_a - raw_b), rel=1e-5)
    model = requests.get(url(server, "/v1/model"), timeout=30).json()
    assert model["version"] == score["model_version"] and model["max_length"] == 64
    assert model["calibration_temperature"] == 1.0 and model["calibrated"] is False
    assert model["heldout_pairs"] == 0 and model["data_cursor"] == ""
    assert model["text_format"] == "pair" and model["loaded_at"].endswith("Z")
    health = requests.get(url(server, "/healthz"), timeout=30)
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})
    registry = server.server.metrics.registry
    labels = {"route": "/v1/score", "status": "200"}
    assert registry.get_sample_value("plaudit_reward_http_requests_total", labels) >= 2


# -- OpenRLHF --------------------------------------------------------------------------------------
def openrlhf_request_api_wrapper(url: str, data: dict[str, Any], score_key: str = "rewards") -> Any:
    """What ``openrlhf/utils/remote_rm_utils.py`` ``request_api_wrapper`` does (one try)."""
    headers = {"Content-Type": "application/json"}
    response = requests.post(url=url, json=data, headers=headers, timeout=180)
    response.raise_for_status()
    decoded = response.json()
    assert score_key in decoded, f"{score_key} not in {decoded}"
    return decoded.get(score_key)


def test_openrlhf_get_reward_splits_policy_templates(server: ServerThread) -> None:
    queries = [CHATML, LLAMA3, HH, PLAIN]
    data = {"query": queries, "prompts": ["p1", "p2", "p3", "p4"], "labels": ["", "", "", ""]}
    rewards = openrlhf_request_api_wrapper(url(server, "/get_reward"), data)
    expected_pairs = [(p.prompt, p.completion) for p in map(parse_policy_text, queries)]
    assert rewards == grpc_rewards(server, expected_pairs)
    assert expected_pairs[3] == ("", PLAIN)
    whole = requests.post(url(server, "/get_reward"), json={"query": queries}, timeout=30).json()
    assert whole["scores"] == whole["rewards"] == rewards
    assert whole["extra_logs"]["unparsed"] == [0.0, 0.0, 0.0, 1.0]
    assert whole["extra_logs"]["truncated"] == [0.0, 0.0, 0.0, 0.0]


# -- vLLM pooling API ------------------------------------------------------------------------------
def test_vllm_classify_as_verl_calls_it(server: ServerThread) -> None:
    texts = [CHATML, PLAIN]
    raw = grpc_rewards(
        server, [(p.prompt, p.completion) for p in map(parse_policy_text, texts)], True
    )
    payload: dict[str, Any] = {"input": texts, "model": "/models/reward", "activation": False,
               "add_special_tokens": False}  # fmt: skip
    response = requests.post(url(server, "/classify"), json=payload, timeout=30)
    outputs = response.json()
    probs = [x["probs"] for x in outputs["data"]]
    assert [p[0] for p in probs] == pytest.approx(raw, rel=1e-6)
    assert outputs["object"] == "list" and outputs["id"].startswith("classify-")
    assert isinstance(outputs["created"], int) and outputs["usage"]["prompt_tokens"] > 0
    assert outputs["data"][0] == {"index": 0, "label": "LABEL_0", "probs": probs[0],
                                  "num_classes": 1}  # fmt: skip
    default = requests.post(url(server, "/classify"), json={"input": PLAIN}, timeout=30).json()
    assert default["data"][0]["probs"] == pytest.approx([sigmoid(raw[1])], rel=1e-6)
    chat: dict[str, Any] = {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    }
    by_messages = requests.post(url(server, "/classify"), json=chat, timeout=30).json()
    expected = grpc_rewards(server, [("\n\nHuman: What is the capital of France?\n\nAssistant:",
                                      "The capital of France is Paris.")], True)  # fmt: skip
    assert by_messages["data"][0]["probs"] == pytest.approx([sigmoid(expected[0])], rel=1e-6)


def test_vllm_pooling_shape(server: ServerThread) -> None:
    raw = grpc_rewards(server, [("", PLAIN)], True)
    reply = requests.post(
        url(server, "/pooling"), json={"model": "rm", "input": [PLAIN]}, timeout=30
    )
    body = reply.json()
    assert body["id"].startswith("pool-") and body["object"] == "list"
    (item,) = body["data"]
    assert item["index"] == 0 and item["object"] == "pooling"
    assert item["data"] == pytest.approx(raw, rel=1e-6)


# -- text-embeddings-inference ---------------------------------------------------------------------
def test_tei_predict_single_pair_and_batch(server: ServerThread) -> None:
    raw = grpc_rewards(server, [("Q?", "yes"), ("Q?", "no"), ("", PLAIN)], True)
    batch: dict[str, Any] = {"inputs": [["Q?", "yes"], ["Q?", "no"], [PLAIN]], "raw_scores": True}
    reply = requests.post(url(server, "/predict"), json=batch, timeout=30).json()
    assert [p[0]["score"] for p in reply] == pytest.approx(raw, rel=1e-6)
    assert all(p[0]["label"] == "LABEL_0" and len(p) == 1 for p in reply)
    pair = requests.post(url(server, "/predict"), json={"inputs": ["Q?", "yes"]}, timeout=30).json()
    assert pair == [{"score": pytest.approx(sigmoid(raw[0]), rel=1e-6), "label": "LABEL_0"}]
    single = requests.post(url(server, "/predict"), json={"inputs": PLAIN}, timeout=30).json()
    assert single[0]["score"] == pytest.approx(sigmoid(raw[2]), rel=1e-6)


def test_tei_rerank_sorted_with_raw_scores_and_text(server: ServerThread) -> None:
    texts = ["yes", "no", "maybe so"]
    raw = grpc_rewards(server, [("Q?", t) for t in texts], True)
    body: dict[str, Any] = {"query": "Q?", "texts": texts, "raw_scores": True, "return_text": True}
    ranks = requests.post(url(server, "/rerank"), json=body, timeout=30).json()
    assert [r["index"] for r in ranks] == sorted(range(3), key=lambda i: -raw[i])
    assert [r["score"] for r in ranks] == pytest.approx(sorted(raw, reverse=True), rel=1e-6)
    assert [r["text"] for r in ranks] == [texts[r["index"]] for r in ranks]
    plain = requests.post(url(server, "/rerank"), json={"query": "Q?", "texts": texts}, timeout=30)
    assert all("text" not in r for r in plain.json())
    assert max(r["score"] for r in plain.json()) == pytest.approx(sigmoid(max(raw)), rel=1e-6)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/score", b"{not json", "body"),
        ("/v1/score", [], "body"),
        ("/v1/score", {"items": []}, "items"),
        ("/v1/score", {"items": "x"}, "items"),
        ("/v1/score", {"items": [{"prompt": "p", "completion": 3}]}, "items[0].completion"),
        ("/v1/score", {"items": [{"prompt": "", "completion": ""}]}, "items[0]"),
        ("/v1/score", {"items": [{"prompt": "p", "completion": "c"}], "normalization": True},
         "normalization"),
        ("/v1/score", {"items": [{"prompt": "p", "completion": "c"}], "normalization": 9},
         "normalization"),
        ("/v1/score", {"extra": 1}, "extra"),
        ("/v1/compare", {"prompt": "p", "completion_a": "a"}, "completion_b"),
        ("/get_reward", {}, "query"),
        ("/get_reward", {"query": []}, "query"),
        ("/get_reward", {"query": "text"}, "query"),
        ("/get_reward", {"query": ["a", 7]}, "query[1]"),
        ("/get_reward", {"query": ["a", ""]}, "query[1]"),
        ("/get_reward", {"query": ["a"], "prompts": ["a", "b"]}, "prompts"),
        ("/get_reward", {"query": ["a" * 70000]}, "query[0]"),
        ("/classify", {"input": []}, "input"),
        ("/classify", {"input": None}, "input"),
        ("/classify", {"input": ["x"], "activation": "no"}, "activation"),
        ("/classify", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ("/pooling", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ("/predict", {"inputs": []}, "inputs"),
        ("/predict", {"inputs": ["a", "b", "c"]}, "inputs"),
        ("/predict", {"inputs": [["a", 1]]}, "inputs[0][1]"),
        ("/predict", {"inputs": "x", "raw_scores": 1}, "raw_scores"),
        ("/rerank", {"query": "q", "texts": []}, "texts"),
        ("/rerank", {"query": 1, "texts": ["a"]}, "query"),
        ("/rerank", {"query": "q", "texts": ["a", 1]}, "texts[1]"),
    ],
)  # fmt: skip
def test_bad_requests_are_4xx_naming_the_field(
    server: ServerThread, path: str, body: Any, field: str
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = requests.post(
        url(server, path), data=data, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["field"] == field, error


def test_a_wrong_content_type_and_unknown_routes_are_json_4xx(server: ServerThread) -> None:
    reply = requests.post(url(server, "/get_reward"), data=b"query=x", timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "body"
    assert requests.get(url(server, "/nothing"), timeout=30).status_code == 404
    wrong_method = requests.get(url(server, "/get_reward"), timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"]


# -- keys and limits -------------------------------------------------------------------------------
KEYS = {"scorer": new_api_key(), "ops": new_api_key()}
ENTRIES = [
    {"name": "scorer", "sha256": hash_key(KEYS["scorer"]), "roles": ["score"]},
    {"name": "ops", "sha256": hash_key(KEYS["ops"]), "roles": ["admin"]},
]


@pytest.fixture(scope="module")
def keyed(tiny_registry: Path) -> Iterator[ServerThread]:
    running = ServerThread(
        registry=tiny_registry, http_port=0, api_keys=ENTRIES, max_message_bytes=4096,
        log_level="WARNING",
    ).start()  # fmt: skip
    yield running
    running.stop()


def test_keys_roles_and_public_routes(keyed: ServerThread) -> None:
    body = {"query": [PLAIN]}
    anonymous = requests.post(url(keyed, "/get_reward"), json=body, timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "UNAUTHENTICATED"
    bad = {"Authorization": "Bearer nope"}
    assert (
        requests.post(url(keyed, "/get_reward"), json=body, headers=bad, timeout=30).status_code
        == 401
    )
    ops = {"Authorization": f"Bearer {KEYS['ops']}"}
    denied = requests.post(url(keyed, "/get_reward"), json=body, headers=ops, timeout=30)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "PERMISSION_DENIED"
    scorer = {"Authorization": f"Bearer {KEYS['scorer']}"}
    for path in ("/get_reward", "/classify", "/pooling"):
        payload = body if path == "/get_reward" else {"input": [PLAIN]}
        assert requests.post(url(keyed, path), json=payload, headers=scorer, timeout=30).ok
    assert requests.get(url(keyed, "/v1/model"), headers=scorer, timeout=30).ok
    assert requests.get(url(keyed, "/v1/model"), timeout=30).status_code == 401
    assert requests.get(url(keyed, "/healthz"), timeout=30).ok
    assert requests.get(url(keyed, "/openapi.json"), timeout=30).json()["openapi"] == "3.0.3"


def test_oversize_bodies_are_413_naming_the_body(keyed: ServerThread) -> None:
    scorer = {"Authorization": f"Bearer {KEYS['scorer']}"}
    big = {"query": ["x" * 5000]}
    reply = requests.post(url(keyed, "/get_reward"), json=big, headers=scorer, timeout=30)
    assert reply.status_code == 413
    assert reply.json()["error"] == {
        "code": "RESOURCE_EXHAUSTED", "field": "body", "message": "Request Entity Too Large"
    } or reply.json()["error"]["field"] == "body"  # fmt: skip


def test_an_anonymous_huge_body_is_refused_before_it_is_read(keyed: ServerThread) -> None:
    """A caller without a key costs a header lookup: 401 arrives while the declared gigabyte of
    body is still unsent."""
    port = keyed.server.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000000000\r\n\r\n{"query": ['
        )
        started = time.monotonic()
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 401"), head[:200]
    assert time.monotonic() - started < 5


# -- the OpenAPI document, checked by schemathesis -------------------------------------------------
def test_schemathesis_against_openapi(server: ServerThread) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(url(server, "/openapi.json"))
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    statuses: dict[str, set[int]] = {}

    def exercise(op: Any, mode: GenerationMode) -> None:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,  # the same examples on every run: CI cannot go red by chance
        )
        def run(case: Any) -> None:
            response = case.call_and_validate(base_url=url(server, ""), checks=checks, timeout=30)
            assert response.status_code < 500, response.text
            if mode is GenerationMode.POSITIVE:
                statuses.setdefault(op.label, set()).add(response.status_code)

        run()

    for operation in schema.get_all_operations():
        op = operation.ok()  # type: ignore[union-attr]
        exercise(op, GenerationMode.POSITIVE)
        if op.method.upper() == "POST":  # bodies that break the schema: never a 5xx
            exercise(op, GenerationMode.NEGATIVE)
    assert set(statuses) >= {f"{r.method} {r.path}" for r in ROUTES} - {"GET /openapi.json"}
    # schema-valid bodies the service may still refuse (an empty list): most routes answer 200
    assert sum(200 in codes for codes in statuses.values()) >= len(ROUTES) // 2, statuses
