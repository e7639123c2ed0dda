#!/usr/bin/env python3
"""Produce llama.cpp golden outputs for Gantry's Candle engine.

For each GGUF model this writes fixtures/goldens/<model-file-stem>.json with:
  * versions    - llama-cpp-python / llama.cpp build info and the GGUF SHA-256
  * model       - tokenizer facts read back from llama.cpp (add_bos, bos/eos, EOG set, ...)
  * tokenize    - llama.cpp tokenization of tricky strings (special=True and special=False)
  * detokenize  - llama.cpp detokenization of every ids list in `tokenize`
  * greedy      - greedy generations with the raw top-5 logits at every step

Greedy decoding uses an explicit eval loop (Llama.eval + argmax over the raw
logits that llama.cpp returned for the last position, read from Llama.scores
with logits_all=True). No sampler, penalty, temperature, top-k/top-p or
logit bias is involved. As a cross-check, the same prompt is also run through
llama-cpp-python's own high-level Llama.generate() (temp=0 -> llama.cpp's
greedy sampler, repeat_penalty=1.0) on a second context created with
logits_all=False (the default configuration); the ids must match and the
result is recorded as `high_level_generate_ids_match`.

Run with the peer venv (see scripts/goldens/README.md):
    .venv-peer/bin/python scripts/goldens/make_llamacpp_goldens.py
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import llama_cpp
from llama_cpp import Llama

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"
OUT_DIR = REPO_ROOT / "fixtures" / "goldens"

N_THREADS = 2
N_CTX = 2048
SEED = 0
N_NEW_TOKENS = 48
TOP_K_LOGITS = 5

# llama.cpp commit vendored by the pinned llama-cpp-python sdist (0.3.36). Used
# only when the commit cannot be read back from the built library itself.
PINNED_SDIST_LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

COMMON_TOKENIZE_TEXTS = [
    "",
    "Hello",
    " Hello",
    "Hello  world",
    "  leading spaces",
    "trailing space ",
    "line1\nline2\n\n",
    "tabs\tand\ttabs",
    "1234567890 3.14159",
    "naïve café — “quotes” 日本語 한국어",
    "👍🏽 family 👨‍👩‍👧",
    'fn main() {\n    println!("hi");\n}',
]

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

MODELS = [
    {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "special_texts": ["<|im_start|>user\nHi<|im_end|>\n"],
        "special_tokens_required": ["<|im_start|>", "<|im_end|>"],
        "prompts": [
            {
                "name": "chat_capital_of_france",
                "chat_messages": [
                    {"role": "system", "content": SMOL_SYSTEM},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
            },
            {
                "name": "chat_spider_legs",
                "chat_messages": [
                    {"role": "system", "content": SMOL_SYSTEM},
                    {"role": "user", "content": "How many legs does a spider have? Answer in one sentence."},
                ],
            },
            {"name": "quick_brown_fox", "text": "The quick brown fox"},
            {"name": "once_upon_a_time", "text": "Once upon a time,"},
            {"name": "code_fibonacci", "text": "def fibonacci(n):"},
            {"name": "numbers_count", "text": "1, 2, 3, 4, 5,"},
        ],
    },
    {
        "file": "gemma-3-270m-q4_k_m.gguf",
        "special_texts": ["<start_of_turn>user\nHi<end_of_turn>\n"],
        "special_tokens_required": ["<start_of_turn>", "<end_of_turn>"],
        "prompts": [
            {"name": "quick_brown_fox", "text": "The quick brown fox"},
            {"name": "once_upon_a_time", "text": "Once upon a time,"},
            {"name": "code_fibonacci", "text": "def fibonacci(n):"},
            {"name": "numbers_count", "text": "1, 2, 3, 4, 5,"},
            {"name": "capital_of_france", "text": "The capital of France is"},
            {
                "name": "turn_markup_capital_of_france",
                "text": "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
            },
        ],
    },
]


# --------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bytes_record(b: bytes) -> dict:
    try:
        text = b.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        text = b.decode("utf-8", errors="replace")
        valid = False
    return {"text": text, "utf8_valid": valid, "hex": b.hex()}


def library_build_info() -> dict:
    info: dict = {
        "llama_cpp_python": llama_cpp.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(llama_cpp, "llama_version"):
        try:
            info["llama_version"] = llama_cpp.llama_version().decode("utf-8", "replace")
        except Exception as e:  # pragma: no cover - depends on build
            info["llama_version_error"] = repr(e)
    try:
        info["system_info"] = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    except Exception as e:  # pragma: no cover
        info["system_info_error"] = repr(e)
    # ggml (part of the vendored llama.cpp tree) records the tree's git commit at build time.
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            info[name] = fn().decode("utf-8", "replace")
    except Exception as e:  # pragma: no cover - depends on build
        info["ggml_build_info_error"] = repr(e)
    info["llama_cpp_commit_vendored_by_sdist"] = PINNED_SDIST_LLAMA_CPP_COMMIT
    marker = REPO_ROOT / ".venv-peer" / ".llama-cpp-python-build"
    if marker.exists():
        info["build_marker"] = marker.read_text().strip()
    return info


def token_text(vocab, tid: int) -> str:
    raw = llama_cpp.llama_vocab_get_text(vocab, tid)
    return raw.decode("utf-8", "replace") if raw is not None else ""


def piece(vocab, tid: int, special: bool = True) -> bytes:
    """llama_token_to_piece(lstrip=0) with a buffer that grows as needed."""
    size = 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_token_to_piece(vocab, tid, buf, size, 0, special)
    if n < 0:
        size = -n + 1
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, tid, buf, size, 0, special)
    return bytes(buf.raw[:n])


def find_token_id(vocab, n_vocab: int, text: str) -> int | None:
    for tid in range(n_vocab):
        if token_text(vocab, tid) == text:
            return tid
    return None


def c_detokenize(vocab, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    if n < 0:
        size = -n + 1
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    return bytes(buf.raw[:n])


def render_chat_jinja(template: str, messages: list[dict], bos: str, eos: str) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=bos,
        eos_token=eos,
        raise_exception=raise_exception,
    )


def render_chat_llamacpp(template: str, messages: list[dict]) -> str:
    msgs = (llama_cpp.llama_chat_message * len(messages))()
    keep = []
    for i, m in enumerate(messages):
        role = m["role"].encode()
        content = m["content"].encode()
        keep += [role, content]
        msgs[i].role = role
        msgs[i].content = content
    size = 4096
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(template.encode(), msgs, len(messages), True, buf, size)
    if n < 0:
        raise RuntimeError("llama_chat_apply_template failed (template not recognised)")
    if n > size:
        size = n + 1
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template.encode(), msgs, len(messages), True, buf, size)
    return buf.raw[:n].decode("utf-8")


def top_k(logits: np.ndarray, k: int) -> list[list]:
    # Stable sort on -logit: ties are broken by the lower token id.
    idx = np.argsort(-logits, kind="stable")[:k]
    return [[int(i), float(logits[i])] for i in idx]


def clear_memory(llm: Llama) -> None:
    llm.reset()
    mem = llama_cpp.llama_get_memory(llm.ctx)
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)


# --------------------------------------------------------------------------- sections


def model_facts(llm: Llama) -> dict:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    md = llm.metadata
    keys = [
        "general.architecture",
        "general.name",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.add_space_prefix",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.unknown_token_id",
        "general.file_type",
    ]
    return {
        "n_vocab": n_vocab,
        "n_ctx_train": llm._model.n_ctx_train(),
        "n_embd": llm.n_embd(),
        "vocab_type": int(llama_cpp.llama_vocab_type(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "bos_id": int(llama_cpp.llama_vocab_bos(vocab)),
        "eos_id": int(llama_cpp.llama_vocab_eos(vocab)),
        "eot_id": int(llama_cpp.llama_vocab_eot(vocab)),
        "eog_ids": eog,
        "eog_texts": [token_text(vocab, t) for t in eog],
        "metadata": {k: md[k] for k in keys if k in md},
        "has_chat_template": "tokenizer.chat_template" in md,
    }


def tokenize_section(llm: Llama, add_bos: bool, texts: list[str]) -> tuple[list, list]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tok_records = []
    detok_records = []
    for text in texts:
        for special in (True, False):
            ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
            tok_records.append(
                {
                    "text": text,
                    "add_special": add_bos,
                    "special": special,
                    "ids": ids,
                    # llama_token_to_piece(special=True) of each id (utf-8, lossy for partial bytes)
                    "pieces": [piece(vocab, t).decode("utf-8", "replace") for t in ids],
                }
            )
            detok_records.append(
                {
                    "ids": ids,
                    "source_text": text,
                    "source_special": special,
                    # Llama.detokenize(ids): per-token llama_token_to_piece(special=False),
                    # concatenated; drops one leading space if ids[0] is BOS.
                    "detokenize": bytes_record(llm.detokenize(ids)),
                    "detokenize_special": bytes_record(llm.detokenize(ids, special=True)),
                    # llama.cpp C API llama_detokenize(remove_special=False, unparse_special=True)
                    "c_api_detokenize_unparse_special": bytes_record(c_detokenize(vocab, ids, False, True)),
                    # detokenize(ids minus the BOS that add_bos added, special=True) == text ?
                    "roundtrip_equal": llm.detokenize(
                        ids[1:] if add_bos and ids[:1] == [llama_cpp.llama_vocab_bos(vocab)] else ids, special=True
                    )
                    == text.encode("utf-8"),
                }
            )
    return tok_records, detok_records


def greedy_one(llm: Llama, prompt_ids: list[int], eos_id: int) -> dict:
    clear_memory(llm)
    n_vocab = llm.n_vocab()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    prompt_rows = np.array(llm.scores[: len(prompt_ids), :n_vocab], dtype=np.float32, copy=True)
    steps = []
    generated = []
    stop_reason = "length"
    for step in range(N_NEW_TOKENS):
        logits = np.array(llm.scores[llm.n_tokens - 1, :n_vocab], dtype=np.float32, copy=True)
        tok = int(np.argmax(logits))  # first max -> lowest id on ties
        steps.append(
            {
                "step": step,
                "position": llm.n_tokens - 1,
                "chosen_id": tok,
                "top5": top_k(logits, TOP_K_LOGITS),
                "logit_mean": float(logits.mean(dtype=np.float64)),
                "logit_std": float(logits.std(dtype=np.float64)),
            }
        )
        generated.append(tok)
        if tok == eos_id:
            stop_reason = "eos"
            break
        if step + 1 < N_NEW_TOKENS:
            llm.eval([tok])
    elapsed = time.perf_counter() - t0
    return {
        "generated_ids": generated,
        "stop_reason": stop_reason,
        "steps": steps,
        "prompt_top5": [top_k(prompt_rows[i], TOP_K_LOGITS) for i in range(len(prompt_ids))],
        "elapsed_s": round(elapsed, 3),
    }


def high_level_generate(llm2: Llama, prompt_ids: list[int], eos_id: int, n: int) -> list[int]:
    clear_memory(llm2)
    out = []
    for tok in llm2.generate(
        prompt_ids,
        top_k=1,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        temp=0.0,
        repeat_penalty=1.0,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        reset=True,
    ):
        out.append(int(tok))
        if tok == eos_id or len(out) >= n:
            break
    return out


def make_model(spec: dict, cross_check: bool) -> dict:
    path = MODELS_DIR / spec["file"]
    if not path.exists():
        raise SystemExit(f"missing {path}; run scripts/fetch-models.sh")
    print(f"== {spec['file']}", file=sys.stderr)
    sha = sha256_file(path)
    common = dict(
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=SEED,
        n_gpu_layers=0,
        verbose=False,
    )
    llm = Llama(model_path=str(path), logits_all=True, **common)
    facts = model_facts(llm)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = facts["add_bos"]
    eos_id = facts["eos_id"]

    # Special-token strings only if the tokens exist in this vocabulary.
    specials_present = {
        t: find_token_id(vocab, facts["n_vocab"], t) for t in spec["special_tokens_required"]
    }
    texts = list(COMMON_TOKENIZE_TEXTS)
    if all(v is not None for v in specials_present.values()):
        texts += spec["special_texts"]
    tok_records, detok_records = tokenize_section(llm, add_bos, texts)

    llm2 = None
    if cross_check:
        llm2 = Llama(model_path=str(path), logits_all=False, **common)

    template = llm.metadata.get("tokenizer.chat_template")
    greedy = []
    for p in spec["prompts"]:
        rec: dict = {"name": p["name"]}
        if "chat_messages" in p:
            if template is None:
                raise SystemExit(f"{spec['file']} has no chat template")
            bos_s = token_text(vocab, facts["bos_id"])
            eos_s = token_text(vocab, facts["eos_id"])
            prompt = render_chat_jinja(template, p["chat_messages"], bos_s, eos_s)
            rec["chat_messages"] = p["chat_messages"]
            rec["chat_template_renderer"] = "jinja2 (GGUF tokenizer.chat_template, trim_blocks, lstrip_blocks, add_generation_prompt=True)"
            try:
                rec["llama_chat_apply_template_equal"] = render_chat_llamacpp(template, p["chat_messages"]) == prompt
            except Exception as e:
                rec["llama_chat_apply_template_equal"] = None
                rec["llama_chat_apply_template_error"] = repr(e)
        else:
            prompt = p["text"]
        prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
        rec["prompt"] = prompt
        rec["prompt_ids"] = prompt_ids
        g = greedy_one(llm, prompt_ids, eos_id)
        rec["generated_ids"] = g["generated_ids"]
        rec["generated_text"] = llm.detokenize(g["generated_ids"]).decode("utf-8", "replace")
        rec["generated_text_special"] = llm.detokenize(g["generated_ids"], special=True).decode("utf-8", "replace")
        rec["generated_pieces"] = [piece(vocab, t).decode("utf-8", "replace") for t in g["generated_ids"]]
        rec["stop_reason"] = g["stop_reason"]
        rec["steps"] = g["steps"]
        rec["prompt_top5"] = g["prompt_top5"]
        # Smallest gap between the chosen logit and the runner-up over all steps:
        # tells how robust each greedy choice is to small numeric differences.
        gaps = [s["top5"][0][1] - s["top5"][1][1] for s in g["steps"]]
        rec["min_top1_top2_gap"] = min(gaps) if gaps else None
        rec["min_gap_step"] = int(np.argmin(gaps)) if gaps else None
        rec["steps_with_gap_below_0_1"] = [i for i, gap in enumerate(gaps) if gap < 0.1]
        if llm2 is not None:
            hl = high_level_generate(llm2, prompt_ids, eos_id, len(g["generated_ids"]))
            rec["high_level_generate_ids"] = hl
            rec["high_level_generate_ids_match"] = hl == g["generated_ids"]
        greedy.append(rec)
        print(
            f"   {p['name']}: {len(prompt_ids)} prompt ids -> {len(g['generated_ids'])} new ({g['stop_reason']}), "
            f"{g['elapsed_s']} s, min gap {rec['min_top1_top2_gap']:.4f}"
            + (f", high-level match={rec.get('high_level_generate_ids_match')}" if llm2 else ""),
            file=sys.stderr,
        )

    out = {
        "schema": "gantry-llamacpp-goldens/v1",
        "model_file": spec["file"],
        "versions": {**library_build_info(), "gguf_sha256": sha, "gguf_size_bytes": path.stat().st_size},
        "settings": {
            "backend": "llama.cpp CPU",
            "n_threads": N_THREADS,
            "n_threads_batch": N_THREADS,
            "n_ctx": N_CTX,
            "n_batch": 512,
            "seed": SEED,
            "logits_all": True,
            "flash_attn": False,
            "type_k": "f16",
            "type_v": "f16",
            "max_new_tokens": N_NEW_TOKENS,
            "decoding": "greedy argmax over raw logits (Llama.eval + Llama.scores), no sampler, no penalties; stop only at eos_id",
            "top_logits_per_step": TOP_K_LOGITS,
        },
        "model": {**facts, "special_tokens_present": specials_present},
        "tokenize": tok_records,
        "detokenize": detok_records,
        "greedy": greedy,
    }
    del llm
    if llm2 is not None:
        del llm2
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="only this model file name (repeatable)")
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    ap.add_argument("--no-cross-check", action="store_true", help="skip the Llama.generate() cross-check")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    for spec in MODELS:
        if args.model and spec["file"] not in args.model:
            continue
        data = make_model(spec, cross_check=not args.no_cross_check)
        dest = out_dir / (Path(spec["file"]).stem + ".json")
        tmp = dest.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, dest)
        print(f"wrote {dest}", file=sys.stderr)
        for g in data["greedy"]:
            if g.get("high_level_generate_ids_match") is False:
                ok = False
                print(f"WARNING: {spec['file']} {g['name']}: Llama.generate() ids differ from eval-loop ids", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
