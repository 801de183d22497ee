"""The llama.cpp backend on the real embedded SmolLM2 and the packaged Gemma 3 270M."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai.types.chat as oai
import pytest

from local_llm_kit import LLMClient, TokenLimitError

pytestmark = pytest.mark.integration
llama_cpp = pytest.importorskip("llama_cpp")

QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client(cache_dir: Path) -> Iterator[LLMClient]:
    with LLMClient("smollm2-135m-instruct", temperature=0, cache_dir=cache_dir).load() as loaded:
        yield loaded


EXIT_SCRIPT = """
import atexit, sys

def report():  # registered before the library loads anything, so it runs after the library's handler
    import local_llm_kit.engine as engines
    print("loaded at exit:", len(engines.loaded_engines()), "closed:", engine.closed, flush=True)

atexit.register(report)
from local_llm_kit import LLMClient

client = LLMClient("smollm2-135m-instruct", backend="llama.cpp", cache_dir=sys.argv[1]).load()
engine = client.engine
client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
"""


def test_a_model_left_loaded_is_unloaded_at_exit_before_teardown(cache_dir: Path) -> None:
    # A script that never closes its client: the model must be freed while llama.cpp's module is
    # whole, not during interpreter teardown (where llama-cpp-python's Llama.__del__ fails).
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(cache_dir)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "loaded at exit: 0 closed: True" in done.stdout
    assert "Exception ignored" not in done.stderr


def test_greedy_output_equals_llama_cpp_pythons_own(client: LLMClient) -> None:
    prompt = client.engine.encode(QUESTION)
    reference = llama_cpp.Llama(model_path=str(client.resolved_model.path), n_ctx=2048, verbose=False)
    theirs = reference.create_completion(prompt=prompt, max_tokens=40, temperature=0.0, repeat_penalty=1.0)
    ours = client.chat.completions.create(messages=QUESTION, max_tokens=40)
    assert ours.choices[0].message.content == theirs["choices"][0]["text"]
    assert ours.usage.prompt_tokens == theirs["usage"]["prompt_tokens"] == len(prompt)
    reference.close()


def test_response_validates_with_the_openai_package(client: LLMClient) -> None:
    response = client.chat.completions.create(messages=QUESTION, max_tokens=16, logprobs=True, top_logprobs=2)
    parsed = oai.ChatCompletion.model_validate_json(response.model_dump_json())
    assert parsed.choices[0].finish_reason in ("stop", "length")
    assert parsed.usage is not None and parsed.usage.completion_tokens == 16


def test_stream_concatenates_to_the_non_streamed_text(client: LLMClient) -> None:
    whole = client.chat.completions.create(messages=QUESTION, max_tokens=48)
    chunks = list(client.chat.completions.create(messages=QUESTION, max_tokens=48, stream=True))
    for chunk in chunks:
        oai.ChatCompletionChunk.model_validate_json(chunk.model_dump_json())
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_seed_makes_sampling_reproducible(client: LLMClient) -> None:
    def sample(seed: int) -> str:
        r = client.chat.completions.create(messages=QUESTION, temperature=1.0, top_p=0.95, seed=seed, max_tokens=24)
        return r.choices[0].message.content or ""

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in range(4)}) > 1


def test_stop_string_never_leaks(client: LLMClient) -> None:
    whole = client.chat.completions.create(messages=QUESTION, max_tokens=48).choices[0].message.content or ""
    word = whole.split()[2]
    stopped = client.chat.completions.create(messages=QUESTION, max_tokens=48, stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == whole[: whole.index(word)]


def test_over_long_prompt_raises_token_limit_error(cache_dir: Path) -> None:
    small = LLMClient("smollm2-135m-instruct", context_length=64, cache_dir=cache_dir)
    with pytest.raises(TokenLimitError) as info:
        small.chat.completions.create(messages=[{"role": "user", "content": "word " * 200}])
    assert info.value.context_length == 64 and info.value.prompt_tokens > 200


def test_gemma_loads_with_its_fallback_template(cache_dir: Path) -> None:
    gemma = LLMClient("gemma-3-270m", temperature=0, cache_dir=cache_dir)
    response = gemma.chat.completions.create(messages=QUESTION, max_tokens=12)
    assert gemma.engine.template.is_fallback
    assert response.usage.completion_tokens <= 12
    assert response.usage.prompt_tokens == len(gemma.engine.encode(QUESTION))
    assert gemma.engine.encode(QUESTION)[:2] == [gemma.engine.backend.info.bos_token_id, 105]  # <start_of_turn>


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_model_file_raises_a_clear_error(client: LLMClient, tmp_path: Path, damage: str) -> None:
    source = client.resolved_model.path.read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(source[: len(source) // 3] if damage == "truncate" else b"GGUF" + b"\x07" * 4096)
    code = (
        "from local_llm_kit import LLMClient, ModelLoadError\n"
        f"try:\n    LLMClient({str(broken)!r}).load()\n"
        "except ModelLoadError as exc:\n    print('ModelLoadError', exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ModelLoadError" in run.stdout and "broken.gguf" in run.stdout


def test_clients_of_the_same_weights_share_one_loaded_model(client: LLMClient, cache_dir: Path) -> None:
    twin = LLMClient("smollm2-135m-instruct", temperature=0.2, cache_dir=cache_dir)
    assert twin.engine is client.engine
    other_context = LLMClient("smollm2-135m-instruct", context_length=1024, cache_dir=cache_dir)
    assert other_context.engine is not client.engine
