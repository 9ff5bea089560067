"""Kinds by name, imported only when used (like healthchecks' TRANSPORTS): the probes',
actions' and executors' registries look their classes up here, and name a params problem
the same way. A leaf: it imports none of the product's packages."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from pydantic import ValidationError


def load(table: Mapping[str, str], kind: str, what: str) -> type:
    """The class `table[kind]` names (`module:Class`), imported now. KeyError names the kind
    and the known ones: `unknown probe kind 'htp' (known: http, tcp, ...)`."""
    try:
        module_name, _, class_name = table[kind].partition(":")
    except KeyError:
        raise KeyError(f"unknown {what} {kind!r} (known: {', '.join(sorted(table))})") from None
    found: type = getattr(importlib.import_module(module_name), class_name)
    return found


def params_problems(exc: ValidationError) -> str:
    """Each problem with the param it is about: `params.nodes: Field required; ...`."""
    return "; ".join(
        f"params.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
    )
