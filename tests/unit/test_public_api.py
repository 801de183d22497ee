import inspect

import local_llm_kit
from local_llm_kit import errors


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name for name, value in vars(local_llm_kit).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in {"annotations", "logging"}
    }
    public.add("__version__")
    assert set(local_llm_kit.__all__) == public
    assert len(local_llm_kit.__all__) == len(set(local_llm_kit.__all__))


def test_reference_names_exist() -> None:
    for name in ("LLMClient", "CompletionResponse", "Choice", "Message", "Usage",
                 "ModelNotFoundError", "InvalidRequestError", "TokenLimitError"):
        assert name in local_llm_kit.__all__


def test_every_error_derives_from_the_root_and_is_drawn_in_the_tree() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.LocalLLMKitError)
        assert name in (errors.__doc__ or "")
    assert issubclass(errors.TokenLimitError, errors.InvalidRequestError)


def test_importing_the_package_does_not_import_engines() -> None:
    import subprocess
    import sys

    code = "import sys, local_llm_kit; print('llama_cpp' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
