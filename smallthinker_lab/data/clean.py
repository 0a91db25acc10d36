"""Text cleaners: small pure functions, one per kind of markup, plus dedupe and held-out overlap checks.

- :func:`wiki_paragraphs` / :func:`strip_wikitext`: MediaWiki markup to plain paragraphs.
- :func:`fix_ptb_quotes`: Penn-Treebank ```` `` '' ```` quotes (BoolQ) to ``"``.
- :func:`detag_peoples_daily`: PKU People's Daily ``word/tag`` lines to plain text.
- :func:`strip_ansi`: ANSI escape sequences (fortunes-zh colours).
- :func:`groff_paragraphs` / :func:`strip_groff`: man-page groff to text, keeping paragraphs with a high Han ratio.
- :func:`normalize_fullwidth_digits`: ``１９９８`` -> ``1998``.
- :func:`dedupe` / :func:`dedupe_indices`: exact and near-exact (normalised hash) duplicates.
- :func:`find_overlaps` / :func:`assert_disjoint`: held-out texts that occur inside corpus documents.
"""

from __future__ import annotations

import bisect
import hashlib
import html
import re
import unicodedata
from collections.abc import Iterable, Sequence

__all__ = [
    "OverlapError",
    "assert_disjoint",
    "dedupe",
    "dedupe_indices",
    "detag_peoples_daily",
    "find_overlaps",
    "fix_ptb_quotes",
    "groff_paragraphs",
    "han_ratio",
    "normalize_for_match",
    "normalize_fullwidth_digits",
    "strip_ansi",
    "strip_groff",
    "strip_wikitext",
    "wiki_paragraphs",
]

# ---------------------------------------------------------------------------------------------------------------
# Wikitext

# Sections whose content is citations or link lists, not prose: everything from the first of them is dropped.
WIKI_TAIL_SECTIONS = frozenset({
    "references", "notes", "footnotes", "citations", "sources", "bibliography", "further reading",
    "external links", "see also", "notes and references", "works cited", "primary sources", "secondary sources",
})
_DROP_TAGS = "ref|gallery|timeline|score|imagemap|references|math|chem|ce|graph|syntaxhighlight|source|poem|hiero"
_RE_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_RE_REF_SELF = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_RE_DROP_BLOCK = re.compile(rf"<({_DROP_TAGS})\b[^>]*>.*?</\1\s*>", re.S | re.I)
_RE_DROP_SELF = re.compile(rf"<(?:{_DROP_TAGS})\b[^>]*/\s*>", re.I)
_RE_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_RE_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_RE_BARE_URL = re.compile(r"https?://\S+")
_RE_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_QUOTES = re.compile(r"'{2,}")
_LINK_DROP_NS = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "help:", "template:", "portal:",
                 "special:", "talk:", "user:", "wiktionary:", "wikt:")
_RE_INTERLANG = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?:")


def _template_text(body: str) -> str:
    """Replacement text for one innermost template ``{{body}}``: a few carry prose, the rest vanish."""
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].lower().replace("_", " ").strip()
    args = [p for p in parts[1:] if "=" not in p]
    if name in ("convert", "cvt") and len(args) >= 2:
        return f"{args[0]} {args[1]}"
    if name in ("lang", "langx") and len(args) >= 2:
        return args[-1]
    if name.startswith("lang-") and args:
        return args[0]
    if name in ("nowrap", "nobr", "small", "smaller", "big", "em", "strong", "text") and args:
        return args[0]
    if name in ("ipa", "ipac-en", "audio"):
        return ""
    if name in ("'", "'s"):
        return "'"
    if name in ("snd", "spaced ndash", "ndash"):
        return " – "
    if name == "mdash":
        return " — "
    return ""


def _replace_nested(s: str, open_: str, close: str, repl) -> str:
    """Replace innermost ``open_ ... close`` spans repeatedly (handles nesting); ``repl(body) -> str``."""
    pat = re.compile(re.escape(open_) + r"((?:(?!" + re.escape(open_) + r")(?!" + re.escape(close) + r").)*?)"
                     + re.escape(close), re.S)
    for _ in range(50):
        s2 = pat.sub(lambda m: repl(m.group(1)), s)
        if s2 == s:
            break
        s = s2
    return s


