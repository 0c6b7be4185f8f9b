"""Personal data in text: mainland resident IDs, mobile numbers, bank cards, e-mail addresses.

`mask_pii` is for audit records and logs (and, optionally, answers): it keeps just enough to tell
numbers apart (138****5678, 110***********123X, **** **** **** 0018, z***@example.com). Detection
is strict where a checksum exists, so ordinary numbers are not masked: resident IDs must carry a
valid date and the GB 11643 check character; bank cards must pass the Luhn check. Full-width
digits count as digits. Pure functions, safe from any thread.
"""

from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass

_MASK = "*"
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_FULL_WIDTH_DIGITS = str.maketrans("０１２３４５６７８９Ｘｘ", "0123456789Xx")

# Lookarounds keep a match from starting or ending inside a longer run of digits (or letters).
_RESIDENT_ID = re.compile(r"(?<![0-9A-Za-z])\d{17}[0-9Xx](?![0-9A-Za-z])", re.ASCII)
_BANK_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){15,18}(?![\d-])", re.ASCII)
_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)", re.ASCII)
_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", re.ASCII
)


class PiiKind(enum.StrEnum):
    RESIDENT_ID = "resident_id"
    BANK_CARD = "bank_card"
    MOBILE = "mobile"
    EMAIL = "email"


@dataclass(frozen=True)
class PiiMatch:
    kind: PiiKind
    span: tuple[int, int]  # [start, end) in the text


def find_pii(text: str) -> list[PiiMatch]:
    """Personal data in `text`, sorted by position, without overlaps (an ID wins over a card
    number that happens to pass Luhn, a card over a mobile number inside it)."""
    digits = text.translate(_FULL_WIDTH_DIGITS)  # same length: spans stay valid
    found: list[PiiMatch] = []
    taken: list[tuple[int, int]] = []
    candidates = (
        (PiiKind.RESIDENT_ID, _RESIDENT_ID, valid_resident_id),
        (PiiKind.BANK_CARD, _BANK_CARD, _valid_card),
        (PiiKind.MOBILE, _MOBILE, None),
        (PiiKind.EMAIL, _EMAIL, None),
    )
    for kind, pattern, valid in candidates:
        for match in pattern.finditer(digits):
            span = match.span()
            if valid is not None and not valid(match[0]):
                continue
            if any(start < span[1] and span[0] < end for start, end in taken):
                continue
            taken.append(span)
            found.append(PiiMatch(kind, span))
    return sorted(found, key=lambda match: match.span)


def mask_pii(text: str) -> str:
    """`text` with personal data masked by `*` (see the module docstring for what is kept)."""
    pieces, position = [], 0
    for match in find_pii(text):
        start, end = match.span
        pieces += [text[position:start], _masked(match.kind, text[start:end])]
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def valid_resident_id(number: str) -> bool:
    """An 18-character mainland resident ID with a real birth date and the right check character
    (GB 11643-1999, ISO 7064 MOD 11-2). Accepts full-width digits."""
    number = number.translate(_FULL_WIDTH_DIGITS).upper()
    if len(number) != 18 or not number[:17].isdigit() or not number[:17].isascii():
        return False
    try:
        born = datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if born.year < 1900:
        return False
    total = sum(int(digit) * weight for digit, weight in zip(number, _ID_WEIGHTS, strict=False))
    return _ID_CHECK[total % 11] == number[17]


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum over a string of ASCII digits (no separators)."""
    if not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _valid_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return 16 <= len(digits) <= 19 and luhn_valid(digits)


def _masked(kind: PiiKind, value: str) -> str:
    if kind is PiiKind.EMAIL:
        local, _, domain = value.partition("@")
        return f"{local[0]}***@{domain}"
    positions = [i for i, char in enumerate(value.translate(_FULL_WIDTH_DIGITS)) if char.isalnum()]
    if kind is PiiKind.MOBILE:
        positions = positions[-11:]  # the national number, after any +86
        keep = set(positions[:3] + positions[-4:])
    elif kind is PiiKind.RESIDENT_ID:
        keep = set(positions[:3] + positions[-4:])
    else:
        keep = set(positions[-4:])
    hidden = set(positions) - keep
    return "".join(_MASK if i in hidden else char for i, char in enumerate(value))
