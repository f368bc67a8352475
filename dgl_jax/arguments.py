"""Argument types shared by the command-line parsers (``train``, ``eval``, ``sweep``): each turns a string
into a value or raises ``argparse.ArgumentTypeError`` with one line."""

from __future__ import annotations

import argparse
import json
from typing import Any


def int_list(text: str) -> int | tuple[int, ...]:
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of integers") from None
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is empty")
    return parts[0] if len(parts) == 1 and "," not in text else tuple(parts)


def decay_list(text: str) -> int | tuple[int, ...] | None:
    return None if text.lower() in ("none", "off", "constant") else int_list(text)


def boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; expected true/false")


def key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    k, v = text.split("=", 1)
    try:
        return k, json.loads(v)
    except json.JSONDecodeError:
        return k, v
