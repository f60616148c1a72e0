"""Noun-phrase extraction from captions, as in the CLOC paper's appendix (VESL step 2).

``caption → lowercase → tokenize → drop generic web words → POS-tag → chunk NP: {<DT>?<JJ.*>*<NN.*>+}
→ skip phrases made only of stopwords → first 20 distinct phrases``.

The part-of-speech tagger is pluggable (any ``tokens → [(token, tag)]`` callable with Penn Treebank tags). The
default is NLTK's averaged perceptron tagger, whose model data is a separate download
(``python -m nltk.downloader averaged_perceptron_tagger_eng``); without it :func:`nltk_perceptron_tagger` raises
:class:`TaggerUnavailableError` saying so. Chunking uses ``nltk.RegexpParser`` with the grammar above.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

NP_GRAMMAR = "NP: {<DT>?<JJ.*>*<NN.*>+}"
"""The chunk grammar of the paper's appendix: optional determiner, adjectives, one or more nouns."""

MAX_PHRASES = 20
"""The paper keeps at most 20 phrases per caption."""


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


OWLV2_GENERIC_WORDS: frozenset[str] = _word_set(
    """
    image images img imgs photo photos photograph photographs photography photographer picture pictures pic pics
    stock wallpaper wallpapers png jpg jpeg gif svg webp vector vectors clipart cliparts illustration illustrations
    royalty free download hd 4k resolution thumbnail screenshot alt shutterstock getty gettyimages istock alamy
    dreamstime depositphotos 123rf stockphoto closeup
    """
)
"""Generic words of web captions that name no object, dropped before tagging.

The CLOC paper drops "OWLv2's list" of such words (OWL-ST, Minderer et al. 2023, filters caption-derived queries
the same way), but neither paper prints the list and the public OWL code (scenic ``owl_vit``) does not ship it.
This list is ours: the examples the papers name ("image", "photo", "stock", "wallpaper", "png", ...) plus the
file-type, stock-agency and boilerplate words of web alt-texts. Replace it with ``ignore_words`` (config) or
``--ignore-words FILE`` (command line).
"""

ENGLISH_STOPWORDS: frozenset[str] = _word_set(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
    himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
    that that'll these those am is are was were be been being have has had having do does did doing a an the and but
    if or because as until while of at by for with about against between into through during before after above
    below to from up down in out on off over under again further then once here there when where why how all any both
    each few more most other some such no nor not only own same so than too very s t can will just don don't should
    should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
    haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
    weren weren't won won't wouldn wouldn't
    """
)
"""NLTK's English stopword list (its ``stopwords`` corpus, which is also a separate download), inlined."""

Tagger = Callable[[Sequence[str]], Sequence[tuple[str, str]]]
"""Tokens → ``(token, Penn Treebank tag)`` pairs, e.g. ``nltk.tag.PerceptronTagger().tag``."""

_TOKEN = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")
_WORD = re.compile(r"\w")

TAGGER_HELP = (
    "VESL's phrase extraction needs NLTK's averaged perceptron tagger data, which is not installed. Install it "
    "once with:\n    python -m nltk.downloader averaged_perceptron_tagger_{lang}\n"
    "(or set NLTK_DATA to a folder holding taggers/averaged_perceptron_tagger_{lang}/), or pass another tagger "
    "to PhraseExtractor(tagger=...)."
)


class TaggerUnavailableError(RuntimeError):
    """The part-of-speech tagger (or NLTK itself) is not installed; the message says how to install it."""


def _require_nltk():
    try:
        import nltk
    except ImportError as error:
        raise TaggerUnavailableError(
            "VESL's phrase extraction needs NLTK: pip install nltk (or pip install -e '.[vesl]')"
        ) from error
    return nltk


def nltk_perceptron_tagger(lang: str = "eng") -> Tagger:
    """NLTK's averaged perceptron tagger; raises :class:`TaggerUnavailableError` when its data is missing."""
    _require_nltk()
    from nltk.tag.perceptron import PerceptronTagger

    try:
        tagger = PerceptronTagger(lang=lang)
    except LookupError as error:
        raise TaggerUnavailableError(TAGGER_HELP.format(lang=lang)) from error
    return tagger.tag


def tokenize(text: str) -> list[str]:
    """Lowercase and split into words (hyphens and apostrophes kept inside words) and punctuation marks."""
    return _TOKEN.findall(text.lower())


class PhraseExtractor:
    """Caption → noun phrases (the paper's VESL phrase extraction).

    Args:
        tagger: POS tagger; default :func:`nltk_perceptron_tagger` (loaded on first use).
        grammar: ``nltk.RegexpParser`` grammar; only chunks labelled ``NP`` are kept.
        ignore_words: generic words dropped before tagging.
        stopwords: a phrase made only of these words (or of punctuation) is skipped.
        max_phrases: keep at most this many distinct phrases, in caption order.
    """

    def __init__(
        self,
        tagger: Tagger | None = None,
        *,
        grammar: str = NP_GRAMMAR,
        ignore_words: Iterable[str] = OWLV2_GENERIC_WORDS,
        stopwords: Iterable[str] = ENGLISH_STOPWORDS,
        max_phrases: int = MAX_PHRASES,
    ) -> None:
        if max_phrases < 1:
            raise ValueError(f"max_phrases must be at least 1, got {max_phrases}")
        self._tagger = tagger
        self.grammar = grammar
        self._parser = _require_nltk().RegexpParser(grammar)
        self.ignore_words = frozenset(word.lower() for word in ignore_words)
        self.stopwords = frozenset(word.lower() for word in stopwords)
        self.max_phrases = max_phrases

    def __getstate__(self) -> dict[str, Any]:
        # NLTK's compiled chunk patterns do not survive pickling (their timeout sentinel is compared by identity):
        # ship the grammar and rebuild the parser where the extractor lands (e.g. a Ray worker).
        return {key: value for key, value in self.__dict__.items() if key != "_parser"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._parser = _require_nltk().RegexpParser(self.grammar)

    @property
    def tagger(self) -> Tagger:
        if self._tagger is None:
            self._tagger = nltk_perceptron_tagger()
        return self._tagger

    def __call__(self, caption: str) -> list[str]:
        tokens = [token for token in tokenize(caption) if token not in self.ignore_words]
        if not tokens:
            return []
        tree = self._parser.parse(list(self.tagger(tokens)))
        phrases: list[str] = []
        for subtree in tree.subtrees(lambda node: node.label() == "NP"):
            words = [word for word, _ in subtree.leaves()]
            if all(word in self.stopwords or not _WORD.search(word) for word in words):
                continue  # only stopwords (or punctuation a tagger mistook for a noun)
            phrase = " ".join(words)
            if phrase not in phrases:
                phrases.append(phrase)
                if len(phrases) == self.max_phrases:
                    break
        return phrases


def read_word_list(path: str) -> list[str]:
    """One word per line; blank lines and ``#`` comments ignored (for ``--ignore-words FILE``)."""
    with open(path, encoding="utf-8") as handle:
        lines = (line.split("#", 1)[0].strip().lower() for line in handle)
        return [line for line in lines if line]


__all__ = [
    "ENGLISH_STOPWORDS",
    "MAX_PHRASES",
    "NP_GRAMMAR",
    "OWLV2_GENERIC_WORDS",
    "PhraseExtractor",
    "Tagger",
    "TaggerUnavailableError",
    "nltk_perceptron_tagger",
    "read_word_list",
    "tokenize",
]
