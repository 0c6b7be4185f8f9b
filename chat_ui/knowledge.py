"""The knowledge-base side of the chat UI: the profile, sources beside answers, and the admin flow
(upload, watch each file reach `indexed` or a clear error, list and delete documents).

Every knowledge-base action goes to the RAG worker, which checks the acting user's role itself; the
buttons here are only shown to kb_admin and admin, the worker refuses everyone else anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path

import chainlit as cl

from backend.auth import Role
from backend.chat.grounding import Sources
from backend.chat.markdown import sanitize
from backend.errors import QwenStackError
from backend.rag.client import RagClient
from backend.rag.demo import DEMO_QUESTIONS
from backend.rag.document import DocumentStatus, Hit
from backend.rag.schemas import DocumentOut

logger = logging.getLogger(__name__)

CHAT_PROFILE = "通用对话"
KB_PROFILE = "知识库问答"
UPLOAD_ACTION = "kb_upload"
LIST_ACTION = "kb_list"
DELETE_ACTION = "kb_delete"
ALL_KBS = "全部知识库"
ACCEPT = {
    "application/pdf": [".pdf"],
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": [".docx"],
    "text/plain": [".txt"],
    "text/markdown": [".md", ".markdown"],
    "text/html": [".html", ".htm"],
}
POLL_S = 1.0
WATCH_LIMIT_S = 1800.0
STATUS_ZH = {
    DocumentStatus.QUEUED: "排队中",
    DocumentStatus.PROCESSING: "处理中",
    DocumentStatus.INDEXED: "已入库",
    DocumentStatus.FAILED: "失败",
}


def profiles() -> list[cl.ChatProfile]:
    return [
        cl.ChatProfile(
            name=CHAT_PROFILE, markdown_description="与 Qwen 自由对话。", default=True,
        ),
        cl.ChatProfile(
            name=KB_PROFILE,
            markdown_description="依据知识库中的文档回答，并标注来源；资料里没有的会回答“我不知道”。",
            starters=[cl.Starter(label=label, message=text) for label, text in DEMO_QUESTIONS],
        ),
    ]  # fmt: skip


def is_kb_chat() -> bool:
    return bool(cl.user_session.get("chat_profile") == KB_PROFILE)


def role_of(user: cl.User | cl.PersistedUser | None) -> Role:
    try:
        return Role(str((user.metadata or {}).get("role"))) if user else Role.USER
    except ValueError:
        return Role.USER


def may_manage(user: cl.User | cl.PersistedUser | None) -> bool:
    return role_of(user) in (Role.KB_ADMIN, Role.ADMIN)


async def intro(kbs: list[str], *, manage: bool) -> None:
    """Name the knowledge bases this user can ask about; offer the document actions to kb_admin
    and admin only (the worker enforces the role regardless)."""
    names = "、".join(f"「{name}」" for name in kbs) or "（暂无，请联系管理员上传文档）"
    content = f"可以提问的知识库：{names}。回答会标注来源，资料中没有的会回答“我不知道”。"
    actions = []
    if manage:
        content += "\n你可以上传文档，或查看、删除已有文档。"
        actions = [
            cl.Action(name=UPLOAD_ACTION, label="上传文档", payload={}),
            cl.Action(name=LIST_ACTION, label="文档列表", payload={}),
        ]
    await cl.Message(content=content, actions=actions, author="知识库").send()


async def upload_flow(client: RagClient, *, user: str, kb: str, max_size_mb: float) -> None:
    # Inside a step: the ask then has a parent id, which the browser sends back with the file and
    # Chainlit needs to find the ask's limits (an ask without one is refused as a spontaneous
    # upload, which stays disabled).
    async with cl.Step(name="上传文档", type="tool", show_input=False):
        answer = await cl.AskFileMessage(
            content=(
                f"请选择要上传到「{kb}」的文件（PDF、DOCX、TXT、Markdown、HTML；"
                f"单个不超过 {max_size_mb:g} MB，一次最多 10 个）。"
            ),
            accept=ACCEPT, max_size_mb=max_size_mb, max_files=10, timeout=600, author="知识库",
        ).send()  # fmt: skip
    if not answer:
        return
    files = []
    for item in answer:
        path = Path(item.path)
        files.append((item.name, await asyncio.to_thread(path.read_bytes)))
        await asyncio.to_thread(path.unlink, missing_ok=True)  # the worker keeps its own copy
    results = await client.upload(kb, files, user=user)
    lines = {}
    watch = []
    for r in results:
        if not r.accepted or r.document is None:
            lines[r.filename] = f"【失败】{r.filename}：{r.message}"
        elif r.duplicate:
            lines[r.filename] = (
                f"【重复】{r.filename}：知识库中已有相同内容的文件（{_status(r.document)}）"
            )
        else:
            lines[r.filename] = f"【{_status(r.document)}】{r.filename}"
            watch.append(r.document)
    progress = cl.Message(content="\n".join(lines.values()), author="知识库")
    await progress.send()
    deadline = asyncio.get_running_loop().time() + WATCH_LIMIT_S
    while watch and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(POLL_S)
        still = []
        for doc in watch:
            now = await client.job(doc.id, user=user)
            lines[doc.filename] = _line(now)
            if now.status not in (DocumentStatus.INDEXED, DocumentStatus.FAILED):
                still.append(now)
        watch = still
        progress.content = "\n".join(lines.values())
        await progress.update()


def _status(doc: DocumentOut) -> str:
    text = STATUS_ZH[doc.status]
    if doc.status is DocumentStatus.PROCESSING:
        text += f" {doc.progress:.0%}"
    return text


def _line(doc: DocumentOut) -> str:
    if doc.status is DocumentStatus.INDEXED:
        flags = ""
        if doc.guard_flagged_chunks:  # indexed all the same; retrieval withholds blocked chunks
            categories = "、".join(doc.guard_categories)
            flags = f"；其中 {doc.guard_flagged_chunks} 个含敏感内容：{categories}"
        return f"【已入库】{doc.filename}（{doc.chunk_count} 个片段{flags}）"
    if doc.status is DocumentStatus.FAILED:
        return f"【失败】{doc.filename}：{doc.error or '处理失败'}"
    return f"【{_status(doc)}】{doc.filename}"


async def list_flow(client: RagClient, *, user: str, kb: str) -> None:
    docs = await client.list_documents(kb, user=user)
    if not docs:
        await cl.Message(content=f"「{kb}」中还没有文档。", author="知识库").send()
        return
    actions = [
        cl.Action(name=DELETE_ACTION, label=f"删除 {d.filename}", payload={"kb": kb, "id": d.id})
        for d in docs
    ]
    body = "\n".join(_line(d) for d in docs)
    await cl.Message(content=f"「{kb}」中的文档：\n{body}", actions=actions, author="知识库").send()


async def delete_flow(client: RagClient, *, user: str, kb: str, document_id: str) -> None:
    await client.delete_document(kb, document_id, user=user)
    await cl.Message(content="文档已删除。", author="知识库").send()


def source_elements(sources: Sources, cited: list[int]) -> tuple[str, list[cl.Text]]:
    """The sources line under an answer and one side element per source; sources the answer cited
    come first. Element names appear in the line, so Chainlit links them."""
    if not sources.hits:
        return "", []
    order = [n for n in cited if sources.number_of(n)] + [
        n for n in range(1, len(sources.hits) + 1) if n not in cited
    ]
    names, elements = [], []
    for n in order:
        hit = sources.number_of(n)
        assert hit is not None
        name = f"来源{n}"
        names.append(f"{name}《{sanitize(hit.document_name)}》{_where(hit)}")
        elements.append(cl.Text(name=name, content=_passage(hit), display="side"))
    return "\n\n**参考资料**：" + "；".join(names), elements


def retrieval_summary(sources: Sources, seconds: float) -> str:
    """The retrieval step's text: what was found, in order."""
    if not sources.hits:
        return f"没有找到相关资料（{seconds * 1000:.0f} 毫秒）。"
    lines = [f"找到 {len(sources.hits)} 段资料（{seconds * 1000:.0f} 毫秒）："]
    lines += [f"{n}. 《{hit.document_name}》{_where(hit)}" for n, hit in enumerate(sources.hits, 1)]
    if sources.dropped:
        lines.append(f"另有 {sources.dropped} 段因包含不允许的内容未使用。")
    return "\n".join(lines)


def _where(hit: Hit) -> str:
    parts = []
    if hit.page_start:
        parts.append(f"第{hit.page_start}页")
    if hit.heading:
        parts.append(sanitize(hit.heading))
    return f"（{'，'.join(parts)}）" if parts else ""


def _passage(hit: Hit) -> str:
    """A source as shown beside the answer. Documents are outside text too: their Markdown is
    sanitized like answers (no images, no non-http links)."""
    name = sanitize(hit.document_name)
    head = f"**{name}**{_where(hit)}　字符 {hit.char_start}–{hit.char_end}\n\n"
    return head + sanitize(hit.text)


async def safe(action: str, work: Awaitable[None]) -> None:
    """Run one admin flow; errors become a Chinese message, never a traceback."""
    try:
        await work
    except QwenStackError as exc:
        logger.warning("%s failed: %s", action, exc)
        await cl.ErrorMessage(content=exc.user_message, author="知识库").send()
