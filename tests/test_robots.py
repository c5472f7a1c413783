"""robots.txt rules as RFC 9309 reads them, and X-Robots-Tag opt-outs (pure parsing)."""

from __future__ import annotations

import urllib.robotparser

import pytest

from item_embeddings.image.download_config import DEFAULT_USER_AGENT
from item_embeddings.image.robots import (
    ALLOW_ALL,
    DISALLOW_ALL,
    RobotsRules,
    normalise_path,
    opt_out,
    product_token,
)

# The example of RFC 9309, section 5.1.
RFC_EXAMPLE = """\
User-Agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-Agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-Agent: barbot
User-Agent: bazbot
Disallow: /example/page.html

User-Agent: quxbot

EOF
"""


@pytest.mark.parametrize("token,path,allowed", [
    ("foobot", "/example/page.html", True),      # longest match: the Allow beats Disallow: /
    ("foobot", "/example/allowed.gif", True),
    ("foobot", "/example/other.html", False),
    ("foobot", "/", False),
    ("barbot", "/example/page.html", False),     # two user-agent lines, one group
    ("bazbot", "/example/page.html", False),
    ("bazbot", "/example/", True),               # its own group: the * rules do not apply
    ("quxbot", "/picture.gif", True),            # a group without rules allows everything
    ("otherbot", "/picture.gif", False),         # no group of its own: the * group
    ("otherbot", "/picture.gif?size=2", True),   # '$' anchors the end
    ("otherbot", "/example/x", False),
    ("otherbot", "/publications/x", True),
    ("FOOBOT", "/example/page.html", True),      # product tokens match case-insensitively
])
def test_rfc_example(token, path, allowed):
    assert RobotsRules.parse(RFC_EXAMPLE, token).allows(path) is allowed


def test_most_specific_rule_wins_regardless_of_order():
    text = "User-agent: *\nDisallow: /\nAllow: /images/\n"
    rules = RobotsRules.parse(text, "item-embeddings")
    assert rules.allows("/images/a.jpg") and not rules.allows("/about")
    assert str(rules.deciding_rule("/images/a.jpg")) == "Allow: /images/"
    # Python's robotparser takes the first matching line in file order (not RFC 9309):
    # this is why the project has its own parser.
    legacy = urllib.robotparser.RobotFileParser()
    legacy.parse(text.splitlines())
    assert not legacy.can_fetch("item-embeddings", "/images/a.jpg")


def test_equally_specific_allow_wins():
    for text in ("User-agent: *\nDisallow: /folder\nAllow: /folder\n",
                 "User-agent: *\nAllow: /folder\nDisallow: /folder\n"):
        assert RobotsRules.parse(text, "x").allows("/folder/page")


@pytest.mark.parametrize("pattern,path,matches", [
    ("/*.php$", "/index.php", True),
    ("/*.php$", "/index.php?x=1", False),
    ("/*.php$", "/index.php5", False),
    ("/*.php", "/dir/index.php5", True),
    ("/fish*", "/fish.html", True),
    ("/fish*", "/Fish.html", False),             # paths are case-sensitive
    ("/a$b", "/a$b/c", True),                    # '$' is special only at the end
    ("*/private/", "/x/private/y", True),
    ("/path~file", "/path%7efile", True),        # %7E is an unreserved '~'
    ("/a%3d", "/a%3D", True),                    # hex digits compared upper-case
    ("/a%3D", "/a=", False),                     # a reserved character stays encoded
    ("/ü", "/%C3%BC", True),                     # non-ASCII as UTF-8 octets
    ("/ü", "/%c3%bc", True),
    ("/a b", "/a%20b", True),
])
def test_patterns(pattern, path, matches):
    rules = RobotsRules.parse(f"User-agent: *\nDisallow: {pattern}\n", "x")
    assert rules.allows(path) is not matches


def test_lines_comments_and_groups():
    text = ("\ufeffDisallow: /zone\n"      # a rule outside a group: ignored
            "# a comment\r\n"
            "USER-AGENT: Item-Embeddings/2.0  # the product token is the name before '/'\r\n"
            "DISALLOW: /a  # trailing comment\r\n"
            "Crawl-delay: 5\r\n"                       # other records are ignored
            "Sitemap: https://example.com/sitemap.xml\r\n"
            "Disallow:\r\n"                            # an empty rule is no rule
            "\r\n"
            "User-agent: item-embeddings\n"            # a second group for us: merged
            "Disallow: /b\n"
            "User-agent: *\n"
            "Disallow: /\n")
    rules = RobotsRules.parse(text, "item-embeddings")
    assert not rules.allows("/a/x") and not rules.allows("/b") and rules.allows("/c")
    assert rules.allows("/zone")


