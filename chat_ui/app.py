"""Chainlit handlers: translate UI events into one backend call each and render the result.

Loaded by Chainlit as a file (see chat_ui/server.py); the backend objects come from
`chat_ui.runtime.current()`. Every handler catches errors: Chainlit only logs exceptions, so an
uncaught one would leave the user with a silent spinner; users get `user_message`, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import chainlit as cl
from chainlit.input_widget import InputWidget, Select
from chainlit.types import ThreadDict
from starlette.datastructures import Headers

from backend.audit import CLIENT_DISCONNECTED
from backend.chat.events import (
    Cited,
    Done,
    Notice,
    NoticeKind,
    Outcome,
    Queued,
    Retrieved,
    SentimentLabel,
    Token,
)
from backend.chat.grounding import Knowledge
from backend.chat.history import History
from backend.chat.pacing import paced
from backend.chat.pipeline import Turn
from backend.config import exported_login
from backend.errors import AuthError, QwenStackError, RateLimited
from backend.serving.engine import Message
from chat_ui import knowledge, runtime, sso
from chat_ui.data_layer import PostgresDataLayer
from chat_ui.drain import DRAINING_NOTICE

logger = logging.getLogger("chat_ui.app")

GENERIC_ERROR = "抱歉，服务出现意外错误，请稍后再试。"
SYSTEM_AUTHOR = "系统"
STREAM_CHOICES = {"自动": None, "开": True, "关": False}

STARTERS_ZH = [
    ("自我介绍", "你好！请用三句话介绍一下你自己。"),
    ("写一首诗", "写一首关于杭州西湖春天的七言绝句。"),
    ("解释概念", "用通俗的语言解释什么是大语言模型的“上下文窗口”。"),
    ("翻译", "把这句话翻译成英文：知识就是力量，但实践出真知。"),
]
STARTERS_EN = [
    ("Introduce", "Hi! Introduce yourself in three sentences."),
    ("Poem", "Write a short poem about West Lake in spring."),
    ("Explain", "Explain in plain words what an LLM context window is."),
    ("Translate", "Translate into Chinese: Knowledge is power."),
]


@cl.data_layer
def _data_layer() -> PostgresDataLayer:
    return runtime.current().data_layer


@cl.password_auth_callback
async def _login(username: str, password: str) -> cl.User | None:
    """Password login, throttled per name and per client address (failed attempts count)."""
    rt = runtime.current()
    ip = runtime.client_ip.get()
    try:
        await rt.logins.check(username, ip=ip)
        user = await rt.users.authenticate(username, password)
    except RateLimited as exc:
        logger.warning("login refused: %s", exc)
        return None
    except AuthError:
        with contextlib.suppress(QwenStackError):
            await rt.logins.failed(username, ip=ip)
        return None
    except QwenStackError:
        logger.exception("login failed on a backend error")
        return None
    with contextlib.suppress(QwenStackError):
        await rt.logins.succeeded(username)
    return cl.User(identifier=user.identifier, metadata={"role": user.role.value, "id": user.id})


async def _header_login(headers: Headers) -> cl.User | None:
    """Login by a trusted SSO proxy's headers (POST /chat/auth/header, which Chainlit's login page
    calls by itself); None refuses it. The client address comes from chat_ui.server's middleware."""
    auth = runtime.current().settings.auth
    return await _sign_in(
        sso.header_identity(headers, client_ip=runtime.client_ip.get(), auth=auth)
    )


async def _oidc_login(
    provider_id: str,
    token: str,
    raw_user_data: dict[str, Any],
    default_user: cl.User,
    id_token: str | None = None,
) -> cl.User | None:
    """Login by the OIDC provider's userinfo (after Chainlit's code exchange); None refuses it."""
    auth = runtime.current().settings.auth
    return await _sign_in(sso.oidc_identity(provider_id, raw_user_data, auth=auth))


async def _sign_in(identity: sso.Identity | None) -> cl.User | None:
    """The single sign-on account as Chainlit's user, shaped like `_login`'s; created on first
    login. None for no identity or one naming a password account."""
    if identity is None:
        return None
    try:
        user = await runtime.current().users.provision(
            identity.identifier, role=identity.role, sync_role=identity.sync_role
        )
    except AuthError as exc:
        logger.warning("single sign-on refused: %s", exc)
        return None
    return cl.User(identifier=user.identifier, metadata={"role": user.role.value, "id": user.id})


# Chainlit offers a login method exactly when its callback exists, and loads this file once, after
# export_chainlit_env: register only what the settings turn on (an idle header callback would make
# every visit to the login page show a failed login).
_sso = exported_login()
if _sso.header:
    cl.header_auth_callback(_header_login)
