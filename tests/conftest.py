"""Shared fixtures: a tiny random reward model exported to a registry, and servers on port 0."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from plaudit.services.feedback.db import normalize_url

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Services started by tests (in-process or as subprocesses) run without API keys unless a test
# configures keys; servers refuse to start with neither (tests/test_security.py covers that).
os.environ.setdefault("PLAUDIT_AUTH_DISABLED", "true")

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def minilm_dir() -> Path:
    from plaudit.trainer.backbones import resolve_backbone

    return resolve_backbone("minilm").path


def build_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT reward model with the real MiniLM tokenizer (random weights)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a head with some spread, so rewards differ clearly between texts
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A registry with one promoted fp32 version of the tiny model (max 64 tokens)."""
    from plaudit.services.common.registry import ModelRegistry
    from plaudit.trainer.export import ExportConfig, export_reward

    root = tmp_path_factory.mktemp("registry")
    export_reward(
        ExportConfig(checkpoint=str(tiny_checkpoint), max_length=64, reference_pairs=32),
        ModelRegistry(root, "reward"),
        promote=True,
    )
    return root


# -- policies: a tiny random Llama with the real SmolLM2 tokenizer ------------------------------
@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (chat template included), read from the GGUF once."""
    from transformers import AutoTokenizer

    from plaudit.trainer.backbones import resolve_backbone

    backbone = resolve_backbone("smollm2")
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(backbone.path, gguf_file=backbone.gguf_file).save_pretrained(out)
    return out


def build_tiny_policy(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide Llama causal LM (random weights, spread out so that greedy decoding
    varies) with the given tokenizer, saved as a Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_policy_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path
) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny-policy"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_policy_registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_policy_checkpoint: Path
) -> Path:
    """A registry with one promoted version of the tiny policy (context 256, 16 new tokens)."""
    from plaudit.services.common.registry import ModelRegistry
    from plaudit.trainer.policy_export import export_policy_checkpoint

    root = tmp_path_factory.mktemp("policy-registry")
    export_policy_checkpoint(
        str(tiny_policy_checkpoint),
        ModelRegistry(root, "policy"),
        promote=True,
        max_length=256,
        max_new_tokens=16,
    )
    return root


class ServerThread:
    """Runs a service on its own event loop in a background thread (tests use sync clients).

    ``kind`` picks the service ("reward", "generation" or "feedback"); ``settings`` are its
    settings fields. Authentication is off unless ``api_keys``/``api_keys_file`` are given.
    """

    def __init__(self, kind: str = "reward", **settings: Any) -> None:
        self.kind = kind
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait: bool = True) -> ServerThread:
        from plaudit.services.feedback.server import FeedbackServer
        from plaudit.services.feedback.settings import FeedbackSettings
        from plaudit.services.generation.server import GenerationServer
        from plaudit.services.generation.settings import GenerationSettings
        from plaudit.services.reward.server import RewardServer
        from plaudit.services.reward.settings import RewardSettings

        async def make() -> Any:
            common = {"port": 0, "metrics_port": 0, "host": "127.0.0.1", **self.settings}
            keyed = "api_keys" in common or "api_keys_file" in common
            common.setdefault("auth_disabled", not keyed)
            server: Any
            if self.kind == "feedback":
                common.setdefault("http_port", 0)
                server = FeedbackServer(FeedbackSettings(**common))
            elif self.kind == "generation":
                common.setdefault("http_port", 0)
                server = GenerationServer(GenerationSettings(**common))
            else:
                server = RewardServer(RewardSettings(**common))
            await server.start()
            if wait:
                await server.wait_until_serving(60)
            return server

        self.server = self.call(make())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the feedback service's HTTP server (labelling page and JSON API)."""
        return f"http://127.0.0.1:{self.server.http_port}"

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def generation_server(tiny_policy_registry: Path) -> Iterator[ServerThread]:
    """The generation service on the tiny policy."""
    server = ServerThread("generation", registry=tiny_policy_registry, log_level="WARNING")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def reward_server(tiny_registry: Path) -> Iterator[ServerThread]:
    server = ServerThread(registry=tiny_registry, log_level="WARNING").start()
    yield server
    server.stop()


# Runs the CLI with torch and transformers made unimportable: serving must not need them.
NO_TORCH_PRELUDE = (
    "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
    "from plaudit.cli import main; sys.exit(main(sys.argv[1:]))"
)


# -- a model registry on S3: s3fs against moto's S3-compatible server on a local port -------------
@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """``s3://<bucket>``, served by moto's S3 server in a thread (real HTTP, real s3fs/botocore);
    the ``AWS_*`` variables point this process and its children at it."""
    import logging

    from moto.server import ThreadedMotoServer

    from plaudit.services.common.process import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "plaudit-test",
        "AWS_SECRET_ACCESS_KEY": "plaudit-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir("plaudit-test")
        yield "s3://plaudit-test"
        fsspec.filesystem("s3").clear_instance_cache()
    server.stop()


# -- databases: the feedback suites run on SQLite and on the local PostgreSQL --------------------
POSTGRES_URL = os.environ.get(
    "PLAUDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[sa.Engine]:
    engine = sa.create_engine(
        normalize_url(POSTGRES_URL),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 3},
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        pytest.skip(f"no PostgreSQL answers at {POSTGRES_URL} ({reason})")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    admin: sa.Engine = request.getfixturevalue("postgres_admin")
    schema = f"feedback_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = normalize_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


# -- reward-model training: a toy preference set a tiny model can learn ------------------------
_GOOD = ["great", "excellent", "helpful", "wonderful", "perfect", "kind", "clear", "correct"]
_BAD = ["awful", "terrible", "useless", "horrible", "rude", "wrong", "broken", "boring"]
# fmt: off
_FILLER = [
    "the", "cat", "river", "blue", "house", "music", "garden", "window", "story", "apple",
    "city", "road", "tree", "light", "water", "paper", "night", "stone", "green", "summer",
    "bread", "chair", "mountain", "letter", "table", "cloud",
]
# fmt: on


def toy_pairs(n: int, seed: int = 0, start: int = 0) -> list[dict[str, str]]:
    """``n`` TRL-format pairs (distinct prompts): the chosen completion carries a positive word
    where the rejected one carries a negative word; the rest of the text is shared noise of
    varied length."""
    import random

    rng = random.Random(seed)
    pairs = []
    for i in range(start, start + n):
        prompt = f"question {i} about {' '.join(rng.choices(_FILLER, k=3))}?"
        words = rng.choices(_FILLER, k=rng.randint(2, 14))
        at = rng.randint(0, len(words))
        chosen = [*words[:at], rng.choice(_GOOD), *words[at:]]
        rejected = [*words[:at], rng.choice(_BAD), *words[at:]]
        pairs.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    return pairs


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
