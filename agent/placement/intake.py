"""Placement intake, pure: is an arriving document a placement to apply, a redelivery, or refused?

No I/O and no clock of its own (the caller passes `now`), so every rule of docs/protocol.md
"Placement" is unit-tested without a broker: JSON and schema checks, the signature with its expiry
and replay rules, and which of several documents that arrived during one apply is applied next.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError

from agent.protocol.schemas import Placement
from agent.protocol.signing import PublicKeys, SignatureRefused, verify


@dataclass(frozen=True)
class Accepted:
    """A valid document: apply it (unless a newer valid one arrived with it)."""

    placement: Placement


@dataclass(frozen=True)
class Redelivery:
    """The applied, signed document again (retained, redelivered on reconnect): nothing to do."""

    generation: int


@dataclass(frozen=True)
class Refused:
    """Not applied; `reason` goes into status (`placement.refused`, `errors`)."""

    generation: int | None
    reason: str


Outcome = Accepted | Redelivery | Refused


@dataclass(frozen=True)
class Applied:
    """What the agent runs now, as far as intake cares: replays are judged against it."""

    generation: int | None = None
    signature: str | None = None


class Intake:
    """Checks documents against the device's signing policy (`[security]` in agent.toml)."""

    def __init__(self, public_key: PublicKeys | None = None, max_age_s: float = 86400.0) -> None:
        self.public_key = public_key
        self.max_age_s = max_age_s

    def check(self, payload: bytes, applied: Applied, now: float | None = None) -> Outcome:
        """The outcome for one arriving document, given what is applied now."""
        now = time.time() if now is None else now
        try:
            doc = json.loads(payload)
        except ValueError as exc:  # also a payload that is not UTF-8
            return Refused(None, f"invalid JSON: {exc}")
        if self.public_key is not None:
            try:
                if self._is_redelivery(doc, applied):
                    return Redelivery(doc["generation"])
                self._verify(doc, applied, now)
            except SignatureRefused as exc:
                return Refused(_generation_of(doc), f"signature: {exc}")
        try:
            return Accepted(Placement.model_validate(doc))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'document'}: {e['msg']}" for e in exc.errors()[:5]
            )
            return Refused(_generation_of(doc), problems)

    @staticmethod
    def _is_redelivery(doc: object, applied: Applied) -> bool:
        """Recognised by its signature before expiry is checked: it may have expired since it was
        applied, and that is not a refusal."""
        return (
            isinstance(doc, dict)
            and applied.generation is not None
            and doc.get("generation") == applied.generation
            and bool(applied.signature)
            and doc.get("signature") == applied.signature
        )

    def _verify(self, doc: object, applied: Applied, now: float) -> None:
        if not isinstance(doc, dict):
            raise SignatureRefused("unsigned: not a JSON object")
        if self.public_key is None:
            return
        verify(doc, self.public_key, self.max_age_s, now=now)
        generation = doc.get("generation")
        if applied.generation is None:
            return
        if generation == applied.generation:
            raise SignatureRefused(f"replayed: generation {generation} is already applied")
        if isinstance(generation, int) and generation < applied.generation:
            raise SignatureRefused(
                f"replayed: generation {generation} is older than the applied {applied.generation}"
            )


def newest(outcomes: Iterable[Outcome]) -> Placement | None:
    """The placement to apply among documents that arrived together: the highest generation, and of
    equal generations the one that arrived last. None when none of them is valid."""
    best: Placement | None = None
    for outcome in outcomes:
        if isinstance(outcome, Accepted) and (
            best is None or outcome.placement.generation >= best.generation
        ):
            best = outcome.placement
    return best


def _generation_of(doc: object) -> int | None:
    """Best-effort generation of a refused document, for the refusal report."""
    value = doc.get("generation") if isinstance(doc, dict) else None
    return value if isinstance(value, int) else None