def test_robots_txt_itself_is_always_allowed():
    assert DISALLOW_ALL.allows("/robots.txt") and not DISALLOW_ALL.allows("/anything")
    assert ALLOW_ALL.allows("/anything") and ALLOW_ALL.deciding_rule("/x") is None
    assert RobotsRules.parse("", "x") == ALLOW_ALL
    assert RobotsRules.parse("User-agent: other\nDisallow: /\n", "x") == ALLOW_ALL


def test_normalise_path():
    assert normalise_path("/a%7e%2fb%zz%4") == "/a~%2Fb%zz%4"
    assert normalise_path("/é") == "/%C3%A9"


def test_default_user_agent_names_the_project():
    assert DEFAULT_USER_AGENT.startswith("item-embeddings/")
    assert "images.md#politeness" in DEFAULT_USER_AGENT and DEFAULT_USER_AGENT.isprintable()
    assert product_token(DEFAULT_USER_AGENT) == "item-embeddings"
    assert product_token("Acme_Catalog-Bot/2 (+https://acme.example/bot)") == "acme_catalog-bot"
    assert product_token("(no token)") == ""


@pytest.mark.parametrize("values,found", [
    (["noai"], "noai"),
    (["noindex, noimageai"], "noimageai"),
    (["NoAI"], "noai"),
    (["noindex", "noai"], "noai"),                       # two header lines
    (["noindex"], None),                                 # search directives are no AI opt-out
    (["noimageindex, nofollow"], None),
    (["otherbot: noai"], None),                          # for another robot only
    (["item-embeddings: noai"], "item-embeddings: noai"),
    (["Item-Embeddings: noindex, NoImageAI"], "item-embeddings: noimageai"),
    (["googlebot: noindex, item-embeddings: noimageai"], "item-embeddings: noimageai"),
    (["item-embeddings: noindex, otherbot: noai"], None),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
    (["max-image-preview:none, noai"], "noai"),
    ([], None),
])
def test_x_robots_tag_opt_out(values, found):
    assert opt_out(values, "item-embeddings") == found


def test_edges_of_parsing_and_matching():
    # a byte order mark before the first line does not hide it
    assert not RobotsRules.parse("\ufeffUser-agent: *\nDisallow: /\n", "x").allows("/a")
    # a robot without a product token obeys the '*' group, not every group
    text = "User-agent: foobot\nDisallow: /\n\nUser-agent: *\nDisallow: /private\n"
    rules = RobotsRules.parse(text, "")
    assert rules.allows("/public") and not rules.allows("/private/x")
    # an empty path is the root; the deciding rule reads as the file wrote it
    assert not DISALLOW_ALL.allows("") and str(DISALLOW_ALL.deciding_rule("")) == "Disallow: /"
    # DEL and control characters are encoded like spaces; '~' stays, printable ASCII too
    assert normalise_path("/a\x7fb\x1fc~d") == "/a%7Fb%1Fc~d"
    assert product_token("  item-embeddings/0.1 (+https://x)") == "item-embeddings"


def test_lines_with_colons_hashes_and_odd_agents():
    text = ("User-agent: (no product token)\nDisallow: /\n\n"   # matches no robot; no crash
            "User-agent: *\n"
            "Disallow: /x:y  # a colon in a path # and two hashes\n"
            "Disallow: /private\n"
            "Allow: /\n")                                      # shorter: /private still wins
    rules = RobotsRules.parse(text, "item-embeddings")
    assert not rules.allows("/x:y/z") and rules.allows("/x")
    assert str(rules.deciding_rule("/x:y/z")) == "Disallow: /x:y"
    assert not rules.allows("/private/a") and rules.allows("/public")
    # /robots.txt with any query is robots.txt
    assert DISALLOW_ALL.allows("/robots.txt?x=1") and DISALLOW_ALL.allows("/robots.txt?a=1?b")
    # '!' and the other printable ASCII characters stay as they are
    assert normalise_path("/a!b") == "/a!b"


@pytest.mark.parametrize("values,found", [
    (["noindex,noai"], "noai"),                                     # no space after the comma
    (["otherbot: unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], None),  # still otherbot's
])
def test_x_robots_tag_lists_without_spaces_and_valued_directives(values, found):
    assert opt_out(values, "item-embeddings") == found
