"""The QA report page of a set must be self-contained: nothing in it is loaded or linked from
outside the file (the run page of Vertex AI shows it, and it must open offline). Inline
``data:`` URIs and in-page ``#anchors`` are what a self-contained page uses instead."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from .report import EXAMPLES, Report

# Attributes whose value is a URL that a browser loads, submits to or follows.
_URL_ATTRS = frozenset({
    "src", "href", "xlink:href", "data", "poster", "action", "formaction", "background",
    "manifest", "codebase", "cite", "longdesc", "ping", "lowsrc", "dynsrc", "archive",
    "classid", "profile", "usemap"})
_SRCSET_ATTRS = frozenset({"srcset", "imagesrcset"})
# Elements that show another document (even an iframe's inline srcdoc runs apart from the page)
_EMBEDDING = frozenset({"iframe", "frame", "frameset", "object", "embed", "applet", "portal"})
_CSS_URL = re.compile(r"""url\(\s*(["']?)(.*?)\1\s*\)""", re.I | re.S)
_CSS_IMPORT = re.compile(r"@import\b", re.I)
_SCRIPT_URL = re.compile(r"""\b(?:https?|wss?|ftp)://[^\s"'`<>)]+""", re.I)
_SRCSET_URL = re.compile(r"[\s,]*(\S+)")
_SHOWN = 80  # characters of a reference a message shows


def _inside(url: str) -> bool:
    """A URL that stays in the page: a ``data:`` URI, an in-page ``#anchor`` or empty."""
    url = url.strip()
    return not url or url.startswith("#") or url[:5].lower() == "data:"


def _srcset_urls(value: str) -> list[str]:
    """The image URLs of a ``srcset`` (a URL may hold commas, as a ``data:`` URI does)."""
    urls, pos = [], 0
    while match := _SRCSET_URL.match(value, pos):
        url = match.group(1)
        pos = match.end()
        if url.endswith(","):
            url = url.rstrip(",")
        else:  # skip the descriptor ("2x", "640w") up to the next candidate
            pos = value.find(",", pos) + 1 or len(value)
        urls.append(url)
    return urls


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SHOWN else text[:_SHOWN - 1] + "…"


class _References(HTMLParser):
    """Collects what a page references outside itself, as a reader would name it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._element = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._element = tag
        if tag in _EMBEDDING:
            self.found.append(f"<{tag}>: another document embedded")
        for name, value in attrs:
            value = value or ""
            if name in _URL_ATTRS and not _inside(value):
                self.found.append(f"<{tag} {name}={_short(value)!r}>")
            elif name in _SRCSET_ATTRS:
                self.found += [f"<{tag} {name}> {_short(url)!r}"
                               for url in _srcset_urls(value) if not _inside(url)]
            elif name == "style":
                self._css(value, f"<{tag} style>")
            elif (tag, name) == ("meta", "http-equiv") and value.lower() == "refresh":
                self.found.append("<meta http-equiv='refresh'>: a redirect")

    def handle_data(self, data: str) -> None:
        if self._element == "style":
            self._css(data, "<style>")
        elif self._element == "script":
            self.found += [f"<script> text: {_short(url)!r}" for url in
                           _SCRIPT_URL.findall(data)]

    def handle_endtag(self, tag: str) -> None:
        self._element = ""

    def _css(self, css: str, where: str) -> None:
        self.found += [f"{where} url({_short(url)!r})" for _, url in _CSS_URL.findall(css)
                       if not _inside(url)]
        if _CSS_IMPORT.search(css):
            self.found.append(f"{where} @import")


def outside_references(html: str) -> list[str]:
    """What ``html`` loads, embeds or links from outside itself, one entry per reference.

    >>> outside_references('<img src="data:image/png;base64,iVBO"><a href="#maps">maps</a>')
    []
    >>> outside_references('<script src="https://cdn.example/x.js"></script>'
    ...                    '<style>body{background:url(http://x.example/b.png)}</style>')
    ["<script src='https://cdn.example/x.js'>", "<style> url('http://x.example/b.png')"]
    """
    parser = _References()
    parser.feed(html)
    parser.close()
    return parser.found


def check_page(path: Path, report: Report) -> None:
    """The page at ``path`` is UTF-8 text that references nothing outside itself."""
    try:
        html = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        report.fail(f"{path.name}: unreadable as UTF-8 text: {exc}")
        return
    found = outside_references(html)
    if found:
        report.fail(f"{path.name}: {len(found)} reference(s) outside the page (a QA report is "
                    f"self-contained: data: URIs and #anchors only), e.g. "
                    f"{'; '.join(found[:EXAMPLES])}")
