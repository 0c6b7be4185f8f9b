"""The README's settings table, generated from `Settings` so the two cannot drift apart.

`qwen-stack dev settings-table` prints it; tests/backend/devtools/test_settings_doc.py checks that
README.md holds exactly this text between its markers.
"""

from __future__ import annotations

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from backend.config import (
    DEV_ADMIN_PASSWORD,
    DEV_AUDIT_HMAC_KEY,
    DEV_AUTH_SECRET,
    DEV_RAG_TOKEN,
    Settings,
)

BEGIN = "<!-- settings-table:begin -->"
END = "<!-- settings-table:end -->"
DEV_SECRETS = {DEV_AUTH_SECRET, DEV_ADMIN_PASSWORD, DEV_RAG_TOKEN, DEV_AUDIT_HMAC_KEY}


def _default(field: FieldInfo) -> str:
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return "(dev default)" if secret in DEV_SECRETS else f"`{secret}`"
    if value is None:
        return "(unset)"
    if value == "":
        return "(empty)"
    if isinstance(value, list) and not value:
        return "[]"
    return f"`{value}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, f"{prefix}{name.upper()}__"))
            continue
        doc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name.upper()}` | {_default(field)} | {doc} |")
    return rows


def settings_table() -> str:
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines.extend(_rows(Settings, "QWEN_"))
    return "\n".join(lines)
