#!/usr/bin/env python3
"""Writes seed inputs for the `chat_template` fuzz target into fuzz/corpus/chat_template.

The target reads its input with `arbitrary` as `Input { template, messages, add_generation_prompt }`,
so a seed must be laid out the way `arbitrary` 1.x reads it: a string's byte length is taken
from the *end* of the data (1, 2 or 4 bytes, big-endian, depending on how much data is left),
its bytes from the front; each element of a `Vec` is preceded by a byte whose low bit says
"another one follows". This script writes that layout for real templates (the repository's
chat-template fixtures and the `tokenizer.chat_template` of the GGUF files under models/, when
present) over a short conversation.

Run from the repository root: python3 fuzz/chat_template_seeds.py
"""

import glob
import hashlib
import json
import os
import struct

OUT = "fuzz/corpus/chat_template"
# The target picks a role as ROLES[byte % 4].
ROLES = {"system": 0, "user": 1, "assistant": 2, "tool": 3}

CONVERSATION = [
    ("system", "You are a helpful assistant."),
    ("user", "Hello! What is 2 + 2?"),
    ("assistant", "2 + 2 = 4."),
    ("user", "And in French, s'il vous pla\u00eet?"),
]


def length_bytes(value, remaining):
    """The bytes `arbitrary` reads from the end of `remaining` bytes to get `value` back."""
    if remaining <= 1:
        raise ValueError("no room for a length")
    width = 1 if remaining <= 0x100 else 2 if remaining <= 0x10001 else 4
    delta = remaining - width  # lengths are taken modulo delta + 1
    assert value <= delta
    used = 1
    while used < width and delta >> (8 * used):
        used += 1
    return value.to_bytes(used, "big") + bytes(width - used)


def encode(template, messages, add_generation_prompt):
    strings = [template.encode()] + [c.encode() for _, c in messages]
    front = bytearray(strings[0])
    unread_front = []  # front bytes not yet read when each length is read
    for role, content in messages:
        front += bytes([1, ROLES[role]]) + content.encode()
    front += bytes([0, 1 if add_generation_prompt else 0])
    consumed = 0
    for i, s in enumerate(strings):
        unread_front.append(len(front) - consumed)
        consumed += len(s) + 2  # the string, then the next element's "more" and role bytes
    # Widths depend on what remains, which depends on the widths: iterate to a fixed point.
    widths = [1] * len(strings)
    for _ in range(8):
        tails = []
        for i in range(len(strings)):
            remaining = unread_front[i] + sum(widths[i:])
            tails.append(length_bytes(len(strings[i]), remaining))
        new = [len(t) for t in tails]
        if new == widths:
            break
        widths = new
    # The first length read is the last bytes of the input.
    return bytes(front) + b"".join(reversed(tails))


def gguf_chat_template(path):
    """`tokenizer.chat_template` from a GGUF file's metadata, or None."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        data = f.read(16 << 20)
    pos = 8
    _, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def read_str():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8
        pos += n
        return data[pos - n : pos]

    def skip(ty):
        nonlocal pos
        if ty == 8:
            read_str()
        elif ty == 9:
            elem, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                skip(elem)
        else:
            pos += sizes[ty]

    for _ in range(n_kv):
        key = read_str().decode()
        (ty,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if key == "tokenizer.chat_template" and ty == 8:
            return read_str().decode()
        skip(ty)
    return None


# Short templates using what real ones use (macros, namespaces, loops, filters, tojson).
SNIPPETS = [
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "{% macro turn(m) %}[{{ m.role | upper }}] {{ m.content | trim }}{% endmacro %}"
    "{% for m in messages %}{{ turn(m) }}{% if not loop.last %}\\n{% endif %}{% endfor %}",
    "{% set ns = namespace(sys='', n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.sys = m.content %}{% else %}{% set ns.n = ns.n + 1 %}{{ ns.sys ~ m.content }}{% endif %}{% endfor %}{{ ns.n }}",
    "{{ messages | tojson(indent=2) }}{{ messages | map(attribute='content') | join(', ') }}",
    "{% for m in messages %}{{ loop.index0 }}:{{ loop.cycle('a', 'b') }}:{{ m.content.split(' ') | length }}"
    "{{ m.content.strip().startswith('H') }}{% endfor %}{{ raise_exception('no') if messages | length > 8 }}",
    "{% for m in messages | reverse %}{{ m.content[:5] }}{{ m.content | replace('a', 'b') | indent(2) }}{% endfor %}"
    "{{ strftime_now('%Y-%m-%d') }}{{ range(3) | list | batch(2) | list }}{{ [1, 2, 3] | slice(2) | list }}",
    # Formatting and Python's string methods, which size their result from their arguments.
    "{% for m in messages %}{{ '%-8s|%05.2f|%(n)x' | format(m.role, loop.index / 3, n=loop.index) }}"
    "{{ '{:>10}|{:+.3e}|{:,}'.format(m.role, loop.length / 7, 1234567) }}{{ m.content.replace(' ', '_') }}"
    "{{ ', '.join(m.content.split(' ')) }}{% endfor %}",
]

# Templates that stop an in-process renderer (docs/fuzzing.md, findings 5-7); the target renders
# in a child, so these must cost only that child.
HOSTILE = [
    "{% set n = 1000000000000 %}{{ ([] * n) ~ '' }}",
    "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}",
    "{% macro grow(s, n) %}{% if n %}{{ grow(s ~ s, n - 1) }}{% else %}{{ s | length }}{% endif %}{% endmacro %}{{ grow('ab', 40) }}",
]


def templates():
    yield from SNIPPETS
    yield from HOSTILE
    for path in sorted(glob.glob("fixtures/chat-templates/templates/*.jinja")):
        with open(path) as f:
            yield f.read()
    for path in sorted(glob.glob("fixtures/chat-templates/*.json")):
        with open(path) as f:
            yield json.load(f)["template"]
    for path in sorted(glob.glob("models/*.gguf")):
        t = gguf_chat_template(path)
        if t:
            yield t


def main():
    os.makedirs(OUT, exist_ok=True)
    n = 0
    for template in templates():
        for messages, agp in [(CONVERSATION, True), (CONVERSATION[1:2], False)]:
            seed = encode(template, messages, agp)
            name = hashlib.sha1(seed).hexdigest()
            with open(os.path.join(OUT, name), "wb") as f:
                f.write(seed)
            n += 1
    print(f"wrote {n} seeds to {OUT}")


if __name__ == "__main__":
    main()
