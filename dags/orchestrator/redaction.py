"""Scrubbing what could be a secret out of text a report, a log or a post-mortem bundle keeps."""

from __future__ import annotations

import re

# What could be a secret inside an error message: credentials in a URL, tokens with a known shape, webhook URLs.
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/\s@]+@", re.IGNORECASE)


_SECRET_RES = (
    re.compile(r"https://hooks\.slack\.com/\S+"),
    re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    re.compile(
        r"(?i)\b(password|passwd|secret|token|api[_-]?key|authorization)\b(\s*[=:]\s*)(?:bearer\s+|basic\s+)?\S+"
    ),
)


def scrub(text: str) -> str:
    """`text` with anything shaped like a credential replaced by ***: URL user info, tokens, webhook URLs."""
    text = _URL_CREDENTIALS_RE.sub(r"\g<scheme>***@", text)
    for pattern in _SECRET_RES:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}***" if m.lastindex == 2 else "***", text)
    return text
