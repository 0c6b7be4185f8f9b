from tests.backend.chat.stack import make_stack

__all__ = ["make_stack"]