def _strip_tables(s: str) -> str:
    """Drop ``{| ... |}`` tables, nested ones included (line based, as MediaWiki parses them)."""
    out, depth = [], 0
    for line in s.split("\n"):
        st = line.lstrip()
        if st.startswith("{|"):
            depth += 1
            continue
        if depth and st.startswith("|}"):
            depth -= 1
            continue
        if not depth:
            out.append(line)
    return "\n".join(out)


def _link(body: str) -> str:
    target, _, text = body.partition("|")
    t = target.strip().lower()
    if t.startswith(_LINK_DROP_NS) or (_RE_INTERLANG.match(t) and "|" not in body and " " not in t[:4]):
        return ""
    if t.startswith(":"):
        target = target.lstrip(":")
    if "|" in text:  # odd pipes: keep the last part
        text = text.rsplit("|", 1)[1]
    return (text if text else target).strip()


def wiki_paragraphs(wikitext: str, keep_headings: bool = True) -> list[str]:
    """MediaWiki source -> list of plain-text paragraphs (headings as their own items if ``keep_headings``).

    Drops comments, refs, templates (nested; ``convert``/``lang``/``nowrap`` keep their text), tables, files,
    categories and interlanguage links, external-link URLs, bold/italic quotes, HTML tags (entities unescaped),
    list markers, and everything from a "References"/"See also"/"External links"-like section on.
    """
    s = _RE_COMMENT.sub("", wikitext)
    s = _RE_REF_SELF.sub("", s)
    s = _RE_DROP_BLOCK.sub("", s)
    s = _RE_DROP_SELF.sub("", s)
    s = _replace_nested(s, "{{", "}}", _template_text)
    s = _strip_tables(s)
    # [[File:..|..[[nested]]..]] : resolve innermost links first, then namespace links vanish whole.
    s = _replace_nested(s, "[[", "]]", _link)
    s = _RE_EXT_LINK.sub(lambda m: m.group(1) or "", s)
    s = _RE_MAGIC.sub("", s)
    s = _RE_QUOTES.sub("", s)
    s = _RE_TAG.sub("", s)
    s = html.unescape(s).replace("\xa0", " ")
    s = _RE_BARE_URL.sub("", s)

    paras: list[str] = []
    for raw in s.split("\n"):
        line = raw.strip()
        if not line:
            continue
        m = _RE_HEADING.match(line)
        if m:
            title = m.group(2).strip()
            if title.lower() in WIKI_TAIL_SECTIONS:
                break
            if keep_headings and title:
                paras.append(title)
            continue
        if line.startswith(("|", "!", "{", "}")):  # table debris or unmatched template lines
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = _tidy(line)
        if len(line) >= 2 and re.search(r"\w", line):
            paras.append(line)
    return paras


def _tidy(line: str) -> str:
    line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)  # "()" left behind by removed templates
    line = re.sub(r"\(\s*[,;]\s*", "(", line)
    line = re.sub(r"[ \t]{2,}", " ", line)
    line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
    return line.strip()


def strip_wikitext(wikitext: str, keep_headings: bool = True) -> str:
    """MediaWiki source -> plain text, paragraphs separated by a blank line."""
    return "\n\n".join(wiki_paragraphs(wikitext, keep_headings=keep_headings))


def fix_ptb_quotes(s: str) -> str:
    """Penn-Treebank quotes (BoolQ passages): ````word''`` -> ``"word"``."""
    return s.replace("``", '"').replace("''", '"')


# ---------------------------------------------------------------------------------------------------------------
# People's Daily (PKU 1998), ANSI, groff


def detag_peoples_daily(line: str) -> str:
    """``迈向/v  充满/v  [中央/n  人民/n]nt`` -> ``迈向充满中央人民``: drop POS tags and compound brackets."""
    return "".join(re.sub(r"\][a-zA-Z]+$", "", t.rsplit("/", 1)[0]).lstrip("[") for t in line.split())


_RE_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(s: str) -> str:
    """Remove ANSI escape sequences (CSI colours like ``\\x1b[33m``, OSC, two-byte escapes)."""
    return _RE_ANSI.sub("", s)


def _is_han(c: str) -> bool:
    o = ord(c)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2FA1F or 0xF900 <= o <= 0xFAFF


