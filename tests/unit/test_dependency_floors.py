"""The declared dependency floors are the ones the code needs, and they are what gets tested.

``make test-floors`` resolves every direct dependency to the lowest version ``pyproject.toml``
allows (uv's ``--resolution lowest-direct``), sets ``LOCAL_LLM_KIT_DEPENDENCY_FLOORS=1`` and runs
the unit suite there; in that run these tests also prove the environment really sits on the
floors. In every environment they check that the installed versions satisfy the declared ones and
that every third-party module the core imports is declared.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import local_llm_kit

FLOORS_RUN = os.environ.get("LOCAL_LLM_KIT_DEPENDENCY_FLOORS") == "1"
# Extras installed in the floors environment. torch is not there (torch==2.13.0 is the only CPU
# build this project installs, any other spec pulls a multi-GB CUDA build, and the unit suite needs
# no torch), nor llama-cpp-python (it compiles from source for minutes; its tests importorskip it).
FLOORS_EXTRAS = {"transformers", "server"}
NOT_AT_FLOOR = {"torch", "llama-cpp-python"}


def _declared() -> list[tuple[Requirement, str | None]]:
    """Each requirement of the core (extra None) and of the user-facing extras."""
    found = []
    for text in metadata.requires("local-llm-kit") or []:
        req = Requirement(text)
        extra = next((e for e in ("llama-cpp", "transformers", "server") if req.marker and req.marker.evaluate(
            {"extra": e}) and not req.marker.evaluate({"extra": ""})), None)
        if req.marker is None or extra is not None:
            found.append((req, extra))
    return found


def _floor(req: Requirement) -> Version:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert floors, f"{req} declares no floor"
    return max(floors)


def test_every_dependency_declares_a_floor() -> None:
    declared = _declared()
    assert {canonicalize_name(r.name) for r, extra in declared if extra is None} >= {
        "numpy", "pydantic", "jinja2", "llguidance", "tqdm", "typing-extensions"}
    for req, _ in declared:
        _floor(req)


def test_installed_versions_satisfy_the_declared_ones() -> None:
    for req, extra in _declared():
        try:
            installed = Version(metadata.version(req.name))
        except metadata.PackageNotFoundError:
            assert extra is not None, f"core dependency {req.name} is not installed"
            continue
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not satisfy {req}"


@pytest.mark.skipif(not FLOORS_RUN, reason="only `make test-floors` installs the floors")
def test_the_floors_environment_sits_on_the_floors() -> None:
    """A resolver that drifted above a floor (a transitive requirement pushing it up) would leave
    that floor untested: then the floor itself is wrong and must be raised to what resolves."""
    for req, extra in _declared():
        name = canonicalize_name(req.name)
        if name in NOT_AT_FLOOR or (extra is not None and extra not in FLOORS_EXTRAS):
            continue
        assert Version(metadata.version(req.name)) == _floor(req), f"{req.name} is not at its floor {req}"


def test_llguidance_takes_a_list_of_end_tokens() -> None:
    """Both real backends give llguidance every end token of the model (SmolLM2 has
    ``<|im_end|>`` and ``<|endoftext|>``) as a list; 1.6 and older raise ``TypeError: argument
    'eos_token': 'list' object cannot be interpreted as an integer`` at the first structured request,
    and have no ``eos_tokens``. The engine then allows each end token through the mask once the
    grammar may end (``validate_tokens`` counts only the first before 1.7.6; the engine never asks
    it about end tokens)."""

    class _Vocab:
        eos_token_id = 256
        bos_token_id = None
        tokens: ClassVar[list[bytes]] = [bytes([i]) for i in range(256)] + [b"\xff<|im_end|>", b"\xff<|endoftext|>"]
        special_token_ids: ClassVar[list[int]] = [256, 257]

        def __call__(self, text: bytes) -> list[int]:
            return list(text)

    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab()), eos_token=[256, 257])
    assert list(tokenizer.eos_tokens) == [256, 257]
    grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "boolean"}')
    for end in (256, 257):
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        assert matcher.consume_tokens(list(b"tru"))
        assert not _allowed(matcher, tokenizer.vocab_size)[end]  # not before the JSON is complete
        assert matcher.consume_token(ord("e"))
        assert matcher.is_accepting()
        assert _allowed(matcher, tokenizer.vocab_size)[end]
        assert matcher.consume_token(end)
        assert not matcher.is_error()


def _allowed(matcher: llguidance.LLMatcher, vocab: int) -> np.ndarray:
    """The tokens the matcher allows next, as the engine reads them (one bit per token)."""
    bitmask = llg_numpy.allocate_token_bitmask(1, vocab)
    llg_numpy.fill_next_token_bitmask(matcher, bitmask)
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little").astype(bool)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    return handler.type is None or any(name in ast.unparse(handler.type) for name in ("ImportError", "ModuleNotFound"))


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in ``path``, outside ``if TYPE_CHECKING:`` and
    outside ``try:`` blocks that handle ImportError."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child)  # the body may import an optional package: it handles its absence
            return
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return names - set(sys.stdlib_module_names) - {"local_llm_kit", "__future__"}


def test_every_module_the_core_imports_is_a_core_dependency() -> None:
    """What ``import local_llm_kit`` loads may use only the core dependencies: typing_extensions
    was imported there without being declared, which a minimal install would have failed on.

    Imports inside functions count too (jsonschema is imported on first use); an optional package
    may be imported only where its ImportError is handled. The optional backends and the server
    are modules of their own, which the core does not load."""
    core = {canonicalize_name(r.name) for r, extra in _declared() if extra is None}
    providers = metadata.packages_distributions()
    root = Path(local_llm_kit.__file__).parent
    # the core modules are the ones a bare import loads, in a fresh interpreter
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, local_llm_kit; print('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    modules = sorted({m for m in loaded if m == "local_llm_kit" or m.startswith("local_llm_kit.")})
    assert len(modules) > 10, modules
    undeclared = {}
    for module in modules:
        relative = Path(*module.split(".")[1:])
        path = root / relative / "__init__.py" if (root / relative).is_dir() else root / f"{relative}.py"
        for name in _third_party_imports(path):
            dists = {canonicalize_name(d) for d in providers.get(name, [])}
            if not dists & core:
                undeclared.setdefault(name, []).append(module)
    assert not undeclared, f"imported by core modules but not a core dependency: {undeclared}"


def test_transformers_reads_a_gguf_tokenizer_without_adding_tokens(tmp_path: Path) -> None:
    """The transformers backend converts the packaged GGUF models with ``AutoTokenizer.from_pretrained(
    gguf_file=...)``. transformers 5.0 to 5.5.4 load a llama-architecture GGUF's BPE vocabulary as
    CodeLlamaTokenizer and append five fill-in-the-middle tokens (SmolLM2: 49157 tokens for 49152
    logits), which llguidance rejects ("vocab size too small") at the first structured request;
    up to 5.17.0 the tokenizer's eos_token is the GGUF's bos token. A tiny GGUF of the same kind
    reproduces both without weights. transformers needs torch to read any GGUF file: ``make
    test-floors`` runs this in its second step, with torch."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab", "Ġa"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3: control
    writer.add_token_merges(["a b", "Ġ a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name, local_files_only=True)
    assert len(tokenizer) == len(tokens), sorted(set(tokenizer.get_vocab()) - set(tokens))
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "ab"]) == [2, 30]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")  # 5.17.0: both <|im_start|>
