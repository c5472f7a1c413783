"""What publishers tell robots: robots.txt rules (RFC 9309) and ``X-Robots-Tag`` opt-outs.

Pure parsing and matching; the downloader (:mod:`.download`) fetches the files and headers.

robots.txt, as RFC 9309 says (Python's ``urllib.robotparser`` does not: it takes the first
matching rule in file order, and knows neither ``*`` nor ``$``):

* groups start with one or more ``user-agent`` lines; the crawler obeys every group whose
  user agent is its product token (case-insensitive), else every ``*`` group, else nothing;
* the most specific rule wins, the one whose path pattern has the most octets; when an
  ``allow`` and a ``disallow`` rule are equally specific, ``allow`` wins;
* ``*`` matches any run of characters, a final ``$`` anchors the end; patterns and paths are
  compared with percent-encoding normalised (unreserved characters decoded, the rest upper-case
  ``%XX``, non-ASCII as UTF-8 octets);
* ``/robots.txt`` itself is always allowed; at most :data:`ROBOTS_MAX_BYTES` are parsed.

``X-Robots-Tag``: the directives ``noai`` and ``noimageai`` (img2dataset's opt-out directives
for AI use), either for every robot (``noai``) or for this one by its product token
(``item-embeddings: noai``); a directive for another robot (``otherbot: noai``) does not apply.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

ROBOTS_MAX_BYTES = 500 * 1024        # RFC 9309 2.5: parse at least 500 KiB; we parse that much
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai"})
# X-Robots-Tag directives that carry a value after a colon (not a user agent before one).
_VALUED_DIRECTIVES = frozenset({"unavailable_after", "max-snippet", "max-image-preview",
                                "max-video-preview"})
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
_PRODUCT = re.compile(r"[A-Za-z_-]+")
_AGENT = re.compile(r"[a-z0-9_.-]+")


def product_token(user_agent: str) -> str:
    """The product token of a User-Agent (``item-embeddings/0.1 (...)`` -> ``item-embeddings``):
    the letters, ``_`` and ``-`` it starts with (RFC 9309 2.2.1), lower-case; '' if none."""
    match = _PRODUCT.match(user_agent.strip())
    return match.group(0).lower() if match else ""


def normalise_path(path: str) -> str:
    """``path`` with percent-encoding made canonical: ``%XX`` of an unreserved character
    decoded, every other ``%XX`` in upper case, non-ASCII, control and space octets encoded."""
    raw = path.encode("utf-8")
    out: list[str] = []
    i = 0
    while i < len(raw):
        byte = raw[i]
        digits = raw[i + 1:i + 3].decode("ascii", "replace")
        if byte == 0x25 and len(digits) == 2 and set(digits) <= _HEX:
            value = int(digits, 16)
            out.append(chr(value) if chr(value) in _UNRESERVED else f"%{value:02X}")
            i += 3
            continue
        out.append(f"%{byte:02X}" if byte <= 0x20 or byte >= 0x7F else chr(byte))
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class RobotsRule:
    """One ``allow`` / ``disallow`` line of the chosen groups."""

    allow: bool
    pattern: str                     # normalised, as written (``*`` and a final ``$`` kept)
    regex: re.Pattern

    @classmethod
    def of(cls, allow: bool, pattern: str) -> RobotsRule:
        pattern = normalise_path(pattern)
        body, anchored = (pattern[:-1], True) if pattern.endswith("$") else (pattern, False)
        regex = "".join(".*" if ch == "*" else re.escape(ch) for ch in body)
        return cls(allow, pattern, re.compile(regex + (r"\Z" if anchored else ""), re.DOTALL))

    def __str__(self) -> str:
        return f"{'Allow' if self.allow else 'Disallow'}: {self.pattern}"


@dataclass(frozen=True)
class RobotsRules:
    """The rules of a robots.txt that apply to one product token."""

    rules: tuple[RobotsRule, ...] = ()

    def deciding_rule(self, path: str) -> RobotsRule | None:
        """The most specific rule matching ``path`` (path and query); None: no rule matches."""
        path = normalise_path(path or "/")
        best: RobotsRule | None = None
        for rule in self.rules:
            if rule.regex.match(path) and (
                    best is None or len(rule.pattern) > len(best.pattern)
                    or len(rule.pattern) == len(best.pattern) and rule.allow and not best.allow):
                best = rule
        return best

    def allows(self, path: str) -> bool:
        """Whether a URL with this path (and query) may be fetched."""
        if normalise_path(path).split("?", 1)[0] == "/robots.txt":
            return True
        rule = self.deciding_rule(path)
        return rule is None or rule.allow

    @classmethod
    def parse(cls, text: str, token: str) -> RobotsRules:
        """The rules of robots.txt ``text`` for product token ``token`` (see the module doc)."""
        groups: list[tuple[list[str], list[RobotsRule]]] = []
        in_rules = True  # a user-agent line after a rule line starts a new group
        for raw_line in text.lstrip("\ufeff").splitlines():
            key, sep, value = raw_line.split("#", 1)[0].partition(":")
            if not sep:
                continue
            key, value = key.strip().lower(), value.strip()
            if key == "user-agent":
                if in_rules:
                    groups.append(([], []))
                    in_rules = False
                groups[-1][0].append(value)
            elif key in ("allow", "disallow") and groups:
                in_rules = True
                if value.startswith(("/", "*")):  # an empty value is no rule
                    groups[-1][1].append(RobotsRule.of(key == "allow", value))

        def agent(value: str) -> str:
            if value == "*":
                return "*"
            match = _PRODUCT.match(value)
            return match.group(0).lower() if match else ""

        for wanted in (token.lower(), "*"):
            matching = [rules for agents, rules in groups
                        if wanted and any(agent(a) == wanted for a in agents)]
            if matching:  # groups for this token, even without rules, end the search
                return cls(tuple(rule for rules in matching for rule in rules))
        return cls()


ALLOW_ALL = RobotsRules()
DISALLOW_ALL = RobotsRules((RobotsRule.of(False, "/"),))


def opt_out(values: Iterable[str], token: str) -> str | None:
    """The ``X-Robots-Tag`` opt-out among ``values`` (one per header line) that applies to the
    robot with product token ``token``, as written (``noai``, ``item-embeddings: noimageai``);
    None when there is none.

    A header value is a comma-separated list of directives; ``name: directive`` scopes it and
    the directives after it in the same value to robot ``name``.
    """
    token = token.lower()
    for value in values:
        agent: str | None = None  # None: every robot
        for part in value.split(","):
            name, sep, rest = part.partition(":")
            name = name.strip().lower()
            if sep and name not in _VALUED_DIRECTIVES and _AGENT.fullmatch(name):
                agent, part = name, rest
            directive = part.strip().lower()
            if directive in OPT_OUT_DIRECTIVES and agent in (None, token):
                return f"{agent}: {directive}" if agent else directive
    return None
