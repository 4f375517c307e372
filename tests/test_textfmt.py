"""Pure text formatting: dialogue parsing, end-keeping truncation, length grouping."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from plaudit.services.common.textfmt import (
    RewardTextEncoder,
    TextFormat,
    dialogue_to_messages,
    length_groups,
    split_hh_dialogue,
)
from tests.conftest import minilm_dir


@pytest.fixture(scope="module")
def bert_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


def encoder(tok: Tokenizer, max_length: int) -> RewardTextEncoder:
    fmt = TextFormat(kind="pair", max_length=max_length, pad_token_id=0, uses_token_type_ids=True)
    return RewardTextEncoder(tok, fmt)


def test_split_hh_dialogue() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: Like this."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: No."
    assert split_hh_dialogue(chosen, rejected) == (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:",
        "Like this.",
        "No.",
    )


def test_split_hh_dialogue_without_shared_prefix_fails() -> None:
    with pytest.raises(ValueError):
        split_hh_dialogue("abc", "xyz")


def test_dialogue_to_messages() -> None:
    assert dialogue_to_messages("What is 2+2?") == [{"role": "user", "content": "What is 2+2?"}]
    assert dialogue_to_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]


def test_length_groups_fit_budget_and_cover_every_item() -> None:
    groups = length_groups(np.array([5, 100, 7, 50]), 120)
    assert [g.tolist() for g in groups] == [[1], [3, 2], [0]]
    lengths = np.random.default_rng(0).integers(1, 300, size=500)
    groups = length_groups(lengths, 1024)
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))
    for g in groups:
        assert len(g) == 1 or len(g) * lengths[g].max() <= 1024


def test_pair_encoding_without_truncation(bert_tokenizer: Tokenizer) -> None:
    [(enc, truncated)] = encoder(bert_tokenizer, 32).encode(["hello there"], ["general kenobi"])
    assert enc.tokens == [
        "[CLS]",
        "hello",
        "there",
        "[SEP]",
        "general",
        "ken",
        "##ob",
        "##i",
        "[SEP]",
    ]
    assert enc.type_ids == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert truncated is False


def test_truncation_keeps_the_end_of_the_prompt(bert_tokenizer: Tokenizer) -> None:
    [(enc, truncated)] = encoder(bert_tokenizer, 8).encode(["a b c d e f g h"], ["x y z"])
    assert enc.tokens == ["[CLS]", "g", "h", "[SEP]", "x", "y", "z", "[SEP]"]
    assert truncated is True


def test_long_completion_keeps_its_end_and_drops_the_prompt(bert_tokenizer: Tokenizer) -> None:
    [(enc, truncated)] = encoder(bert_tokenizer, 7).encode(["a b"], ["one two three four five six"])
    assert enc.tokens == ["[CLS]", "[SEP]", "three", "four", "five", "six", "[SEP]"]
    assert truncated is True


def test_pad_builds_masked_right_padded_arrays(bert_tokenizer: Tokenizer) -> None:
    enc = encoder(bert_tokenizer, 32)
    batch = enc.encode_padded(["hi", "hello there friend"], ["yo", "ok"])
    assert batch.lengths.tolist() == [5, 7]
    assert batch.inputs["input_ids"].shape == (2, 7)
    assert batch.inputs["attention_mask"].tolist()[0] == [1, 1, 1, 1, 1, 0, 0]
    assert batch.inputs["input_ids"][0, 5:].tolist() == [0, 0]
    assert "token_type_ids" in batch.inputs


def test_chat_template_format_renders_turns_and_keeps_the_end(bert_tokenizer: Tokenizer) -> None:
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    )
    fmt = TextFormat(kind="chat_template", max_length=6, pad_token_id=0, chat_template=template)
    enc = RewardTextEncoder(bert_tokenizer, fmt)
    text = enc.render("\n\nHuman: hi\n\nAssistant:", "bye")
    assert text == "<user>hi</user><assistant>bye</assistant>"
    [(encoding, truncated)] = enc.encode(["\n\nHuman: hi\n\nAssistant:"], ["bye"])
    assert truncated is True
    # the tokenizer's own special tokens wrap the rendered text, as in training
    assert encoding.tokens[0] == "[CLS]"
    assert encoding.tokens[-3:] == ["assistant", ">", "[SEP]"]
    assert len(encoding.ids) == 6


def test_invalid_max_length_is_rejected(bert_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="max_length"):
        encoder(bert_tokenizer, 3)
