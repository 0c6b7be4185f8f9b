"""Personal data: detection with checksums, and masking for audit records and logs."""

from __future__ import annotations

import pytest

from backend.guard import PiiKind, find_pii, mask_pii
from backend.guard.pii import luhn_valid, valid_resident_id

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def _resident_id(first17: str) -> str:
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return first17 + "10X98765432"[total % 11]


ID = _resident_id("11010519491231002")  # the standard's example: check character X
CARD = "6222020200112233445"  # 19 digits
CARD = CARD[:-1] + next(d for d in "0123456789" if luhn_valid(CARD[:-1] + d))


def _kinds(text: str) -> list[PiiKind]:
    return [match.kind for match in find_pii(text)]


def test_standard_example_id_ends_in_x() -> None:
    assert ID == "11010519491231002X"


def test_finds_each_kind() -> None:
    text = f"身份证{ID}，手机13812345678，卡号{CARD}，邮箱zhang.san@example.com。"
    assert _kinds(text) == [PiiKind.RESIDENT_ID, PiiKind.MOBILE, PiiKind.BANK_CARD, PiiKind.EMAIL]


def test_spans_point_at_the_data() -> None:
    text = f"号码：{ID}。"
    (match,) = find_pii(text)
    assert text[match.span[0] : match.span[1]] == ID


@pytest.mark.parametrize(
    "number",
    [
        ID[:-1] + "1",  # wrong check character
        _resident_id("11010519491331002"),  # month 13
        _resident_id("11010518000101002"),  # before 1900
    ],
)
def test_invalid_resident_id_is_not_an_id(number: str) -> None:
    assert not valid_resident_id(number)
    assert PiiKind.RESIDENT_ID not in _kinds(f"证件{number}")


def test_lowercase_check_character_is_valid() -> None:
    assert valid_resident_id(ID.lower())


@pytest.mark.parametrize(
    "text",
    ["13812345678", "+86 138 1234 5678", "0086-138-1234-5678", "１３８１２３４５６７８"],
)
def test_mobile_formats(text: str) -> None:
    assert _kinds(f"电话{text}。") == [PiiKind.MOBILE]


@pytest.mark.parametrize("text", ["12812345678", "1381234567", "订单2013812345678999"])
def test_not_a_mobile(text: str) -> None:
    assert PiiKind.MOBILE not in _kinds(text)


def test_card_with_spaces() -> None:
    spaced = " ".join(CARD[i : i + 4] for i in range(0, len(CARD), 4))
    assert _kinds(f"卡号 {spaced}") == [PiiKind.BANK_CARD]


def test_card_failing_luhn_is_not_a_card() -> None:
    wrong = CARD[:-1] + str((int(CARD[-1]) + 1) % 10)
    assert PiiKind.BANK_CARD not in _kinds(f"卡号{wrong}")


def test_luhn_reference_number() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_fifteen_digits_is_not_a_card() -> None:
    assert find_pii("编号 411111111111111") == []


def test_mask_keeps_only_enough_to_tell_apart() -> None:
    text = f"{ID} 13812345678 {CARD} zhang.san@example.com"
    masked = mask_pii(text)
    assert masked == (
        f"110***********002X 138****5678 {'*' * (len(CARD) - 4)}{CARD[-4:]} z***@example.com"
    )


def test_mask_keeps_separators_and_prefix() -> None:
    assert mask_pii("+86 138-1234-5678") == "+86 138-****-5678"


def test_mask_without_pii_is_identity() -> None:
    assert mask_pii("今天是2024年5月1日，气温25度。") == "今天是2024年5月1日，气温25度。"
