"""Conversation templates as data: the fields every template must define, checked in one place.

Why a module of its own: planning (workflow_config) checks the templates before any job starts and
gen_config expands them into MLC's ``conv_template``; both need the same rule without planning
importing a job's module.
"""

from __future__ import annotations

from typing import Any

from neox_mlc.common import WorkflowError

TEMPLATE_FIELDS = ("system_message", "roles", "role_content_sep", "role_empty_sep", "seps", "stop_str", "stop_token_ids", "add_bos")


def validate_template(name: str, tpl: dict[str, Any]) -> None:
    """A template must define every field MLC's conversation needs."""
    missing = [f for f in TEMPLATE_FIELDS if f not in tpl]
    if missing:
        raise WorkflowError(f"conversation template {name!r} is missing field(s) {missing}; required: {list(TEMPLATE_FIELDS)}")
    roles = tpl["roles"]
    if not isinstance(roles, dict) or set(roles) != {"user", "assistant"}:
        raise WorkflowError(f"conversation template {name!r}: roles must map exactly 'user' and 'assistant', got {roles!r}")
