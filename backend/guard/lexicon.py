"""Lexicon files: sensitive words with a category and a severity, and allow-lists.

A lexicon is a folder (or a single `.tsv` file) holding:

- `*.tsv`: one entry per line, fields separated by a TAB:
  `word<TAB>category<TAB>severity[<TAB>word]`. Severity is `block` (the text is refused / the
  answer stopped), `mask` (the word is replaced by ＊) or `flag` (recorded only). A fourth field
  `word` means "only where jieba segments it as a word of its own" (e.g. 大麻 in 吸大麻, not in
  大麻烦); this is allowed for `flag` entries only, because the stream filter cannot wait for
  segmentation context.
- `*.allow`: one benign superstring per line (微信支付). Where an allow-list entry covers a match,
  the longer, benign reading wins and the match is dropped.

Blank lines and lines starting with `#` are ignored; other files in the folder are ignored.
Words are written in any form (traditional, full width, mixed case): they are normalised exactly as
texts are (`backend/guard/normalize.py`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from backend.errors import LexiconError
from backend.guard.normalize import normalize_word

ENTRY_SUFFIX = ".tsv"
ALLOW_SUFFIX = ".allow"
WHOLE_WORD = "word"


class Severity(enum.StrEnum):
    BLOCK = "block"
    MASK = "mask"
    FLAG = "flag"

    @property
    def rank(self) -> int:
        """Higher is stricter: block 3, mask 2, flag 1."""
        # by identity: hashing an enum member runs Python code, and verdicts rank every hit
        return 3 if self is Severity.BLOCK else 2 if self is Severity.MASK else 1


@dataclass(frozen=True)
class Entry:
    word: str  # as written in the file
    category: str
    severity: Severity
    whole_word: bool = False


@dataclass(frozen=True)
class Lexicon:
    entries: tuple[Entry, ...]
    allow: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> Lexicon:
        """Read a lexicon folder, or one `.tsv` file.

        Raises LexiconError when the path is missing or unreadable, a line is malformed, or the
        lexicon has no entry at all. Blocking file I/O: call it off the event loop for big folders.
        """
        entries: list[Entry] = []
        allow: list[str] = []
        for file in lexicon_files(path):
            text = _read(file)
            if file.suffix == ALLOW_SUFFIX:
                allow.extend(parse_allow(text, source=file.name))
            else:
                entries.extend(parse_entries(text, source=file.name))
        if not entries:
            raise LexiconError(f"lexicon {path} has no entries (*{ENTRY_SUFFIX} files)")
        return cls(tuple(entries), tuple(allow))


def builtin_lexicon_dir() -> Path:
    """The small sample lexicon shipped with the package."""
    return Path(__file__).resolve().parent / "lexicons"


def lexicon_files(path: Path) -> list[Path]:
    """The files that make up the lexicon at `path`, sorted; raises LexiconError if none can be."""
    if path.is_file():
        if path.suffix not in (ENTRY_SUFFIX, ALLOW_SUFFIX):
            raise LexiconError(f"lexicon file {path} must end in {ENTRY_SUFFIX} or {ALLOW_SUFFIX}")
        return [path]
    if not path.is_dir():
        raise LexiconError(f"lexicon {path} does not exist")
    return sorted(
        file
        for file in path.iterdir()
        if file.suffix in (ENTRY_SUFFIX, ALLOW_SUFFIX) and file.is_file()
    )


def parse_entries(text: str, *, source: str) -> list[Entry]:
    """Entries of one `.tsv` file; raises LexiconError naming `source` and the line number."""
    entries = []
    for number, line in _lines(text):
        fields = [field.strip() for field in line.split("\t")]
        where = f"{source}:{number}"
        if len(fields) not in (3, 4):
            raise LexiconError(f"{where}: expected word<TAB>category<TAB>severity[<TAB>word]")
        word, category, severity_name = fields[:3]
        try:
            severity = Severity(severity_name)
        except ValueError:
            raise LexiconError(f"{where}: severity must be block, mask or flag") from None
        whole_word = len(fields) == 4
        if whole_word and fields[3] != WHOLE_WORD:
            raise LexiconError(f"{where}: the fourth field can only be `{WHOLE_WORD}`")
        if whole_word and severity is not Severity.FLAG:
            raise LexiconError(f"{where}: `{WHOLE_WORD}` entries must have severity flag")
        if not category:
            raise LexiconError(f"{where}: empty category")
        _check_word(word, where=where)
        entries.append(Entry(word, category, severity, whole_word))
    return entries


def parse_allow(text: str, *, source: str) -> list[str]:
    """Entries of one `.allow` file; raises LexiconError naming `source` and the line number."""
    words = []
    for number, line in _lines(text):
        word = line.strip()
        _check_word(word, where=f"{source}:{number}")
        words.append(word)
    return words


def _lines(text: str) -> list[tuple[int, str]]:
    return [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _check_word(word: str, *, where: str) -> None:
    if not normalize_word(word):
        raise LexiconError(f"{where}: {word!r} has no letters or digits left after normalisation")


def _read(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LexiconError(f"cannot read lexicon file {file}: {exc}") from exc