if _sso.oidc_provider is not None:
    sso.install_oidc_provider(name=_sso.oidc_provider)
    cl.oauth_callback(_oidc_login)


@cl.set_chat_profiles
async def _profiles(
    user: cl.User | None = None, language: str | None = None
) -> list[cl.ChatProfile]:
    return knowledge.profiles()


@cl.set_starters
async def _starters(user: cl.User | None = None, language: str | None = None) -> list[cl.Starter]:
    pairs = STARTERS_EN if (language or "").startswith("en") else STARTERS_ZH
    return [cl.Starter(label=label, message=message) for label, message in pairs]


async def _send_settings() -> None:
    widgets: list[InputWidget] = [
        Select(
            id="stream",
            label="流式输出（自动：短问题边生成边显示，长问题生成完再显示）",
            values=list(STREAM_CHOICES),
            initial_value="自动",
        )
    ]
    if knowledge.is_kb_chat():
        names = await _kb_names()
        widgets.append(
            Select(id="kb", label="知识库", values=[knowledge.ALL_KBS, *names],
                   initial_value=knowledge.ALL_KBS)
        )  # fmt: skip
    await cl.ChatSettings(widgets).send()


async def _kb_names() -> list[str]:
    try:
        kbs = await runtime.current().rag.list_kbs(user=_user_id())
    except QwenStackError as exc:
        logger.warning("could not list knowledge bases: %s", exc)
        return []
    return [kb.name for kb in kbs]


def _user_id() -> str:
    user = cl.user_session.get("user")
    return str(user.identifier) if user else ""


def _chosen_kbs() -> list[str] | None:
    chosen = cl.user_session.get("kb")
    return None if not chosen or chosen == knowledge.ALL_KBS else [str(chosen)]


async def _upload_target() -> str:
    """The knowledge base an admin's upload goes to: the chosen one, else the first one they may
    write, else a new 默认知识库."""
    chosen = _chosen_kbs()
    if chosen:
        return chosen[0]
    rag = runtime.current().rag
    writable = [kb for kb in await rag.list_kbs(user=_user_id()) if kb.writable]
    if writable:
        return writable[0].name
    await rag.create_kb("默认知识库", user=_user_id())
    return "默认知识库"


@cl.action_callback(knowledge.UPLOAD_ACTION)
async def _upload(action: cl.Action) -> None:
    async def flow() -> None:
        rt = runtime.current()
        await knowledge.upload_flow(
            rt.rag, user=_user_id(), kb=await _upload_target(),
            max_size_mb=rt.settings.rag.max_file_mb,
        )  # fmt: skip

    try:
        await knowledge.safe("upload", flow())
    finally:
        # The file ask restarts the UI's "running" state when answered; action callbacks are not
        # tasks, so nothing else would end it and the input would stay blocked.
        await cl.context.emitter.task_end()


@cl.action_callback(knowledge.LIST_ACTION)
async def _list(action: cl.Action) -> None:
    async def flow() -> None:
        await knowledge.list_flow(runtime.current().rag, user=_user_id(), kb=await _upload_target())

    await knowledge.safe("list documents", flow())


@cl.action_callback(knowledge.DELETE_ACTION)
async def _delete(action: cl.Action) -> None:
    kb, document_id = str(action.payload.get("kb")), str(action.payload.get("id"))
    await knowledge.safe(
        "delete document",
        knowledge.delete_flow(
            runtime.current().rag, user=_user_id(), kb=kb, document_id=document_id
        ),
    )


@cl.on_chat_start
async def _start() -> None:
    if runtime.current().drain.draining:  # shutting down: no new sessions here
        await cl.ErrorMessage(content=DRAINING_NOTICE, author=SYSTEM_AUTHOR).send()
        return
    await _send_settings()
    if knowledge.is_kb_chat():
        manage = knowledge.may_manage(cl.user_session.get("user"))
        await knowledge.intro(await _kb_names(), manage=manage)
    try:  # take a slot and warm the replica's prefix cache before the first message
        await runtime.current().pipeline.prepare(cl.context.session.thread_id)
    except QwenStackError as exc:
        logger.warning("could not prepare a session slot: %s", exc)


@cl.on_settings_update
async def _settings(settings: dict[str, Any]) -> None:
    cl.user_session.set("stream", STREAM_CHOICES.get(str(settings.get("stream"))))
    if "kb" in settings:
        cl.user_session.set("kb", settings.get("kb"))


