"""No credential in anything logged, printed or stored: `redact` drops user:password@ from URIs
and the values of the secret variables of the environment."""

from __future__ import annotations

import os
import re

_SECRET_IN_URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")

# values that are secrets wherever they show up (a message, a param, an exception text)
SECRET_ENV_VARS = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def redact(text: str) -> str:
    """text without user:password@ in any URI and without the values of SECRET_ENV_VARS."""
    text = _SECRET_IN_URI.sub(r"\g<scheme>***@", str(text))
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def redact_config(values: dict) -> dict:
    """A config dict fit to be stored (checkpoints, result files): string values redacted."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}
