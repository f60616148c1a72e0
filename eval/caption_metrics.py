"""Caption metrics — BLEU-1…4, METEOR, ROUGE-L, CIDEr — computed with pycocoevalcap as the COCO caption evaluation does.

Every question has one candidate (the model's answer; a missing answer is the empty string) and one or more
references. Scores are corpus-level as pycocoevalcap reports them: BLEU over the whole set ("closest" reference
length), METEOR 1.5, ROUGE-L (β = 1.2) and CIDEr averaged over questions. CIDEr is pycocoevalcap's ``Cider`` (×10,
idf from the references of the evaluated set): it is comparable only between runs on the same questions, and a
candidate equal to its single reference scores 10 only when each of its n-gram orders has an n-gram that is not in
every question's references.

Tokenisation (``tokenizer``):

- ``ptb``: pycocoevalcap's Stanford PTB tokenizer (Java): lower-case, clitics split (``man 's``), punctuation
  tokens dropped. Published RefCOCOg numbers use it.
- ``simple``: a pure-Python stand-in for machines without Java: lower-case, keep runs of letters and digits and
  apostrophe clitics (``man's`` → ``man 's``), drop everything else. It matches ``ptb`` on plain text; contractions
  (``don't``) and hyphenated words split differently.
- ``auto``: ``ptb`` when ``java`` is on ``PATH``, else ``simple``. The result records which one ran.

METEOR needs Java too (``meteor-1.5.jar``); without it ``meteor`` is ``None`` and ``meteor_note`` says why.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

TOKENIZERS = ("auto", "ptb", "simple")
_SIMPLE_TOKEN = re.compile(r"'[^\W_]+|[^\W_]+")


def java_available() -> bool:
    """Whether a ``java`` executable is on ``PATH`` (the PTB tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def resolve_tokenizer(tokenizer: str = "auto") -> str:
    """``auto`` → ``ptb`` with Java, else ``simple``; ``ptb`` without Java raises ``RuntimeError``."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer={tokenizer!r}; choose one of {list(TOKENIZERS)}")
    if tokenizer == "auto":
        return "ptb" if java_available() else "simple"
    if tokenizer == "ptb" and not java_available():
        raise RuntimeError("the PTB tokenizer needs Java (java is not on PATH); use tokenizer='simple'")
    return tokenizer


def simple_tokenize(text: str) -> str:
    """The ``simple`` tokenisation of one text, tokens joined by single spaces."""
    return " ".join(_SIMPLE_TOKEN.findall(text.lower()))


def tokenize(texts: Mapping[str, Sequence[str]], tokenizer: str) -> dict[str, list[str]]:
    """``{id: [text, ...]}`` → the same structure tokenised (``ptb`` or ``simple``). Line breaks and other
    whitespace runs become single spaces first (the PTB tokenizer reads one text per line)."""
    clean = {key: [" ".join(str(t).split()) for t in values] for key, values in texts.items()}
    if tokenizer == "simple":
        return {key: [simple_tokenize(t) for t in values] for key, values in clean.items()}
    tokenized = PTBTokenizer().tokenize({key: [{"caption": t} for t in values] for key, values in clean.items()})
    if any(len(tokenized.get(key, [])) != len(values) for key, values in clean.items()):
        raise RuntimeError("the PTB tokenizer returned a different number of texts than it was given")
    return tokenized


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float | None, str]:
    if not java_available():
        return None, "METEOR needs Java (java is not on PATH); not computed"
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
        return float(score), ""
    except (ValueError, OSError) as error:  # the Java process died or answered something that is not a number
        if scorer.lock.locked():  # compute_score holds it on failure; Meteor.__del__ would wait for it forever
            scorer.lock.release()
        return None, f"METEOR failed ({type(error).__name__}: {error}); not computed"
    finally:
        del scorer  # stops the Java process


def caption_metrics(
    candidates: Mapping[str, str | None],
    references: Mapping[str, Sequence[str]],
    *,
    tokenizer: str = "auto",
    meteor: bool = True,
) -> dict[str, Any]:
    """Score ``candidates[id]`` against ``references[id]`` for every id of ``references`` (a missing or ``None``
    candidate is the empty string). Returns ``bleu_1``…``bleu_4``, ``meteor`` (``None`` when not computed, with
    ``meteor_note``), ``rouge_l``, ``cider``, ``tokenizer`` and ``num_questions``."""
    ids = sorted(references)
    empty = [i for i in ids if not [r for r in references[i] if r and r.strip()]]
    if empty:
        raise ValueError(f"{len(empty)} question(s) have no reference text, e.g. {empty[0]!r}")
    used = resolve_tokenizer(tokenizer)
    result: dict[str, Any] = {"tokenizer": used, "num_questions": len(ids)}
    if not ids:
        result.update(dict.fromkeys(("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"), 0.0), meteor=None)
        result["meteor_note"] = "no questions"
        return result
    gts = tokenize({i: [r for r in references[i] if r and r.strip()] for i in ids}, used)
    res = tokenize({i: [candidates.get(i) or ""] for i in ids}, used)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    result.update({f"bleu_{n}": float(score) for n, score in enumerate(bleu, start=1)})
    result["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    result["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        result["meteor"], note = _meteor(gts, res)
    else:
        result["meteor"], note = None, "METEOR not requested"
    if note:
        result["meteor_note"] = note
    return result


__all__ = ["TOKENIZERS", "caption_metrics", "java_available", "resolve_tokenizer", "simple_tokenize", "tokenize"]
