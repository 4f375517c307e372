"""Split a text the *policy* rendered (prompt and response, chat template included) back into a
conversation and its final assistant turn, so the reward model scores it in its own format.

Known renderings: ChatML (``<|im_start|>role\\n...<|im_end|>``: Qwen, SmolLM2 and the other
policies Plaudit serves with a ChatML template), Llama 3 (``<|start_header_id|>role
<|end_header_id|>\\n\\n...<|eot_id|>``), Gemma (``<start_of_turn>role\\n...<end_of_turn>``) and
the HH dialogue (``\\n\\nHuman: ...\\n\\nAssistant: ...``, what a ``plain`` policy reads). The
prompt is handed to the reward model as an HH dialogue
(:func:`~plaudit.services.common.textfmt.messages_to_dialogue`), which is how every Plaudit
client sends a conversation; the completion is the last assistant turn.

A text in none of these shapes (or one that does not end with an assistant turn) is scored as one
plain string (an empty prompt and the whole text as the completion), and says so (``format`` is
None).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from plaudit.services.common.errors import InvalidArgumentError
from plaudit.services.common.textfmt import dialogue_to_messages, messages_to_dialogue

# special tokens a policy's text may carry around its turns (begin/end of text, padding)
_NOISE = re.compile(
    r"<\|endoftext\|>|<\|end_of_text\|>|<\|begin_of_text\|>|<\|eot_id\|>|<\|im_end\|>"
    r"|<\|pad\|>|<pad>|<bos>|<eos>|<s>|</s>"
)
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant"}


@dataclass(frozen=True)
class _Template:
    name: str
    opener: re.Pattern[str]  # the start of a turn; group "role"
    end: str  # the end-of-turn marker


TEMPLATES = (
    _Template("chatml", re.compile(r"<\|im_start\|>(?P<role>[a-z]+)\n"), "<|im_end|>"),
    _Template(
        "llama3",
        re.compile(r"<\|start_header_id\|>(?P<role>[a-z]+)<\|end_header_id\|>\n\n"),
        "<|eot_id|>",
    ),
    _Template("gemma", re.compile(r"<start_of_turn>(?P<role>[a-z]+)\n"), "<end_of_turn>"),
)


@dataclass(frozen=True)
class ParsedText:
    """What the reward model scores: ``prompt`` (an HH dialogue) and ``completion``; ``format``
    names the rendering that was recognised, None when the text was taken as one plain string."""

    prompt: str
    completion: str
    format: str | None


def _blank(text: str) -> bool:
    return not _NOISE.sub("", text).strip()


def _turns(text: str, template: _Template) -> list[dict[str, str]] | None:
    """The turns of ``text`` rendered with ``template``, or None if it is not such a text."""
    matches = list(template.opener.finditer(text))
    if not matches or not _blank(text[: matches[0].start()]):
        return None
    messages = []
    for i, match in enumerate(matches):
        last = i + 1 == len(matches)
        body = text[match.end() : len(text) if last else matches[i + 1].start()]
        end = body.find(template.end)
        if end >= 0:
            if not _blank(body[end + len(template.end) :]):
                return None  # text between turns: not this template
            body = body[:end]
        elif not last:
            return None  # only the final turn (the response) may be left open
        role = _ROLES.get(match["role"])
        if role is None:
            return None
        messages.append({"role": role, "content": _NOISE.sub("", body).strip()})
    return messages


def split_turns(text: str) -> tuple[list[dict[str, str]], str] | None:
    """The conversation ``text`` renders and the name of its rendering, or None."""
    for template in TEMPLATES:
        if template.opener.search(text):
            found = _turns(text, template)
            return None if found is None else (found, template.name)
    dialogue = _NOISE.sub("", text)
    if dialogue.lstrip().startswith(("Human:", "Assistant:")):
        dialogue = "\n\n" + dialogue.lstrip()
    if "\n\nAssistant:" in dialogue and "\n\nHuman:" in dialogue:
        return dialogue_to_messages(dialogue), "hh"
    return None


def conversation_pair(messages: Sequence[Mapping[str, str]]) -> tuple[str, str] | None:
    """(prompt, completion) of a conversation ending with an assistant turn, else None."""
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return None
    return messages_to_dialogue(messages[:-1]), messages[-1]["content"]


def parse_policy_text(text: str) -> ParsedText:
    """Split a policy-rendered text into prompt and completion (see the module docstring)."""
    found = split_turns(text)
    if found is not None:
        messages, name = found
        pair = conversation_pair(messages)
        if pair is not None:
            return ParsedText(pair[0], pair[1], name)
    return ParsedText("", text, None)


def messages_from_json(value: object, field: str) -> list[dict[str, str]]:
    """A chat conversation sent as JSON (``[{"role", "content"}, ...]``, OpenAI style; content
    a string or a list of text parts), checked, naming the offending field."""
    if not isinstance(value, list) or not value:
        raise InvalidArgumentError(field, "must be a non-empty list of chat messages")
    messages = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise InvalidArgumentError(where, "must be an object with role and content")
        role = item.get("role")
        if role not in ("system", "user", "assistant"):
            raise InvalidArgumentError(f"{where}.role", "must be system, user or assistant")
        content = item.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts) or len(parts) != len(content):
                raise InvalidArgumentError(f"{where}.content", "parts must be text parts")
            content = "".join(str(p) for p in parts)
        if not isinstance(content, str):
            raise InvalidArgumentError(f"{where}.content", "must be a string")
        messages.append({"role": str(role), "content": content})
    return messages
