from pathlib import Path

import pytest

from local_llm_kit import InvalidRequestError, LLMClient
from local_llm_kit.config import resolve_settings

DEFAULTS = dict(model=None, model_path=None, backend=None, context_length=None, temperature=0.7, top_p=0.9,
                cache_dir=None, n_threads=None, dtype=None, device=None)


def test_defaults() -> None:
    s = resolve_settings(**DEFAULTS, environ={})
    assert (s.model, s.backend, s.context_length, s.temperature, s.top_p) == (
        "smollm2-135m-instruct", "llama.cpp", 2048, 0.7, 0.9)
    assert s.cache_dir == Path.home() / ".cache" / "local_llm_kit"


def test_environment_beats_defaults_and_arguments_beat_environment() -> None:
    env = {"LOCAL_LLM_KIT_BACKEND": "transformers", "LOCAL_LLM_KIT_CONTEXT_LENGTH": "4096",
           "LOCAL_LLM_KIT_MODEL_PATH": "/models", "LOCAL_LLM_KIT_CACHE_DIR": "/tmp/c"}
    s = resolve_settings(**DEFAULTS, environ=env)
    assert (s.backend, s.context_length, s.model_path, s.cache_dir) == ("transformers", 4096, "/models", Path("/tmp/c"))
    args = {**DEFAULTS, "backend": "llama.cpp", "context_length": 512, "model_path": "/x", "cache_dir": "/y"}
    s = resolve_settings(**args, environ=env)
    assert (s.backend, s.context_length, s.model_path, s.cache_dir) == ("llama.cpp", 512, "/x", Path("/y"))


@pytest.mark.parametrize(("name", "value"), [("LOCAL_LLM_KIT_CONTEXT_LENGTH", "lots"),
                                             ("LOCAL_LLM_KIT_CONTEXT_LENGTH", "-5"),
                                             ("LOCAL_LLM_KIT_BACKEND", "vllm"),
                                             ("LOCAL_LLM_KIT_N_GPU_LAYERS", "-5"),
                                             ("LOCAL_LLM_KIT_N_GPU_LAYERS", "many"),
                                             ("LOCAL_LLM_KIT_N_THREADS", "0"),
                                             ("LOCAL_LLM_KIT_N_THREADS", "all")])
def test_malformed_environment_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_settings(**DEFAULTS, environ={name: value})
    assert name in str(info.value)
    assert info.value.param == name


@pytest.mark.parametrize(("kwargs", "param"), [({"temperature": 3.0}, "temperature"), ({"top_p": -0.1}, "top_p"),
                                               ({"context_length": 0}, "context_length"),
                                               ({"backend": "onnx"}, "backend"), ({"n_threads": 0}, "n_threads")])
def test_bad_constructor_arguments(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        LLMClient(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param


def test_environment_is_read_by_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_LLM_KIT_CONTEXT_LENGTH", "1024")
    assert LLMClient().settings.context_length == 1024


def test_constructing_a_client_loads_nothing() -> None:
    client = LLMClient("does-not-exist")  # resolution is lazy too
    assert client._engine is None


def test_cuda_graphs_is_a_transformers_option() -> None:
    s = resolve_settings(**{**DEFAULTS, "backend": "transformers"}, cuda_graphs=False, environ={})
    assert s.cuda_graphs is False
    assert resolve_settings(**{**DEFAULTS, "backend": "transformers"}, environ={}).cuda_graphs is None
    client = LLMClient(backend="transformers", cuda_graphs=True)
    assert client.options.cuda_graphs is True  # reaches the backend (and the model-sharing key)
    assert client.options != LLMClient(backend="transformers").options
    for backend, hint in (("llama.cpp", "n_gpu_layers"), ("openai", "server")):
        extra = {"base_url": "http://127.0.0.1:1/v1"} if backend == "openai" else {}
        with pytest.raises(InvalidRequestError, match=hint) as caught:
            resolve_settings(**{**DEFAULTS, "backend": backend}, cuda_graphs=True, environ={}, **extra)
        assert caught.value.param == "cuda_graphs"
    with pytest.raises(InvalidRequestError, match="True or False") as caught:
        resolve_settings(**{**DEFAULTS, "backend": "transformers"}, cuda_graphs="yes", environ={})  # type: ignore[arg-type]
    assert caught.value.param == "cuda_graphs"


def test_threads_from_the_environment_for_in_process_engines() -> None:
    assert resolve_settings(**DEFAULTS, environ={"LOCAL_LLM_KIT_N_THREADS": "1"}).n_threads == 1
    assert resolve_settings(**{**DEFAULTS, "n_threads": 2}, environ={"LOCAL_LLM_KIT_N_THREADS": "1"}).n_threads == 2
    assert resolve_settings(**{**DEFAULTS, "backend": "transformers"},
                            environ={"LOCAL_LLM_KIT_N_THREADS": "3"}).n_threads == 3


def test_a_llama_cpp_default_in_the_environment_does_not_block_another_backend() -> None:
    settings = resolve_settings(**{**DEFAULTS, "backend": "transformers"}, environ={"LOCAL_LLM_KIT_N_GPU_LAYERS": "0"})
    assert settings.backend == "transformers" and settings.n_gpu_layers is None
    assert resolve_settings(**DEFAULTS, environ={"LOCAL_LLM_KIT_N_GPU_LAYERS": "0"}).n_gpu_layers == 0


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_a_cache_dir_that_is_a_file_is_refused_by_name(tmp_path: Path, via: str) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    args = {**DEFAULTS, "cache_dir": a_file} if via == "argument" else DEFAULTS
    env = {"LOCAL_LLM_KIT_CACHE_DIR": str(a_file)} if via == "environment" else {}
    with pytest.raises(InvalidRequestError, match="must be a folder") as info:
        resolve_settings(**args, environ=env)  # type: ignore[arg-type]
    assert info.value.param == ("cache_dir" if via == "argument" else "LOCAL_LLM_KIT_CACHE_DIR")
