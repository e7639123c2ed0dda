#!/usr/bin/env python3
"""llama.cpp peer benchmark (llama-cpp-python low-level API, CPU).

Measures, in this (fresh) process:
  * load_s            - time to construct the model + context (llama_cpp.Llama(...))
  * prefill           - one llama_decode() of exactly --prompt-tokens tokens
                        (prefill_tokens_per_s = prompt_tokens / prefill_s)
  * ttft_s            - prompt decode + first greedy sample (llama.cpp greedy sampler)
  * decode            - --gen-tokens greedy tokens in total; the gen_tokens-1 tokens after
                        the first each need one single-token llama_decode() + sample;
                        decode_tokens_per_s = (gen_tokens - 1) / (t_last_token - t_first_token).
                        EOS is ignored, so the requested count is always generated.
  * peak_rss_bytes    - resource.getrusage(RUSAGE_SELF).ru_maxrss * 1024 at the end
                        (whole process: Python + numpy + llama.cpp + touched mmap'd weights + KV cache)

Each repeat clears the KV cache and redoes prefill + decode. An untimed warm-up
iteration (default 1) runs first so that page faults on the mmap'd weights are
not charged to the first timed run. Reports every run and the median.

Usage:
  .venv-peer/bin/python bench/peer/llamacpp_bench.py --model models/X.gguf --threads 2 \
      --prompt-tokens 128 --gen-tokens 128 --repeat 3 --json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import sys
import time

T_START = time.perf_counter()

import numpy as np  # noqa: E402

import llama_cpp  # noqa: E402

T_IMPORTED = time.perf_counter()

# Fixed English text used to build the prompt; repeated as needed, then cut to
# exactly --prompt-tokens tokens (counting the BOS token when the model adds one).
PROMPT_TEXT = (
    "The history of the lighthouse is a history of people trying to make the sea a little less dangerous. "
    "Long before electric lamps and automatic machinery, keepers climbed narrow stairs every evening to trim "
    "wicks, polish lenses and wind the clockwork that turned the great lights. A good keeper knew the moods of "
    "the weather better than anyone in the village below. He could tell from the colour of the sky at dusk "
    "whether the night would bring fog, and from the sound of the waves against the rocks whether a storm was "
    "coming from the west or from the north. The work was lonely and repetitive, but it mattered: a single "
    "missed night could mean a ship driven onto the reef, its crew lost and its cargo scattered along the shore. "
    "Over the years the technology changed. Oil lamps gave way to paraffin, paraffin to gas, and gas at last to "
    "electricity. The heavy glass lenses, designed by engineers who understood how to bend light into a narrow "
    "beam that could be seen many miles away, remained in use for more than a century. Today most lighthouses "
    "are automated, watched over by sensors and radio links rather than by families who lived at the foot of "
    "the tower. Some have become museums, where visitors climb the same stairs the keepers once climbed and look "
    "out over the same grey water. Others stand empty, their lights still turning, their rooms silent. Yet the "
    "idea behind them has not changed at all: somewhere in the dark, a steady light tells a traveller where the "
    "danger lies and which way leads safely home. "
)


def rss_now_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_prompt(llm: "llama_cpp.Llama", n: int, add_bos: bool) -> list[int]:
    text = PROMPT_TEXT
    while True:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        if len(ids) >= n:
            return ids[:n]
        text += PROMPT_TEXT


def decode(ctx, ids: list[int]) -> None:
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    # llama_batch_get_one: positions follow the KV cache; logits for the last token only.
    rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids)))
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def one_run(llm, sampler, prompt: list[int], gen_tokens: int) -> dict:
    ctx = llm.ctx
    mem = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_clear(mem, True)
    llama_cpp.llama_sampler_reset(sampler)
    llama_cpp.llama_perf_context_reset(ctx)

    t0 = time.perf_counter()
    decode(ctx, prompt)
    t_prefill = time.perf_counter()
    tok = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
    t_first = time.perf_counter()
    generated = [int(tok)]
    one = (llama_cpp.llama_token * 1)()
    for _ in range(gen_tokens - 1):
        one[0] = tok
        rc = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        tok = llama_cpp.llama_sampler_sample(sampler, ctx, -1)
        generated.append(int(tok))
    t_end = time.perf_counter()

    perf = llama_cpp.llama_perf_context(ctx)
    prefill_s = t_prefill - t0
    decode_s = t_end - t_first
    n_dec = gen_tokens - 1
    return {
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": len(prompt) / prefill_s,
        "ttft_s": t_first - t0,
        "decode_s": decode_s,
        "decode_tokens_per_s": (n_dec / decode_s) if n_dec > 0 and decode_s > 0 else None,
        "e2e_s": t_end - t0,
        "generated_tokens": len(generated),
        "first_generated_ids": generated[:8],
        "llama_perf": {
            "t_p_eval_ms": perf.t_p_eval_ms,
            "n_p_eval": perf.n_p_eval,
            "t_eval_ms": perf.t_eval_ms,
            "n_eval": perf.n_eval,
        },
    }


def median_of(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r[key] is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations before the timed ones")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--flash-attn", action="store_true", help="enable flash attention (default: off, as in the goldens)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()

    if args.prompt_tokens < 1 or args.gen_tokens < 1:
        ap.error("--prompt-tokens and --gen-tokens must be >= 1")
    if args.prompt_tokens + args.gen_tokens > args.n_ctx:
        ap.error("--prompt-tokens + --gen-tokens must fit in --n-ctx")
    n_batch = max(args.n_batch, args.prompt_tokens)  # prefill is one llama_decode call

    loadavg_start = os.getloadavg()
    rss_before_load = rss_now_bytes()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_gpu_layers=0,
        n_ctx=args.n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        seed=0,
        logits_all=False,
        flash_attn=args.flash_attn,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    rss_after_load = rss_now_bytes()

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    prompt = build_prompt(llm, args.prompt_tokens, add_bos)
    assert len(prompt) == args.prompt_tokens

    sparams = llama_cpp.llama_sampler_chain_default_params()
    sampler = llama_cpp.llama_sampler_chain_init(sparams)
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())

    for _ in range(args.warmup):
        one_run(llm, sampler, prompt, args.gen_tokens)
    runs = [one_run(llm, sampler, prompt, args.gen_tokens) for _ in range(args.repeat)]
    llama_cpp.llama_sampler_free(sampler)

    result = {
        "engine": "llama.cpp",
        "binding": f"llama-cpp-python {llama_cpp.__version__}",
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        "model": os.path.basename(args.model),
        "model_size_bytes": os.path.getsize(args.model),
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "n_ctx": args.n_ctx,
        "n_batch": n_batch,
        "flash_attn": args.flash_attn,
        "add_bos": add_bos,
        "sampling": "greedy (llama_sampler_init_greedy), EOS ignored",
        "import_s": T_IMPORTED - T_START,
        "load_s": load_s,
        "median": {
            k: median_of(runs, k)
            for k in ("prefill_s", "prefill_tokens_per_s", "ttft_s", "decode_s", "decode_tokens_per_s", "e2e_s")
        },
        "runs": runs,
        "rss_before_load_bytes": rss_before_load,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak_rss_bytes(),
        # System load (1/5/15 min) at start and end: this is a shared 2-core machine,
        # anything else running skews the numbers.
        "loadavg_start": list(loadavg_start),
        "loadavg_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
    }
    llm.close()

    if args.json:
        print(json.dumps(result))
    else:
        m = result["median"]
        print(f"model            {result['model']}")
        print(f"threads          {args.threads}   prompt {args.prompt_tokens}   gen {args.gen_tokens}   repeat {args.repeat}")
        print(f"load             {load_s:.3f} s")
        print(f"prefill          {m['prefill_tokens_per_s']:.1f} tok/s ({m['prefill_s'] * 1000:.1f} ms)")
        print(f"ttft             {m['ttft_s'] * 1000:.1f} ms")
        if m["decode_tokens_per_s"] is not None:
            print(f"decode           {m['decode_tokens_per_s']:.1f} tok/s")
        print(f"peak rss         {result['peak_rss_bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
