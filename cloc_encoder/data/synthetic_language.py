"""The language of the synthetic world: captions, referring expressions and their semantics.

Objects are described by :class:`ObjectFacts`: three attributes (colour, shape, size) and the object's full
(amodal) box, ``xyxy`` normalised to ``[0, 1]`` by the original image's width and height (``y`` grows downwards).

Expression grammar (see ``docs/data_format.md``)::

    expression  := "the " description
                 | "the " description " " relation " the " description
                 | "the " superlative " " description
    description := [size " "] [colour " "] shape
    relation    := "left of" | "right of" | "above" | "below"
    superlative := "leftmost" | "rightmost" | "topmost" | "bottommost"

Semantics, with ``margin`` a distance between box centres in normalised units:

* a description matches every object whose attributes equal all the words given;
* ``the D`` refers to the objects matching ``D``;
* ``the D R the E``: ``E`` must match exactly one object ``L``; refers to the objects ``o != L`` matching ``D`` with
  ``R(o, L)``, where ``left of`` means ``L.cx - o.cx >= margin``, ``right of`` ``o.cx - L.cx >= margin``,
  ``above`` ``L.cy - o.cy >= margin`` and ``below`` ``o.cy - L.cy >= margin``;
* ``the S D``: of the objects matching ``D``, the one with the extreme centre coordinate (smallest ``cx`` for
  ``leftmost``, largest ``cx`` for ``rightmost``, smallest ``cy`` for ``topmost``, largest ``cy`` for
  ``bottommost``), provided it beats every other match by at least ``margin``; otherwise nothing.

An expression *identifies* an object when it refers to exactly that one object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SUPERLATIVES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
RESERVED_WORDS = frozenset({"the", "a", "an", "and", "of", "left", "right", "above", "below", *SUPERLATIVES})

ATTRIBUTE_ORDER: tuple[str, ...] = ("size", "colour", "shape")
"""Word order inside a description: ``small red circle``."""

ATTRIBUTE_LEVELS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("shape",),),
    (("colour", "shape"), ("size", "shape")),
    (("size", "colour", "shape"),),
)
"""Attribute-only descriptions, shortest level first; within a level the first is the canonical one."""

RELATIONAL_TARGET_LEVELS: tuple[tuple[str, ...], ...] = (("colour", "shape"), ("size", "colour", "shape"))
"""Descriptions tried (in order) for the target of relational and superlative expressions."""


@dataclass(frozen=True)
class ObjectFacts:
    """One object: attributes and full box (``xyxy``, normalised by the original image size, ``y`` down)."""

    colour: str
    shape: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def centre(self) -> tuple[float, float]:
        """Box centre ``(cx, cy)`` in normalised image coordinates."""
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0

    @property
    def category(self) -> str:
        """Class name for region classification: ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def caption(self) -> str:
        """Region caption: ``"small red circle"``."""
        return describe(self, ATTRIBUTE_ORDER)


@dataclass(frozen=True)
class Vocabulary:
    """The words of one world; names are single lowercase words, disjoint across kinds and from the grammar."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...]

    def __post_init__(self) -> None:
        words = [*self.colours, *self.shapes, *self.sizes]
        if len(set(words)) != len(words):
            raise ValueError(f"colour, shape and size names must be distinct, got {words}")
        for word in words:
            if not word or not word.isalpha() or word != word.lower() or word in RESERVED_WORDS:
                raise ValueError(f"vocabulary word {word!r} must be one lowercase word and not a grammar word")


def describe(obj: ObjectFacts, attributes: Sequence[str]) -> str:
    """The description of ``obj`` using ``attributes`` (always in ``size colour shape`` order)."""
    return " ".join(getattr(obj, name) for name in ATTRIBUTE_ORDER if name in attributes)


def _constraints(obj: ObjectFacts, attributes: Sequence[str]) -> dict[str, str]:
    return {name: getattr(obj, name) for name in attributes}


def _matching(objects: Sequence[ObjectFacts], constraints: dict[str, str]) -> list[int]:
    return [i for i, obj in enumerate(objects) if all(getattr(obj, k) == v for k, v in constraints.items())]


def relation_holds(subject: ObjectFacts, landmark: ObjectFacts, relation: str, margin: float) -> bool:
    """Whether ``subject`` is ``relation`` (``"left of"`` …) ``landmark``, by box centres with ``margin``."""
    (sx, sy), (lx, ly) = subject.centre, landmark.centre
    if relation == "left of":
        return lx - sx >= margin
    if relation == "right of":
        return sx - lx >= margin
    if relation == "above":
        return ly - sy >= margin
    if relation == "below":
        return sy - ly >= margin
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def superlative_winner(
    objects: Sequence[ObjectFacts], candidates: Sequence[int], superlative: str, margin: float
) -> int | None:
    """The candidate that is ``superlative`` (``"leftmost"`` …) by at least ``margin``, else ``None``."""
    axis, sign = {"leftmost": (0, 1.0), "rightmost": (0, -1.0), "topmost": (1, 1.0), "bottommost": (1, -1.0)}[
        superlative
    ]
    if not candidates:
        return None
    keyed = sorted((sign * objects[i].centre[axis], i) for i in candidates)
    if len(keyed) > 1 and keyed[1][0] - keyed[0][0] < margin:
        return None
    return keyed[0][1]


def parse_description(text: str, vocabulary: Vocabulary) -> dict[str, str] | None:
    """``"small red circle"`` → ``{"size": "small", "colour": "red", "shape": "circle"}``; ``None`` if invalid."""
    words = text.split()
    if not words or words[-1] not in vocabulary.shapes:
        return None
    constraints = {"shape": words[-1]}
    expected = ["size", "colour"]
    for word in words[:-1]:
        kind = "size" if word in vocabulary.sizes else "colour" if word in vocabulary.colours else None
        if kind is None or kind not in expected:
            return None
        expected = expected[expected.index(kind) + 1 :]
        constraints[kind] = word
    return constraints


def resolve_expression(
    expression: str, objects: Sequence[ObjectFacts], vocabulary: Vocabulary, margin: float
) -> list[int]:
    """Indices of the objects ``expression`` refers to under the grammar's semantics (``[]`` if unparsable)."""
    text = " ".join(expression.split())
    if not text.startswith("the "):
        return []
    body = text[len("the ") :]
    first, _, rest = body.partition(" ")
    if first in SUPERLATIVES:
        constraints = parse_description(rest, vocabulary)
        if constraints is None:
            return []
        winner = superlative_winner(objects, _matching(objects, constraints), first, margin)
        return [] if winner is None else [winner]
    for relation in RELATIONS:
        target_text, found, landmark_text = body.partition(f" {relation} the ")
        if not found:
            continue
        target = parse_description(target_text, vocabulary)
        landmark = parse_description(landmark_text, vocabulary)
        if target is None or landmark is None:
            return []
        landmarks = _matching(objects, landmark)
        if len(landmarks) != 1:
            return []
        anchor = landmarks[0]
        return [
            i
            for i in _matching(objects, target)
            if i != anchor and relation_holds(objects[i], objects[anchor], relation, margin)
        ]
    constraints = parse_description(body, vocabulary)
    return [] if constraints is None else _matching(objects, constraints)


