"""Lexicon files: format, validation, folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.errors import LexiconError
from backend.guard.lexicon import Entry, Lexicon, Severity, parse_allow, parse_entries


def test_parses_entries_and_skips_comments() -> None:
    text = "# header\n\n赌博\t赌博\tflag\n大麻\t违禁品\tflag\tword\n"
    assert parse_entries(text, source="x.tsv") == [
        Entry("赌博", "赌博", Severity.FLAG),
        Entry("大麻", "违禁品", Severity.FLAG, whole_word=True),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "赌博\t赌博",  # too few fields
        "赌博\t赌博\tforbid",  # unknown severity
        "赌博\t\tblock",  # empty category
        "赌博\t赌博\tblock\tword",  # `word` only for flag
        "赌博\t赌博\tflag\tphrase",  # unknown option
        "【】\t符号\tblock",  # nothing left after normalisation
    ],
)
def test_rejects_malformed_line(line: str) -> None:
    with pytest.raises(LexiconError, match=r"x\.tsv:2"):
        parse_entries("# ok\n" + line, source="x.tsv")


def test_allow_list_lines() -> None:
    assert parse_allow("# c\n微信支付\n  反洗钱 \n", source="a.allow") == ["微信支付", "反洗钱"]


def test_loads_folder(tmp_path: Path) -> None:
    (tmp_path / "a.tsv").write_text("赌博\t赌博\tflag\n", encoding="utf-8")
    (tmp_path / "b.tsv").write_text("枪支\t违禁品\tblock\n", encoding="utf-8")
    (tmp_path / "ok.allow").write_text("枪支管理法\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("ignored", encoding="utf-8")
    lexicon = Lexicon.load(tmp_path)
    assert [e.word for e in lexicon.entries] == ["赌博", "枪支"]
    assert lexicon.allow == ("枪支管理法",)


def test_loads_single_file(tmp_path: Path) -> None:
    file = tmp_path / "one.tsv"
    file.write_text("赌博\t赌博\tflag\n", encoding="utf-8")
    assert len(Lexicon.load(file).entries) == 1


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(LexiconError, match="does not exist"):
        Lexicon.load(tmp_path / "missing")


def test_folder_without_entries_raises(tmp_path: Path) -> None:
    (tmp_path / "only.allow").write_text("微信支付\n", encoding="utf-8")
    with pytest.raises(LexiconError, match="no entries"):
        Lexicon.load(tmp_path)


def test_wrong_file_suffix_raises(tmp_path: Path) -> None:
    file = tmp_path / "words.csv"
    file.write_text("赌博,赌博,flag\n", encoding="utf-8")
    with pytest.raises(LexiconError, match="must end in"):
        Lexicon.load(file)


def test_undecodable_file_raises(tmp_path: Path) -> None:
    (tmp_path / "gbk.tsv").write_bytes("赌博\t赌博\tflag\n".encode("gbk"))
    with pytest.raises(LexiconError, match="cannot read"):
        Lexicon.load(tmp_path)


def test_builtin_sample_has_every_category(sample_lexicon: Lexicon) -> None:
    categories = {entry.category for entry in sample_lexicon.entries}
    assert categories == {"广告引流", "赌博", "违禁品", "诈骗", "色情"}
    assert "微信支付" in sample_lexicon.allow
