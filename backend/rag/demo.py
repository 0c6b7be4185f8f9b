"""The demo knowledge base that `qwen-stack up --demo` loads: a few short Chinese documents written
for this project (company policies, a product manual; all fictional), in several formats."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from backend.errors import KnowledgeBaseNotFound
from backend.rag.client import RagClient
from backend.rag.schemas import UploadOut

DEMO_KB = "演示知识库"
DEMO_DESCRIPTION = "星河科技（虚构公司）的员工手册、差旅报销制度、信息安全规范和会议平板使用手册"

# Questions the demo documents answer; the chat UI offers them as starters in the knowledge-base
# profile (label, message).
DEMO_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("年假规定", "工龄 12 年的员工每年有几天年假？没休完可以顺延吗？"),
    ("出差住宿标准", "去上海出差，住宿每晚最多可以报销多少钱？"),
    ("投屏卡顿", "会议平板投屏时画面卡顿怎么办？"),
    ("密码要求", "公司对账号密码有什么要求？"),
)


def demo_files() -> list[Path]:
    folder = resources.files("backend.rag") / "demo"
    return sorted(Path(str(folder / p.name)) for p in folder.iterdir() if p.is_file())


async def load_demo(client: RagClient, *, user: str) -> list[UploadOut]:
    """Create the demo knowledge base if missing and upload its files (already present files are
    reported as duplicates). Indexing goes on in the worker after this returns."""
    try:
        await client.list_documents(DEMO_KB, user=user)
    except KnowledgeBaseNotFound:
        await client.create_kb(DEMO_KB, user=user, description=DEMO_DESCRIPTION, public=True)
    return await client.upload_paths(DEMO_KB, demo_files(), user=user)
