"""A restricted unpickler for downloaded annotation files (e.g. the ``refer`` toolkit's ``refs(unc).p``).

:func:`safe_load_pickle` admits only what pickle can build **without importing anything**: ``dict``, ``list``,
``tuple``, ``str``, ``bytes``, ``int``, ``float``, ``bool`` and ``None`` (plus ``set``/``frozenset``/``bytearray``
where the pickle uses protocol 4/5's opcodes for them; older protocols encode those as a global call, refused).
Every global lookup (``find_class``: classes, functions such as ``os.system``, ``numpy`` arrays, ``copyreg``
extension codes) and every persistent id is refused with :class:`UnsafePickleError` naming the file and the
refused ``module.name``; nothing in the file is executed. A callable can only reach the ``REDUCE``/``NEWOBJ``/``OBJ``
opcodes through ``find_class``, so refusing globals is enough.

Python-2 pickles: ``refs(*).p`` were written by Python 2, whose byte strings (``str``) arrive as pickle
``STRING``/``BINSTRING`` opcodes. They are decoded as UTF-8 and, where that fails, as Latin-1 (which never
fails), so ASCII/UTF-8 text comes back as ``str`` without mojibake. Python-2 ``unicode`` and Python-3 ``str`` load
as ``str``; Python-3 ``bytes`` (protocol >= 3) stay ``bytes``.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any

_PY2_TEXT_CODEC = "clocpy2text"


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks for a global (class/function) or a persistent id, or that is not a valid pickle."""


def _decode_py2_text(data: bytes | memoryview, errors: str = "strict") -> tuple[str, int]:
    raw = bytes(data)
    try:
        return raw.decode("utf-8"), len(raw)
    except UnicodeDecodeError:
        return raw.decode("latin-1"), len(raw)


def _search_codec(name: str) -> codecs.CodecInfo | None:
    if name == _PY2_TEXT_CODEC:
        return codecs.CodecInfo(name=_PY2_TEXT_CODEC, encode=codecs.utf_8_encode, decode=_decode_py2_text)
    return None


codecs.register(_search_codec)


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global and persistent id; names the file in the error."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding=_PY2_TEXT_CODEC, errors="strict")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self._path}: refused to load global '{module}.{name}': only plain containers and scalars "
            "(dict, list, tuple, str, bytes, int, float, bool, None) are allowed in annotation pickles"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused persistent id {pid!r} (not allowed in annotation pickles)")


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load ``path`` with the restricted unpickler (see the module docstring for what is admitted).

    Raises :class:`FileNotFoundError` when the file is missing and :class:`UnsafePickleError` (a
    ``pickle.UnpicklingError``) when it refers to any global or is not a valid pickle; both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pickle file not found")
    with open(path, "rb") as handle:
        try:
            return _RestrictedUnpickler(handle, str(path)).load()
        except UnsafePickleError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            OverflowError,
            RecursionError,
        ) as error:
            raise UnsafePickleError(
                f"{path}: not a valid plain-data pickle ({type(error).__name__}: {error})"
            ) from error


__all__ = ["UnsafePickleError", "safe_load_pickle"]
