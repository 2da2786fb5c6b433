"""Helpers shared by the command lines of platform/ (flags from typed dataclasses)."""

from __future__ import annotations

import ast
import inspect


def field_docs(cls) -> dict[str, str]:
    """The one-line docstring under each dataclass field (used as CLI help)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)}