@cl.on_chat_end
async def _end() -> None:
    """The browser went away (closed, new chat, or a network blip): stop the answer so the
    engine stops generating for nobody, and free the session slot. A resumed thread takes a
    slot again on its next message."""
    task = cl.context.session.current_task
    if task is not None and not task.done():
        task.cancel(CLIENT_DISCONNECTED)
    try:
        await runtime.current().pipeline.release(cl.context.session.thread_id)
    except QwenStackError as exc:
        logger.warning("could not release the session slot: %s", exc)


@cl.on_chat_resume
async def _resume(thread: ThreadDict) -> None:
    """Rebuild the model's context from the persisted thread if Redis no longer holds it."""
    await _send_settings()
    history: History = runtime.current().history
    try:
        if await history.load(thread["id"]):
            return
        await history.restore(thread["id"], messages_of(thread))
    except QwenStackError as exc:
        await cl.Message(content=exc.user_message, author=SYSTEM_AUTHOR).send()


def messages_of(thread: ThreadDict) -> list[Message]:
    """The user/assistant exchange of a persisted Chainlit thread, oldest first."""
    roles = {"user_message": "user", "assistant_message": "assistant"}
    return [
        Message(role=roles[step["type"]], content=step.get("output") or "")
        for step in thread.get("steps", [])
        if step.get("type") in roles and step.get("output")
    ]


@cl.on_message
async def _message(message: cl.Message) -> None:
    task = asyncio.current_task()
    assert task is not None  # Chainlit runs each message in a task of its own
    if not runtime.current().drain.admit(task):  # shutting down (SIGTERM): retry elsewhere
        await cl.ErrorMessage(content=DRAINING_NOTICE, author=SYSTEM_AUTHOR).send()
        return
    turn = Turn(
        thread_id=cl.context.session.thread_id,
        text=message.content,
        stream=cl.user_session.get("stream"),
        user=_user_id(),
        knowledge=Knowledge(kbs=tuple(kbs) if (kbs := _chosen_kbs()) else None)
        if knowledge.is_kb_chat()
        else None,
    )
    reply = cl.Message(content="")
    queue_note: cl.Message | None = None
    done: Done | None = None
    try:
        current = runtime.current()
        smooth_s = current.settings.ui.smooth_stream_ms / 1000
        async for event in paced(current.pipeline.answer(turn), max_delay_s=smooth_s):
            if isinstance(event, Token):
                await reply.stream_token(event.text)
            elif isinstance(event, Queued):
                p = event.position
                text = f"排队中：您前面还有 {p.position - 1} 位，预计等待约 {p.eta_s:.0f} 秒。"
                if queue_note is None:
                    queue_note = cl.Message(content=text, author=SYSTEM_AUTHOR)
                    await queue_note.send()
                else:
                    queue_note.content = text
                    await queue_note.update()
            elif isinstance(event, Retrieved):
                async with cl.Step(name="知识库检索", type="retrieval") as step:
                    step.output = knowledge.retrieval_summary(event.sources, event.seconds)
            elif isinstance(event, Cited):
                line, elements = knowledge.source_elements(event.sources, list(event.cited))
                if line:
                    await reply.stream_token(line)
                    reply.elements = elements  # type: ignore[assignment]
            elif isinstance(event, SentimentLabel):
                async with cl.Step(name=f"情感：{event.label.value}", type="tool") as step:
                    step.output = event.label.value
            elif isinstance(event, Notice):
                if queue_note is not None:
                    await queue_note.remove()
                    queue_note = None
                if event.kind is NoticeKind.BLOCKED_OUTPUT:
                    reply.content = f"⚠️ {event.text}"  # the answer so far is replaced
                elif event.kind in (NoticeKind.BUSY, NoticeKind.BLOCKED_INPUT):
                    await cl.ErrorMessage(content=event.text, author=SYSTEM_AUTHOR).send()
                else:
                    await cl.Message(content=f"ℹ️ {event.text}", author=SYSTEM_AUTHOR).send()
            elif isinstance(event, Done):
                done = event
    except QwenStackError as exc:
        logger.warning("answer failed: %s: %s", type(exc).__name__, exc)
        await _show_error(reply, exc.user_message)
        return
    except Exception:
        logger.exception("answer failed unexpectedly")
        await _show_error(reply, GENERIC_ERROR)
        return
    finally:
        if queue_note is not None:
            await queue_note.remove()
    if reply.content:
        await reply.send()
    elif done is not None and done.outcome is not Outcome.REFUSED:
        await cl.Message(content="（模型没有返回内容）").send()


async def _show_error(reply: cl.Message, notice: str) -> None:
    if reply.content:  # part of an answer already streamed: keep it, add the notice
        await reply.stream_token(f"\n\n> ⚠️ {notice}")
        await reply.send()
    else:
        await cl.ErrorMessage(content=notice, author=SYSTEM_AUTHOR).send()