def han_ratio(s: str) -> float:
    """Fraction of non-space characters that are Han ideographs (0.0 for an empty string)."""
    chars = [c for c in s if not c.isspace()]
    return sum(map(_is_han, chars)) / len(chars) if chars else 0.0


_GROFF_SPECIAL = {
    "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "dq": '"', "aq": "'", "co": "©", "rg": "®", "tm": "™",
    "em": "—", "en": "–", "hy": "-", "mi": "-", "pl": "+", "mu": "×", "di": "÷", "bu": "•", "de": "°",
    "ga": "`", "aa": "´", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "or": "|", "<=": "≤", ">=": "≥",
    "!=": "≠", "->": "→", "<-": "←", "ba": "|", "br": "│", "ul": "_", "ru": "_",
}
# requests that break a paragraph; their arguments (if shown) come after
_GROFF_BREAK = {"PP", "LP", "P", "TP", "IP", "HP", "SH", "SS", "sp", "br", "RS", "RE", "TH", "nf", "fi", "TQ",
                "SY", "YS", "EX", "EE", "in", "ti", "bp", "ne", "PD", "Sh", "Ss", "Pp", "It", "Bl", "El"}
_GROFF_FONT = {"B", "I", "R", "SM", "SB", "BR", "RB", "BI", "IB", "IR", "RI", "UR", "MT", "Nm", "Ar", "Fl", "Cm"}


def _groff_inline(s: str) -> str:
    s = re.sub(r'\\".*$', "", s)  # comment to end of line
    s = re.sub(r"\\f(?:\[[^\]]*\]|\(..|.)", "", s)  # font changes
    s = re.sub(r"\\s[+-]?(?:\d+|\(\d\d|\[\d+\])", "", s)  # size changes
    s = re.sub(r"\\\((..)", lambda m: _GROFF_SPECIAL.get(m.group(1), ""), s)
    s = re.sub(r"\\\[([^\]]*)\]", lambda m: _GROFF_SPECIAL.get(m.group(1), ""), s)
    s = re.sub(r"\\\*(?:\(..|\[[^\]]*\]|.)", "", s)  # strings
    s = re.sub(r"\\n(?:\(..|\[[^\]]*\]|.)", "", s)  # number registers
    s = re.sub(r"\\[hvwlLoDXkzb]'[^']*'", "", s)  # motions, widths, ...
    s = s.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").replace("\\~", " ").replace("\\0", " ")
    s = re.sub(r"\\[&|^%c:)/,!{}]", "", s)
    s = s.replace("\\\\", "\\")
    return s


