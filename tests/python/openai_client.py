"""OpenAI's official Python client against Gantry's OpenAI-compatible HTTP API.

    python openai_client.py BASE_URL MODEL

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
print(json.dumps(out))