def attribute_expressions(objects: Sequence[ObjectFacts], index: int) -> list[str]:
    """The unique attribute-only expressions of ``objects[index]`` at the shortest level that has any."""
    obj = objects[index]
    for level in ATTRIBUTE_LEVELS:
        found = [
            f"the {describe(obj, attributes)}"
            for attributes in level
            if _matching(objects, _constraints(obj, attributes)) == [index]
        ]
        if found:
            return found
    return []


def relational_expressions(objects: Sequence[ObjectFacts], index: int, margin: float) -> list[str]:
    """Relational and superlative expressions identifying ``objects[index]`` (shortest target description each).

    Landmarks are only objects that attribute-only expressions identify (no nested relations).
    """
    obj = objects[index]
    found: list[str] = []
    for anchor, landmark in enumerate(objects):
        landmark_names = attribute_expressions(objects, anchor) if anchor != index else []
        if not landmark_names:
            continue
        for relation in RELATIONS:
            if not relation_holds(obj, landmark, relation, margin):
                continue
            for attributes in RELATIONAL_TARGET_LEVELS:
                candidates = _matching(objects, _constraints(obj, attributes))
                targets = [
                    i for i in candidates if i != anchor and relation_holds(objects[i], landmark, relation, margin)
                ]
                if targets == [index]:
                    found.append(f"the {describe(obj, attributes)} {relation} {landmark_names[0]}")
                    break
    for superlative in SUPERLATIVES:
        for attributes in RELATIONAL_TARGET_LEVELS:
            candidates = _matching(objects, _constraints(obj, attributes))
            if superlative_winner(objects, candidates, superlative, margin) == index:
                found.append(f"the {superlative} {describe(obj, attributes)}")
                break
    return found


def referring_expressions(objects: Sequence[ObjectFacts], vocabulary: Vocabulary, margin: float) -> list[list[str]]:
    """For each object, the expressions that identify it uniquely (``[]`` when none does).

    Attribute-only expressions at the shortest unique level when they exist; otherwise relational and superlative
    ones. Every returned expression is checked with :func:`resolve_expression`.
    """
    result = []
    for index in range(len(objects)):
        candidates = attribute_expressions(objects, index) or relational_expressions(objects, index, margin)
        result.append([e for e in candidates if resolve_expression(e, objects, vocabulary, margin) == [index]])
    return result


def is_relational(expression: str) -> bool:
    """Whether an expression uses a spatial relation or a superlative (i.e. attributes alone were not enough)."""
    words = expression.split()
    return any(word in SUPERLATIVES or word in {"left", "right", "above", "below"} for word in words)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def image_caption(objects: Sequence[ObjectFacts]) -> str:
    """Whole-image caption listing objects left to right: ``"a small red circle, a large blue square and …"``."""
    ordered = sorted(range(len(objects)), key=lambda i: (objects[i].centre[0], i))
    phrases = [_with_article(objects[i].caption) for i in ordered]
    if len(phrases) <= 1:
        return phrases[0] if phrases else ""
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


__all__ = [
    "ATTRIBUTE_LEVELS",
    "RELATIONAL_TARGET_LEVELS",
    "RELATIONS",
    "SUPERLATIVES",
    "ObjectFacts",
    "Vocabulary",
    "attribute_expressions",
    "describe",
    "image_caption",
    "is_relational",
    "parse_description",
    "referring_expressions",
    "relation_holds",
    "relational_expressions",
    "resolve_expression",
    "superlative_winner",
]
