#!/usr/bin/env python3
"""Exact (float64) reference logits for the real GGUF models, from their dequantized weights.

llama.cpp and Gantry both quantize activations to 8 bits inside quantized matrix products, so
each differs from exact arithmetic on the same weights by a few tenths of a logit. Where the two
engines pick different greedy tokens, this reference says which choices are genuine near-ties.

For every greedy case of fixtures/goldens/<model>.json it runs the prompt plus llama.cpp's
continuation through a float64 NumPy implementation of the model (SmolLM2: LLaMA; Gemma 3) with
the GGUF's dequantized weights, and writes, for each generated step, the exact top-32
(token, logit) pairs to fixtures/goldens/<model>.exact.json.

Run with the fixtures virtualenv (numpy + gguf):
  .venv-fixtures/bin/python scripts/goldens/exact_reference.py
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parents[2]
# Candidates kept per step: enough to place a token chosen in a flat distribution.
TOP = 32


def load(path):
    r = GGUFReader(str(path))
    weights = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float64)
        weights[t.name] = a.reshape([int(x) for x in reversed(t.shape)])
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("tokenizer."):
            continue
        try:
            meta[k] = f.contents()
        except Exception:
            pass
    return weights, meta


def rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope(x, pos, theta, interleaved):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang), np.sin(ang)
    if interleaved:  # adjacent pairs (llama.cpp's permuted LLaMA weights)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out
    h = d // 2  # halves (NeoX style)
    x0, x1 = x[..., :h], x[..., h:]
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], -1)


def attention(x, W, p, T, nh, nkv, hd, pos, theta, interleaved, scale, window, qk_norm=None):
    q = (x @ W[p + "attn_q.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
    k = (x @ W[p + "attn_k.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
    v = (x @ W[p + "attn_v.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
    if qk_norm is not None:
        q = rms(q, W[p + "attn_q_norm.weight"], qk_norm)
        k = rms(k, W[p + "attn_k_norm.weight"], qk_norm)
    q, k = rope(q, pos, theta, interleaved), rope(k, pos, theta, interleaved)
    k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & ((i - j) < window if window else True)
    s = q @ k.transpose(0, 2, 1) * scale + np.where(allowed, 0.0, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = (s @ v).transpose(1, 0, 2).reshape(T, nh * hd)
    return o @ W[p + "attn_output.weight"].T


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def forward_llama(W, m, ids):
    a = "llama"
    H, L = m[f"{a}.embedding_length"], m[f"{a}.block_count"]
    nh, nkv = m[f"{a}.attention.head_count"], m[f"{a}.attention.head_count_kv"]
    eps, theta = m[f"{a}.attention.layer_norm_rms_epsilon"], m[f"{a}.rope.freq_base"]
    hd, T = H // nh, len(ids)
    pos = np.arange(T, dtype=np.float64)
    x = W["token_embd.weight"][ids]
    for l in range(L):
        p = f"blk.{l}."
        x = x + attention(rms(x, W[p + "attn_norm.weight"], eps), W, p, T, nh, nkv, hd, pos, theta, True, 1 / math.sqrt(hd), None)
        h = rms(x, W[p + "ffn_norm.weight"], eps)
        g, u = h @ W[p + "ffn_gate.weight"].T, h @ W[p + "ffn_up.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ W[p + "ffn_down.weight"].T
    x = rms(x, W["output_norm.weight"], eps)
    out = W.get("output.weight", W["token_embd.weight"])
    return x @ out.T


def forward_gemma3(W, m, ids):
    a = "gemma3"
    H, L = m[f"{a}.embedding_length"], m[f"{a}.block_count"]
    nh, nkv = m[f"{a}.attention.head_count"], m[f"{a}.attention.head_count_kv"]
    hd = m[f"{a}.attention.key_length"]
    eps, theta = m[f"{a}.attention.layer_norm_rms_epsilon"], m[f"{a}.rope.freq_base"]
    window = m[f"{a}.attention.sliding_window"]
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    x = W["token_embd.weight"][ids] * math.sqrt(H)
    for l in range(L):
        p = f"blk.{l}."
        sliding = (l + 1) % 6 != 0  # 5 local layers per global one
        th, win = (10000.0, window) if sliding else (theta, None)
        att = attention(rms(x, W[p + "attn_norm.weight"], eps), W, p, T, nh, nkv, hd, pos, th, False, 1 / math.sqrt(hd), win, eps)
        x = x + rms(att, W[p + "post_attention_norm.weight"], eps)
        h = rms(x, W[p + "ffn_norm.weight"], eps)
        ff = (gelu_tanh(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
        x = x + rms(ff, W[p + "post_ffw_norm.weight"], eps)
    x = rms(x, W["output_norm.weight"], eps)
    return x @ W["token_embd.weight"].T


FORWARD = {"llama": forward_llama, "gemma3": forward_gemma3}


def main():
    for stem in ["SmolLM2-135M-Instruct.Q4_1", "gemma-3-270m-q4_k_m"]:
        golden = json.loads((ROOT / "fixtures/goldens" / f"{stem}.json").read_text())
        W, m = load(ROOT / "models" / f"{stem}.gguf")
        fwd = FORWARD[m["general.architecture"]]
        out = {"model_file": f"{stem}.gguf", "method": "float64 NumPy forward over the GGUF's dequantized weights", "cases": {}}
        for case in golden["greedy"]:
            prompt, cont = case["prompt_ids"], case["generated_ids"]
            logits = fwd(W, m, prompt + cont)
            steps = []
            for i in range(len(cont)):
                row = logits[len(prompt) - 1 + i]
                top = np.argsort(-row)[:TOP]
                steps.append([[int(t), round(float(row[t]), 6)] for t in top])
            out["cases"][case["name"]] = steps
            print(stem, case["name"], "done", file=sys.stderr)
        path = ROOT / "fixtures/goldens" / f"{stem}.exact.json"
        path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
