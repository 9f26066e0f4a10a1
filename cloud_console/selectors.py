"""Selectors: which devices a rollout, the fleet table filter or the fleet move applies to.

A selector is terms joined by `,` (all must hold), matched against a device's id and its tags (the
agent's own from `agent.toml`, overlaid by the tags the console assigned; docs/fleet.md#selectors):

    site=north            tag `site` is `north`          site=north|south   one of these
    site!=north           tag `site` is not `north`      site               has a tag `site`
    !site                 has no tag `site`              id=cam-*           device id (glob, `*` `?`)
    *                     every device (so is an empty selector)

Pure: parsing and matching only, no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from agent.protocol.topics import TAG_KEY_RE

_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/*?-]{1,64}$")


class SelectorError(ValueError):
    """A selector that does not parse; the message says where."""


@dataclass(frozen=True)
class Term:
    key: str  # a tag name, or "id"
    op: str  # "=" | "!=" | "has" | "not"
    values: tuple[str, ...] = ()

    def holds(self, device_id: str, tags: dict[str, str]) -> bool:
        value = device_id if self.key == "id" else tags.get(self.key)
        if self.op == "has":
            return value is not None
        if self.op == "not":
            return value is None
        hit = value is not None and any(fnmatch.fnmatchcase(value, v) for v in self.values)
        return hit if self.op == "=" else not hit


@dataclass(frozen=True)
class Selector:
    text: str
    terms: tuple[Term, ...]

    def matches(self, device_id: str, tags: dict[str, str]) -> bool:
        return all(term.holds(device_id, tags) for term in self.terms)


def _key(key: str, term: str) -> str:
    if key != "id" and not TAG_KEY_RE.fullmatch(key):
        raise SelectorError(f"selector term {term!r}: {key!r} is not a tag name ({TAG_KEY_RE.pattern})")
    return key


def parse(text: str) -> Selector:
    """`site=north,hw=jetson|orin` -> Selector; raises SelectorError with the bad term."""
    text = text.strip()
    if len(text) > 1000:
        raise SelectorError("selector longer than 1000 characters")
    terms: list[Term] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term or term == "*":
            continue
        if "!=" in term or "=" in term:
            op = "!=" if "!=" in term else "="
            key, _, rest = term.partition(op)
            values = tuple(v.strip() for v in rest.split("|"))
            bad = [v for v in values if not _VALUE_RE.fullmatch(v)]
            if bad:
                raise SelectorError(f"selector term {term!r}: bad value {bad[0]!r}")
            terms.append(Term(_key(key.strip(), term), op, values))
        elif term.startswith("!"):
            terms.append(Term(_key(term[1:].strip(), term), "not"))
        else:
            terms.append(Term(_key(term, term), "has"))
    return Selector(text, tuple(terms))


def merged_tags(reported: dict[str, str] | None, assigned: dict[str, str] | None) -> dict[str, str]:
    """A device's tags: its own, with the console's assignments on top (an empty value removes one)."""
    out = dict(reported or {})
    for key, value in (assigned or {}).items():
        if value == "":
            out.pop(key, None)
        else:
            out[key] = value
    return out
