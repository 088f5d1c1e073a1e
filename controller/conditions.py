"""MailRoute status conditions with Gateway API semantics: types, statuses, reasons, merge.

The compiler produces ``Condition`` values; the operator writes them into ``status.conditions``
with ``merge``, a read-modify-write that replaces only our three types, leaves conditions of
other types (written by other controllers or people) untouched and keeps ``lastTransitionTime``
while a condition's status does not change (Kubernetes API conventions, "Typical status
properties"). Pure: the current time is an argument, never read from a clock; no I/O, no logging.
The CRD's status.conditions description lists the same reasons; a test keeps the two in step.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, get_args

ConditionType = Literal["Accepted", "ResolvedRefs", "Programmed"]
CONDITION_TYPES: tuple[ConditionType, ...] = get_args(ConditionType)
Status = Literal["True", "False", "Unknown"]

# metav1.Condition caps a message at 32768 characters (the CRD's status schema says the same);
# the API server would refuse the whole status patch over one long message.
MAX_MESSAGE = 32768
_ELLIPSIS = "..."


class Reason(StrEnum):
    """Why a condition has its status: one CamelCase word, as Gateway API enumerates them."""

    # Accepted
    ACCEPTED = "Accepted"
    INVALID = "Invalid"  # the spec breaks a schema or CEL rule; also Programmed=False for it
    # An older route claims one of its users or domains, or another namespace's route claims the
    # domain one of them is in (controller.compiler, rules 2 and 2a).
    CONFLICTED = "Conflicted"
    # ResolvedRefs
    RESOLVED_REFS = "ResolvedRefs"
    BACKEND_NOT_FOUND = "BackendNotFound"
    NO_READY_ENDPOINTS = "NoReadyEndpoints"
    # A headersFrom Secret (labelled) or its key is missing; a headersFrom value is no header
    # value. Reason names, not credentials (ruff's S105 goes by the word "secret").
    SECRET_NOT_FOUND = "SecretNotFound"  # noqa: S105
    INVALID_SECRET_VALUE = "InvalidSecretValue"  # noqa: S105
    # Programmed (and ResolvedRefs when it could not be evaluated)
    PROGRAMMED = "Programmed"
    PENDING = "Pending"


# Which reasons go with which (type, status). Gateway API's rule: the positive reason is named
# after the type; Unknown is Pending; a route left out of the table is not Programmed, Invalid.
REASONS: Mapping[tuple[ConditionType, Status], frozenset[Reason]] = {
    ("Accepted", "True"): frozenset({Reason.ACCEPTED}),
    ("Accepted", "False"): frozenset({Reason.INVALID, Reason.CONFLICTED}),
    ("ResolvedRefs", "True"): frozenset({Reason.RESOLVED_REFS}),
    ("ResolvedRefs", "False"): frozenset(
        {
            Reason.BACKEND_NOT_FOUND,
            Reason.NO_READY_ENDPOINTS,
            Reason.SECRET_NOT_FOUND,
            Reason.INVALID_SECRET_VALUE,
        }
    ),
    ("ResolvedRefs", "Unknown"): frozenset({Reason.PENDING}),
    ("Programmed", "True"): frozenset({Reason.PROGRAMMED}),
    ("Programmed", "False"): frozenset({Reason.INVALID}),
    ("Programmed", "Unknown"): frozenset({Reason.PENDING}),
}


@dataclass(frozen=True, slots=True)
class Condition:
    """One condition of one MailRoute, as computed from one generation of its spec."""

    type: ConditionType
    status: Status
    reason: Reason
    message: str
    observed_generation: int

    def __post_init__(self) -> None:
        # A reason outside the table is a bug in the caller, never a user's mistake.
        if self.reason not in REASONS.get((self.type, self.status), frozenset()):
            raise ValueError(f"reason {self.reason} does not go with {self.type}={self.status}")


def _clipped(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return message[: MAX_MESSAGE - len(_ELLIPSIS)] + _ELLIPSIS


def to_status(condition: Condition, last_transition_time: str) -> dict[str, Any]:
    """The condition as a ``status.conditions`` entry (metav1.Condition field names)."""
    return {
        "type": condition.type,
        "status": condition.status,
        "reason": condition.reason.value,
        "message": _clipped(condition.message),
        "observedGeneration": condition.observed_generation,
        "lastTransitionTime": last_transition_time,
    }


def merge(existing: Sequence[Any], updates: Sequence[Condition], now: str) -> list[Any]:
    """Apply ``updates`` to a ``status.conditions`` list and return the new list.

    Args:
        existing: the list as read from the object (entries of other types, and entries that
            are not even objects, are kept as they are and where they are).
        updates: our conditions, at most one per type.
        now: the RFC 3339 time to stamp on a condition whose status changed or that is new.

    Returns:
        A new list: each of our types appears once, in its old place (new types are appended in
        the order given); ``lastTransitionTime`` is kept when the status is unchanged.

    Raises:
        ValueError: ``updates`` holds two conditions of one type (a bug in the caller).
    """
    by_type: dict[str, Condition] = {}
    for condition in updates:
        if condition.type in by_type:
            raise ValueError(f"two {condition.type} conditions in one update")
        by_type[condition.type] = condition
    merged: list[Any] = []
    placed: set[str] = set()
    for entry in existing:
        kind = entry.get("type") if isinstance(entry, Mapping) else None
        if not isinstance(kind, str) or kind not in by_type:
            merged.append(entry)
            continue
        if kind in placed:
            continue  # a duplicate of one of our types (hand-edited): drop it
        placed.add(kind)
        condition = by_type[kind]
        previous = entry.get("lastTransitionTime")
        unchanged = entry.get("status") == condition.status and isinstance(previous, str)
        merged.append(to_status(condition, previous if unchanged else now))
    merged.extend(to_status(c, now) for c in updates if c.type not in placed)
    return merged
