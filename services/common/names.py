"""Names the services share: named models, feedback criteria and prompt tags follow one rule,
lower-case ASCII letters, digits, ``_`` and ``-``, starting with a letter, at most 32 characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from plaudit.services.common.errors import InvalidArgumentError

NAME_PATTERN = r"[a-z][a-z0-9_-]{0,31}"
NAME_RE = re.compile(NAME_PATTERN)  # use fullmatch
MAX_TAGS = 16
"""Distinct tags one prompt may carry."""


def is_name(value: object) -> bool:
    """True when ``value`` is a valid model, criterion or tag name."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def check_tags(field: str, tags: object) -> frozenset[str]:
    """A prompt's tags: a list of names, at most :data:`MAX_TAGS` distinct ones; an
    :class:`InvalidArgumentError` names ``field`` or ``field[i]`` otherwise."""
    if isinstance(tags, str) or not isinstance(tags, Sequence):
        raise InvalidArgumentError(field, "must be a list of strings")
    for index, tag in enumerate(tags):
        if not is_name(tag):
            shown = repr(tag[:40]) if isinstance(tag, str) else type(tag).__name__
            raise InvalidArgumentError(
                f"{field}[{index}]",
                f"{shown} is not a tag: lower-case ASCII letters, digits, '_' or '-', starting "
                "with a letter, at most 32 characters",
            )
    distinct = frozenset(tags)
    if len(distinct) > MAX_TAGS:
        raise InvalidArgumentError(field, f"has {len(distinct)} tags; the limit is {MAX_TAGS}")
    return distinct
