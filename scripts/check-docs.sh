#!/usr/bin/env bash
# Builds the book (docs/, mdBook) and checks the links of the project's documentation:
#   1. `mdbook build docs` with the pinned mdbook that scripts/setup.sh installs into
#      .tools/mdbook; fails if it fails or prints any warning or error (an include that is
#      missing, unbalanced HTML, …);
#   2. every relative link in README.md, ARCHITECTURE.md and docs/src/**/*.md: the file or folder
#      it points to must exist, and a `#anchor` into a markdown file must match one of that
#      file's headings as GitHub and mdBook make their ids (lowercase; spaces become `-`;
#      punctuation other than `-` and `_` dropped; a repeated heading gets `-1`, `-2` …), with
#      mdBook's {{#include …}} expanded first, since an included file's headings are the chapter's.
# Installs nothing. Exits 1 listing every problem.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { printf 'check-docs: %s\n' "$*" >&2; }

mdbook="$root/.tools/mdbook/bin/mdbook"
if [[ ! -x "$mdbook" ]]; then
  say "no mdbook at .tools/mdbook/bin/mdbook: run scripts/setup.sh (it installs the pinned mdbook there)"
  exit 1
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
say "building the book with $("$mdbook" --version) (docs/ → docs/book/)"
if ! "$mdbook" build docs >"$log" 2>&1; then
  cat "$log" >&2
  say "mdbook build failed"
  exit 1
fi
# mdbook logs `INFO`, `WARN` and `ERROR` lines (and exits 0 after an include it could not
# read): a WARN or an ERROR is a problem to fix. Colour codes are dropped first.
output="$(sed 's/\x1b\[[0-9;]*m//g' "$log")"
if grep -Eq '(^|[[:space:]])(WARN|ERROR)[[:space:]]' <<<"$output"; then
  cat "$log" >&2
  say "mdbook printed warnings or errors (above): fix them"
  exit 1
fi

python3 - "$root" <<'PY'
"""Checks the relative links of the project's markdown files (see scripts/check-docs.sh)."""

import os
import re
import sys
import unicodedata
from urllib.parse import unquote

root = sys.argv[1]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CLOSE = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
INCLUDE = re.compile(r"\{\{#include\s+([^\s}]+)[^}]*\}\}")
ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
# A code span may run over lines, not over a blank line (a paragraph's end).
CODE_SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.S)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files():
    files = [os.path.join(root, "README.md"), os.path.join(root, "ARCHITECTURE.md")]
    for d, dirs, names in os.walk(os.path.join(root, "docs", "src")):
        dirs.sort()
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".md")]
    return [f for f in files if os.path.isfile(f)]


def prose_lines(text):
    """(line number, line) for each line outside fenced code blocks."""
    fence = None
    for n, line in enumerate(text.split("\n"), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield n, line
        else:
            c = CLOSE.match(line)
            if c and c.group(1)[0] == fence[0] and len(c.group(1)) >= len(fence):
                fence = None


def expanded(path, seen=()):
    """A file's text with mdBook's {{#include FILE}} directives replaced by the files."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path in seen:
        return text

    def include(m):
        target = os.path.normpath(os.path.join(os.path.dirname(path), m.group(1).split(":")[0]))
        return expanded(target, seen + (path,)) if os.path.isfile(target) else ""

    return INCLUDE.sub(include, text)


def slug(heading):
    """A heading's id as GitHub and mdBook make it."""
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", heading)  # images
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "").replace("*", "")
    out = []
    for ch in unicodedata.normalize("NFC", text.strip().lower()):
        if ch.isalnum() or ch in "-_":
            out.append(ch)
        elif ch.isspace():
            out.append("-")
    return "".join(out)


_anchors = {}


def anchors(path):
    """Every heading id of a markdown file (includes expanded), duplicates numbered."""
    if path not in _anchors:
        ids, used = set(), set()
        previous = ""
        for _, line in prose_lines(expanded(path)):
            heading = None
            m = ATX.match(line)
            if m:
                heading = m.group(2)
            elif SETEXT.match(line) and previous.strip() and not ATX.match(previous) and "|" not in previous:
                heading = previous.strip()
            previous = line
            if heading is None:
                continue
            base = slug(heading)
            candidate, n = base, 0
            while candidate in used:
                n += 1
                candidate = f"{base}-{n}"
            used.add(candidate)
            ids.add(candidate)
        _anchors[path] = ids
    return _anchors[path]


def links(path):
    """(line number, target) of every link in a file's prose (not in code); a link's text may
    run over several lines."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    kept = dict(prose_lines(text))
    # Code blocks become empty lines and code spans spaces, so offsets still give line numbers.
    prose = "\n".join(kept.get(n, "") for n in range(1, text.count("\n") + 2))
    prose = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    found = [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in INLINE.finditer(prose)]
    for n, line in enumerate(prose.split("\n"), 1):
        m = REFDEF.match(line)
        if m:
            found.append((n, m.group(1)))
    return sorted(found)


problems = []
checked = 0
for md in markdown_files():
    rel = os.path.relpath(md, root)
    for n, target in links(md):
        if SCHEME.match(target) or target.startswith("//"):
            continue  # another site: not checked here
        checked += 1
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        dest = md if file_part == "" else os.path.normpath(os.path.join(os.path.dirname(md), file_part))
        if not os.path.exists(dest):
            problems.append(f"{rel}:{n}: {target}: {os.path.relpath(dest, root)} does not exist")
            continue
        if anchor:
            if os.path.isdir(dest) or not dest.endswith(".md"):
                problems.append(f"{rel}:{n}: {target}: an anchor into a file that is not markdown")
            elif unquote(anchor) not in anchors(dest):
                problems.append(
                    f"{rel}:{n}: {target}: {os.path.relpath(dest, root)} has no heading with the id `{anchor}`"
                )

if problems:
    print(f"check-docs: {len(problems)} broken link(s):", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    sys.exit(1)
print(f"check-docs: the book builds without warnings; {checked} relative links checked, none broken", file=sys.stderr)
PY
