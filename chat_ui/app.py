"""Chainlit handlers: translate UI events into one backend call each and render the result.

Loaded by Chainlit as a file (see chat_ui/server.py); the backend objects come from
`chat_ui.runtime.current()`. Every handler catches errors: Chainlit only logs exceptions, so an
uncaught one would leave the user with a silent spinner; users get `user_message`, never a traceback.
"""

from __future__ import annotations

import logging

import chainlit as cl
from chainlit.types import ThreadDict

from backend.chat.history import History
from backend.errors import AuthError, QwenStackError
from backend.serving.engine import Message
from chat_ui import runtime
from chat_ui.data_layer import PostgresDataLayer

logger = logging.getLogger("chat_ui.app")

GENERIC_ERROR = "抱歉，服务出现意外错误，请稍后再试。"

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
    try:
        user = await runtime.current().users.authenticate(username, password)
    except AuthError:
        return None
    except QwenStackError:
        logger.exception("login failed on a backend error")
        return None
    return cl.User(identifier=user.identifier, metadata={"role": user.role.value, "id": user.id})


@cl.set_starters
async def _starters(user: cl.User | None = None, language: str | None = None) -> list[cl.Starter]:
    pairs = STARTERS_EN if (language or "").startswith("en") else STARTERS_ZH
    return [cl.Starter(label=label, message=message) for label, message in pairs]


@cl.on_chat_start
async def _start() -> None:
    logger.debug("chat started in thread %s", cl.context.session.thread_id)


@cl.on_chat_resume
async def _resume(thread: ThreadDict) -> None:
    """Rebuild the model's context from the persisted thread if Redis no longer holds it."""
    history: History = runtime.current().history
    try:
        if await history.load(thread["id"]):
            return
        await history.restore(thread["id"], messages_of(thread))
    except QwenStackError as exc:
        await cl.Message(content=exc.user_message, author="系统").send()


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
    thread_id = cl.context.session.thread_id
    reply = cl.Message(content="")
    try:
        async for delta in runtime.current().pipeline.answer(thread_id, message.content):
            await reply.stream_token(delta)
    except QwenStackError as exc:
        logger.warning("answer failed: %s: %s", type(exc).__name__, exc)
        await _show_error(reply, exc.user_message)
        return
    except Exception:
        logger.exception("answer failed unexpectedly")
        await _show_error(reply, GENERIC_ERROR)
        return
    if not reply.content:
        reply.content = "（模型没有返回内容）"
    await reply.send()


async def _show_error(reply: cl.Message, notice: str) -> None:
    if reply.content:  # part of an answer already streamed: keep it, add the notice
        await reply.stream_token(f"\n\n> ⚠️ {notice}")
        await reply.send()
    else:
        await cl.ErrorMessage(content=notice, author="系统").send()
