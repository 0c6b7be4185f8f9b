"""The one error tree.

    QwenStackError                  base; `user_message` is safe to show (no paths, DSNs, tracebacks)
    ├── ConfigError                 settings are missing or inconsistent
    │   └── LexiconError            a guard lexicon file is missing or malformed (file:line)
    ├── ServiceError                an embedded or external service could not be started or reached
    │   ├── DatabaseUnavailable
    │   └── RedisUnavailable
    ├── ModelError                  a model file could not be found, downloaded or built
    │   └── ModelDownloadError      offline, or the hub refused; says how to use a local file
    ├── EngineError                 the LLM engine failed a request
    │   ├── EngineUnavailable       could not connect, or the engine answered 5xx
    │   │   └── EngineRestarting    ... and the supervisor says it is being restarted
    │   ├── EngineTimeout           connect / first-token / inter-token / total budget ran out
    │   │                           (`phase` tells which)
    │   └── EngineRejected          the engine refused the request (4xx): too long, bad parameters
    ├── AuthError                   bad credentials or a forbidden action
    │   ├── UserExists
    │   └── Forbidden               authenticated, but the role or grant does not allow it
    ├── KnowledgeBaseError          the knowledge base refused or could not do something
    │   ├── KnowledgeBaseNotFound   no such knowledge base (or not visible to this user)
    │   ├── DocumentNotFound
    │   ├── DocumentRejected        a file is refused before or while parsing (`reason` says why)
    │   ├── EmbeddingMismatch       the store was indexed with another model / dimension
    │   └── RagUnavailable          the RAG worker could not be reached
    └── ServiceBusy                 no engine slot for this request now; degrade or refuse politely
        ├── QueueFull               the wait queue was at its maximum depth on entry
        ├── QueueTimeout            the wait budget ran out before a slot freed
        └── RateLimited             the user sent too much or too fast (`retry_after_s`)

Only `chat_ui/`, HTTP handlers and the CLI turn these into messages.
"""

from __future__ import annotations

import enum
import math


class QwenStackError(Exception):
    user_message = "服务出现问题，请稍后再试。"


class ConfigError(QwenStackError):
    user_message = "服务配置有误，请联系管理员。"


class ServiceError(QwenStackError):
    user_message = "后台服务暂时不可用，请稍后再试。"


class DatabaseUnavailable(ServiceError):
    user_message = "数据库暂时不可用，请稍后再试。"


class RedisUnavailable(ServiceError):
    user_message = "会话存储（Redis）暂时不可用，请稍后重试。"


class ModelError(QwenStackError):
    user_message = "模型文件不可用。"


class ModelDownloadError(ModelError):
    pass


class EngineError(QwenStackError):
    user_message = "模型服务出错，请稍后再试。"


class EngineUnavailable(EngineError):
    user_message = "模型服务暂时不可用（可能正在启动或重启），请稍后再试。"


class TimeoutPhase(enum.StrEnum):
    CONNECT = "connect"
    FIRST_TOKEN = "first_token"  # noqa: S105 - a phase name, not a secret
    INTER_TOKEN = "inter_token"  # noqa: S105
    TOTAL = "total"


class EngineTimeout(EngineError):
    def __init__(self, phase: TimeoutPhase, seconds: float) -> None:
        super().__init__(f"engine {phase} timeout after {seconds:g}s")
        self.phase = phase
        self.seconds = seconds

    @property
    def user_message(self) -> str:  # type: ignore[override]
        if self.phase is TimeoutPhase.CONNECT:
            return "无法连接模型服务，请稍后再试。"
        if self.phase is TimeoutPhase.FIRST_TOKEN:
            return "模型响应超时（迟迟没有开始回答），请稍后再试或缩短问题。"
        if self.phase is TimeoutPhase.INTER_TOKEN:
            return "模型回答中途停顿过久，已中止，请重试。"
        return "回答时间过长，已中止，请重试或缩短问题。"


class EngineRejected(EngineError):
    user_message = "模型服务拒绝了这个请求（可能内容过长），请缩短后重试。"


class AuthError(QwenStackError):
    user_message = "用户名或密码错误。"


class UserExists(AuthError):
    user_message = "该用户已存在。"


class EngineRestarting(EngineUnavailable):
    user_message = "模型服务正在重启，请稍候几秒后重试。"


class ServiceBusy(QwenStackError):
    user_message = "当前使用人数较多，请稍后再试。"


