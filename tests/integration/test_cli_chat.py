"""``local-llm-kit chat`` on the embedded model: a session longer than the context goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_chat_longer_than_the_context_goes_on(cache_dir: Path) -> None:
    # 80 tokens of context hold about two turns of this session: the oldest are left out (the
    # client's memory), where the session used to end with a TokenLimitError on its third turn.
    turns = ["Hello there my friend", "Tell me more about that", "And more please", "Again"]
    env = {**os.environ, "LOCAL_LLM_KIT_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(
        [sys.executable, "-m", "local_llm_kit", "chat", "--context-length", "80", "--max-tokens", "12",
         "--temperature", "0", "--system", "Be brief."],
        input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.split("> ")[1:] if line.strip()]
    assert len(replies) == len(turns), (done.stdout, done.stderr)  # an unanswered turn prints an error instead
