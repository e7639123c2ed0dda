#!/usr/bin/env python3
"""Writes the inputs of the fuzzing findings that were fixed (docs/fuzzing.md) into
fuzz/regressions/TARGET/, laid out as each target reads its input, so that the normal test
suite replays them (engine/tests/fuzz_replay.rs) beside the corpora. The crash artifacts
themselves are not kept (fuzz/artifacts is ignored); these are the same inputs, rebuilt from
the findings' descriptions and unit tests.

Run from the repository root: python3 fuzz/regressions.py
"""

import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chat_template_seeds import encode  # noqa: E402

OUT = "fuzz/regressions"


def write(target, name, data):
    os.makedirs(os.path.join(OUT, target), exist_ok=True)
    with open(os.path.join(OUT, target, name), "wb") as f:
        f.write(data)


# 1. GGUF: a header prefix claiming a 2^60-byte file and 2^40 tensors reserved room for every
#    claimed tensor (27 TB). The gguf target's prefix form: 8 bytes of claimed length, then the
#    bytes read.
prefix = b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 0)
write("gguf", "finding-1-prefix-claiming-2p40-tensors", struct.pack("<Q", 1 << 60) + prefix.ljust(40, b"\0"))

# 2. Config: a Gemma 3 config claiming 3,238,038,144 layers built a 13 GB list of its sliding
#    layers before the layer count was checked.
config = {"architectures": ["Gemma3ForCausalLM"], "attntn_size": 2, "num_hidden_layers": 3238038144}
write("config", "finding-2-gemma3-with-3-billion-layers", json.dumps(config).encode())

HI = [("user", "hi")]
# 3. Chat templates: filters whose argument sizes their result asked for terabytes at once.
for i, template in enumerate(
    [
        "{{ 'a\nb' | indent(1000000000000) }}",
        "{{ [1] | batch(1000000000000) | list }}",
        "{{ range(100000) | join('x' * 10000000) }}",
        "{{ '%s' | format('x' * 40000000) }}",
        "{{ ('x' * 10000000).replace('x', 'yyyyyyyy') }}",
    ]
):
    write("chat_template", f"finding-3-filter-sized-by-its-argument-{i}", encode(template, HI, True))
# 4. Chat templates: `format` on a message holding `%(` and a non-ASCII key panicked.
for i, content in enumerate(["%(\u00e9)s", "x %(caf\u00e9", "true %(}\n pla\u00eet"]):
    template = "{{ messages[0]['content'] | format(a=1) }}"
    write("chat_template", f"finding-4-format-non-ascii-key-{i}", encode(template, [("user", content)], True))
# 8. Chat templates: a width or precision past 65535 panicked in Rust's formatting.
for i, template in enumerate(["{{ '%.70000e' | format(1.5) }}", "{{ '{:.70000e}'.format(1.5) }}", "{{ '%70000d' | format(1) }}"]):
    write("chat_template", f"finding-8-format-precision-past-65535-{i}", encode(template, HI, True))
# 9. Chat templates: a backwards slice starting before its stop underflowed in minijinja
#    (found replaying the corpus in a build with overflow checks).
write("chat_template", "finding-9-backwards-slice-underflow", encode("{{ messages[0]['content'][0:2:-1] }}", HI, True))
print("wrote", sum(len(files) for _, _, files in os.walk(OUT)), "regression inputs under", OUT)