class QueueFull(ServiceBusy):
    user_message = "当前排队人数已满，请稍等一分钟后再发送。"

    def __init__(self, depth: int, max_depth: int) -> None:
        super().__init__(f"wait queue full: {depth} waiting, max {max_depth}")
        self.depth = depth
        self.max_depth = max_depth


class QueueTimeout(ServiceBusy):
    user_message = "排队等待超时，当前使用人数较多，请稍后重新发送。"

    def __init__(self, budget_s: float) -> None:
        super().__init__(f"no slot within the wait budget of {budget_s:g}s")
        self.budget_s = budget_s


class LexiconError(ConfigError):
    """A guard lexicon could not be read; the message names the file and line for admins."""

    user_message = "敏感词词库有误，请联系管理员。"


class Forbidden(AuthError):
    user_message = "没有权限执行此操作。"


class KnowledgeBaseError(QwenStackError):
    user_message = "知识库操作失败，请稍后再试。"


class KnowledgeBaseNotFound(KnowledgeBaseError):
    user_message = "知识库不存在，或你没有访问权限。"


class DocumentNotFound(KnowledgeBaseError):
    user_message = "文档不存在，或你没有访问权限。"


class RejectReason(enum.StrEnum):
    """Why a file was refused; each has a Chinese message that tells the uploader what to do."""

    EMPTY = "empty"
    TOO_LARGE = "too_large"
    UNSUPPORTED_TYPE = "unsupported_type"
    MALFORMED = "malformed"
    ENCRYPTED = "encrypted"
    ARCHIVE_BOMB = "archive_bomb"
    XML_ENTITIES = "xml_entities"
    NO_TEXT = "no_text"
    RESOURCE_LIMIT = "resource_limit"
    DUPLICATE = "duplicate"


_REJECT_MESSAGES: dict[RejectReason, str] = {
    RejectReason.EMPTY: "文件是空的（0 字节），请检查后重新上传。",
    RejectReason.TOO_LARGE: "文件过大，超过了上传上限，请拆分后再上传。",
    RejectReason.UNSUPPORTED_TYPE: "不支持的文件类型：仅支持 PDF、DOCX、TXT、Markdown、HTML。",
    RejectReason.MALFORMED: "文件已损坏或格式不正确，无法解析。",
    RejectReason.ENCRYPTED: "文件已加密（有密码保护），请去除密码后再上传。",
    RejectReason.ARCHIVE_BOMB: "文件解压后体积异常（疑似压缩炸弹），已拒绝。",
    RejectReason.XML_ENTITIES: "文件包含不安全的 XML 实体定义，已拒绝。",
    RejectReason.NO_TEXT: "文件中没有可提取的文字（可能是扫描件），暂不支持。",
    RejectReason.RESOURCE_LIMIT: "文件解析耗时或占用内存过多，已中止。",
    RejectReason.DUPLICATE: "该知识库中已有内容完全相同的文件。",
}


class DocumentRejected(KnowledgeBaseError):
    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"document rejected: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail

    @property
    def user_message(self) -> str:  # type: ignore[override]
        return _REJECT_MESSAGES[self.reason]


class EmbeddingMismatch(KnowledgeBaseError):
    user_message = "知识库的向量模型与当前配置不一致，请联系管理员重建索引。"


class RagUnavailable(KnowledgeBaseError):
    user_message = "知识库服务暂时不可用，请稍后再试。"


_RATE_LIMIT_MESSAGES = {  # by `RateLimited.kind` (backend/ratelimit.py LimitKind values)
    "concurrency": "您已有回答正在生成，请等它结束，或 {n} 秒后再试。",
    "login": "登录尝试次数过多，请 {n} 秒后再试。",
    "tokens": "本时段使用的文字量已达上限，请 {n} 秒后再试。",
}


class RateLimited(ServiceBusy):
    """A per-user limit refused the request. `retry_after_s`: seconds until it would pass;
    `kind`: which limit (`messages`, `tokens`, `concurrency`, `login`)."""

    def __init__(self, retry_after_s: float, *, kind: str = "messages") -> None:
        super().__init__(f"rate limited ({kind}); retry after {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s
        self.kind = kind

    @property
    def user_message(self) -> str:  # type: ignore[override]
        template = _RATE_LIMIT_MESSAGES.get(self.kind, "发送太频繁，请 {n} 秒后再试。")
        return template.format(n=max(1, math.ceil(self.retry_after_s)))
