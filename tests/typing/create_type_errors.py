"""Each marked line must be a mypy error (tests/unit/test_typing.py checks the line numbers)."""

from __future__ import annotations

from local_llm_kit import LLMClient

client = LLMClient()
messages = [{"role": "user", "content": "Hi"}]

client.chat.completions.create(messages=messages, max_token=5)  # E: misspelled parameter
client.chat.completions.create(messages=messages, temperature="hot")  # E: wrong type
client.chat.completions.create(messages=messages, audio={"voice": "x"})  # E: unsupported parameter
client.chat.completions.create(temperature=0)  # E: messages is required
client.chat.completions.create(messages=messages, stream="yes")  # E: stream is a bool
