"""OpenAI's official Python client against Gantry's OpenAI-compatible HTTP API.

    python openai_client.py BASE_URL MODEL FIRST_TOKEN_ID

Prints one JSON object with what each call returned, for tests/openai_python.rs to check.
"""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
out = {}

out["models"] = [m.id for m in client.models.list().data]

# A streamed chat, with usage in the last chunk.
text, finish, usage, chunks, roles = "", None, None, 0, []
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        text += c.delta.content or ""
        finish = c.finish_reason or finish
out["stream"] = {"text": text, "finish_reason": finish, "usage": usage, "chunks": chunks, "roles": roles,
                 "object": chunk.object}

# The same chat whole.
r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0, max_tokens=24)
out["chat"] = {"text": r.choices[0].message.content, "role": r.choices[0].message.role,
               "finish_reason": r.choices[0].finish_reason, "usage": r.usage.model_dump(), "object": r.object,
               "id": r.id}

# A plain completion, cut by max_tokens, and one cut by a stop sequence.
r = client.completions.create(model=model, prompt="The three primary colors are", max_tokens=8, temperature=0)
out["completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                     "usage": r.usage.model_dump(), "object": r.object}
r = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
out["stopped"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}

# Seeded sampling repeats itself.
seeded = [client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Tell me a short story."}],
    temperature=0.9, seed=42, max_tokens=20).choices[0].message.content for _ in range(2)]
out["seeded_equal"] = seeded[0] == seeded[1]

# Log-probabilities: a chat with the 3 best alternatives per token, whole and streamed, and a
# legacy completion with 2.
q = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=q, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
out["chat_logprobs"] = {"text": r.choices[0].message.content,
                        "content": [c.model_dump() for c in r.choices[0].logprobs.content]}
streamed = []
for chunk in client.chat.completions.create(model=model, messages=q, temperature=0, max_tokens=8, logprobs=True,
                                            top_logprobs=3, stream=True):
    for c in chunk.choices:
        if c.logprobs is not None and c.logprobs.content:
            streamed.extend(e.model_dump() for e in c.logprobs.content)
out["chat_logprobs_streamed"] = streamed
r = client.completions.create(model=model, prompt="The three primary colors are", max_tokens=6, temperature=0, logprobs=2)
lp = r.choices[0].logprobs
out["completion_logprobs"] = {"text": r.choices[0].text, "tokens": lp.tokens, "token_logprobs": lp.token_logprobs,
                              "top_logprobs": lp.top_logprobs, "text_offset": lp.text_offset}
# Penalties: a greedy count that repeats itself, without and with a frequency penalty; and a
# logit bias banning the token greedy decoding picks first.
count = "1 1 1 1 1 1 1 1"
plain = client.completions.create(model=model, prompt=count, max_tokens=12, temperature=0, logprobs=0)
penalised = client.completions.create(model=model, prompt=count, max_tokens=12, temperature=0, logprobs=0,
                                      frequency_penalty=2.0, presence_penalty=1.0)
out["penalties"] = {"plain": plain.choices[0].logprobs.tokens, "penalised": penalised.choices[0].logprobs.tokens}
# The first token greedy decoding picks (its id from the gRPC API: argv[3]), then banned.
first = client.chat.completions.create(model=model, messages=q, temperature=0, max_tokens=1, logprobs=True, top_logprobs=2)
first = first.choices[0].logprobs.content[0]
biased = client.chat.completions.create(model=model, messages=q, temperature=0, max_tokens=1, logprobs=True,
                                        top_logprobs=2, logit_bias={sys.argv[3]: -100})
out["logit_bias"] = {"first": first.token, "second_best": first.top_logprobs[1].token,
                     "biased": biased.choices[0].logprobs.content[0].token}

# Errors, as the client raises them.
def error(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"status": e.status_code, "type": type(e).__name__, "message": e.body.get("message") if isinstance(e.body, dict) else str(e.body)}
    return None

out["bad_temperature"] = error(lambda: client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], temperature=5))
out["unknown_model"] = error(lambda: client.chat.completions.create(
    model="nope", messages=[{"role": "user", "content": "Hi"}]))
out["empty_messages"] = error(lambda: client.chat.completions.create(model=model, messages=[]))
out["too_long"] = error(lambda: client.completions.create(model=model, prompt="word " * 3000, max_tokens=4))

# Fields Gantry does not do are refused by name, never ignored.
def refused(call):
    try:
        call()
    except openai.BadRequestError as e:
        return {"status": e.status_code, "param": e.param, "code": e.code, "message": e.message}
    return None

hi = [{"role": "user", "content": "Hi"}]
tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
out["refused"] = {
    "tools": refused(lambda: client.chat.completions.create(model=model, messages=hi, tools=[tool])),
    "response_format": refused(lambda: client.chat.completions.create(
        model=model, messages=hi, response_format={"type": "json_object"})),
    "echo": refused(lambda: client.completions.create(model=model, prompt="Hi", echo=True)),
    "unknown": refused(lambda: client.chat.completions.create(model=model, messages=hi, extra_body={"frobnicate": 1})),
    "top_logprobs_alone": refused(lambda: client.chat.completions.create(model=model, messages=hi, top_logprobs=2)),
}
print(json.dumps(out))
