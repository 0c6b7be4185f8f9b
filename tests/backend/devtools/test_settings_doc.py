from pathlib import Path

from backend.devtools.settings_doc import BEGIN, END, settings_table

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_table_matches_settings() -> None:
    text = README.read_text(encoding="utf-8")
    table = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == settings_table()


def test_table_lists_nested_variables() -> None:
    assert "| `QWEN_LLM__BASE_URL` |" in settings_table()


def test_table_hides_dev_secrets() -> None:
    assert "admin123" not in settings_table()