def _split_args(rest: str) -> list[str]:
    return [a[1:-1] if len(a) >= 2 and a[0] == a[-1] == '"' else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def _join_cjk(a: str, b: str) -> str:
    if not a:
        return b
    if not b:
        return a
    if (_is_han(a[-1]) or a[-1] in "，。、；：？！”）》") and (_is_han(b[0]) or b[0] in "，。、；：？！“（《"):
        return a + b
    return a + " " + b


def groff_paragraphs(src: str) -> list[str]:
    """Man-page groff -> text paragraphs (fill mode joined; Han text joined without spaces)."""
    paras: list[str] = []
    cur = ""
    in_macro_def = False
    ignore_until: str | None = None

    def flush() -> None:
        nonlocal cur
        t = re.sub(r"\s+", " ", cur).strip()
        if t:
            paras.append(t)
        cur = ""

    for line in src.split("\n"):
        if in_macro_def:
            if line.startswith(".."):
                in_macro_def = False
            continue
        if ignore_until is not None:
            if line.startswith("." + ignore_until):
                ignore_until = None
            continue
        if line.startswith((".\\\"", "'\\\"", '\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.']\s*(\S+)\s*(.*)$", line)
            if not m:
                continue
            req, rest = m.group(1), m.group(2)
            if req in ("de", "am", "ig"):
                if req == "ig":
                    ignore_until = rest.split()[0] if rest.split() else "."
                else:
                    in_macro_def = True
                continue
            if req in _GROFF_BREAK:
                flush()
                if req in ("SH", "SS", "Sh", "Ss") and rest:
                    cur = _groff_inline(" ".join(_split_args(rest)))
                    flush()
                elif req in ("IP", "TQ") and rest:
                    tag = _groff_inline(_split_args(rest)[0]) if _split_args(rest) else ""
                    cur = tag
                continue
            if req in _GROFF_FONT:
                args = [_groff_inline(a) for a in _split_args(rest)]
                sep = "" if len(req) == 2 and req.isupper() and req not in ("SM", "SB", "UR", "MT") else " "
                cur = _join_cjk(cur, sep.join(args))
                continue
            continue  # other requests (if/ie/el/so/ds/nr/ft/ad/na/hy/ta ...) carry no prose
        text = _groff_inline(line).strip()
        if not text:
            flush()
            continue
        cur = _join_cjk(cur, text)
    flush()
    return paras


def strip_groff(src: str, min_han_ratio: float = 0.3, min_chars: int = 8) -> str:
    """Man page -> text: the paragraphs whose Han ratio is at least ``min_han_ratio``, one per line."""
    return "\n".join(p for p in groff_paragraphs(src) if len(p) >= min_chars and han_ratio(p) >= min_han_ratio)


# ---------------------------------------------------------------------------------------------------------------
# Normalisation, dedupe, overlap

_FULLWIDTH_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")


def normalize_fullwidth_digits(s: str) -> str:
    """Full-width digits to ASCII; ``．`` between digits to ``.``, ``％`` after a digit to ``%``."""
    s = s.translate(_FULLWIDTH_DIGITS)
    s = re.sub(r"(?<=\d)．(?=\d)", ".", s)
    return re.sub(r"(?<=\d)％", "%", s)


def normalize_for_match(s: str) -> str:
    """Key for near-exact matching: NFKC, casefolded, letters and digits only (Han kept), no spaces/punctuation."""
    s = unicodedata.normalize("NFKC", s).casefold()
    return "".join(c for c in s if c.isalnum())


def _key(s: str) -> bytes:
    return hashlib.blake2b(normalize_for_match(s).encode(), digest_size=16).digest()


def dedupe_indices(texts: Iterable[str]) -> list[int]:
    """Indices of the first occurrence of each text, where texts equal after :func:`normalize_for_match`
    (so exact duplicates and whitespace/case/punctuation variants) count as one. Empty keys are dropped."""
    seen: set[bytes] = set()
    keep = []
    for i, t in enumerate(texts):
        if not normalize_for_match(t):
            continue
        k = _key(t)
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return keep


def dedupe(texts: Sequence[str]) -> list[str]:
    """Texts without exact or near-exact duplicates, first occurrence kept, order preserved."""
    return [texts[i] for i in dedupe_indices(texts)]


class OverlapError(AssertionError):
    """A held-out text occurs in the training corpus."""


def find_overlaps(heldout: Sequence[str], corpus: Sequence[str], min_chars: int = 16) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` where held-out text ``i`` occurs inside corpus document ``j`` after
    :func:`normalize_for_match` (so reformatting, case or punctuation changes do not hide a leak).
    Held-out texts whose key is shorter than ``min_chars`` are compared by equality only."""
    keys = [normalize_for_match(d) for d in corpus]
    starts, pos = [], 0
    for k in keys:
        starts.append(pos)
        pos += len(k) + 1
    big = "\x00".join(keys)
    exact = {k: j for j, k in reversed(list(enumerate(keys)))}
    hits: set[tuple[int, int]] = set()
    for i, h in enumerate(heldout):
        needle = normalize_for_match(h)
        if not needle:
            continue
        if len(needle) < min_chars:
            if needle in exact:
                hits.add((i, exact[needle]))
            continue
        at = big.find(needle)
        while at != -1:
            hits.add((i, bisect.bisect_right(starts, at) - 1))
            at = big.find(needle, at + 1)
    return sorted(hits)


def assert_disjoint(heldout: Sequence[str], corpus: Sequence[str], what: str = "held-out", min_chars: int = 16):
    """Raise :class:`OverlapError` if any held-out text occurs in the corpus (see :func:`find_overlaps`)."""
    hits = find_overlaps(heldout, corpus, min_chars=min_chars)
    if hits:
        i, j = hits[0]
        raise OverlapError(f"{len(hits)} {what} item(s) occur in the corpus; first: held-out #{i} "
                           f"{heldout[i][:80]!r} in corpus document #{j}")
