"""Just enough PromQL lexing for the infra tests: which metric names an expression selects.

Prometheus itself parses every expression (promtool, in test_prometheus.py); this only needs to tell
metric selectors apart from functions, aggregations, keywords, label names and literals.
"""

from __future__ import annotations

import re

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_NUMBER = re.compile(r"(?:0x[0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?(?:ms|s|m|h|d|w|y)?)+")
# Keywords followed by a parenthesised list of label names.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_WORDS = {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan", "start", "end"}
# Aggregations: `sum by (le) (...)` puts a keyword between the name and its parenthesis.
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                 "bottomk", "topk", "quantile", "limitk", "limit_ratio"}  # fmt: skip
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
# Grafana's built-in variables, and a value for each, so the expression is plain PromQL.
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def _skip_string(text: str, i: int) -> int:
    quote = text[i]
    i += 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" and quote != "`" else 1
    return i + 1


def _skip_group(text: str, i: int, open_: str, close: str) -> int:
    """From text[i] == open_, the index after its matching close (strings respected)."""
    depth = 0
    while i < len(text):
        char = text[i]
        if char in "\"'`":
            i = _skip_string(text, i)
            continue
        if char == open_:
            depth += 1
        elif char == close:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError(f"unbalanced {open_!r} in {text!r}")


def _next_char(text: str, i: int) -> str:
    while i < len(text) and text[i].isspace():
        i += 1
    return text[i] if i < len(text) else ""


def metric_names(expr: str) -> set[str]:
    """Names of the metrics `expr` selects (`up`, `qwen_requests_total`, `vllm:num_requests_waiting`)."""
    names: set[str] = set()
    i = 0
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            i = _skip_string(expr, i)
        elif char == "{":
            i = _skip_group(expr, i, "{", "}")
        elif char == "[":
            i = _skip_group(expr, i, "[", "]")
        elif char.isdigit() or (char == "." and i + 1 < len(expr) and expr[i + 1].isdigit()):
            match = _NUMBER.match(expr, i)
            i = match.end() if match else i + 1
        elif match := _IDENT.match(expr, i):
            word, i = match.group(), match.end()
            following = _next_char(expr, i)
            if word in _LABEL_LISTS:
                if following == "(":
                    i = _skip_group(expr, expr.index("(", i), "(", ")")
            elif following == "(" or word.lower() in _WORDS or word in _AGGREGATIONS:
                continue  # a function or aggregation, or a keyword
            else:
                names.add(word)
        else:
            i += 1
    return names


def signal(expr: str) -> str:
    """An alert expression without its final top-level comparison (`x > 4` -> `x`): the series
    that must exist for the alert to be able to fire. Unchanged if there is none."""
    depth, cut = 0, None
    i = 0
    while i < len(expr):
        char = expr[i]
        if char in "\"'`":
            i = _skip_string(expr, i)
            continue
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
        elif depth == 0:
            for op in _COMPARISONS:
                if expr.startswith(op, i):
                    cut = i
                    i += len(op) - 1
                    break
        i += 1
    return expr[:cut].strip() if cut is not None else expr


def plain(expr: str, variables: dict[str, str]) -> str:
    """`expr` with Grafana's built-in variables and the dashboard's own replaced by values.
    Raises KeyError naming a variable that has no value."""
    values = {**GRAFANA_BUILTINS, **{f"${k}": v for k, v in variables.items()}}
    for name in sorted(values, key=len, reverse=True):  # $gpus_per_replica before a $gpus
        expr = expr.replace(name, values[name])
    left = re.search(r"\$\{?\w+", expr)
    if left:
        raise KeyError(f"undefined dashboard variable {left.group()} in {expr!r}")
    return expr
