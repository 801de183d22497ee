import pytest

from local_llm_kit import TemplateError
from local_llm_kit.templates import GEMMA3_TEMPLATE, ChatTemplate
from local_llm_kit.testing import CHATML_TEMPLATE

MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_chatml_rendering() -> None:
    text = ChatTemplate(CHATML_TEMPLATE).render(MESSAGES[1:2])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not ChatTemplate(CHATML_TEMPLATE).render(MESSAGES[1:2], add_generation_prompt=False).endswith(
        "assistant\n")


def test_gemma_fallback_is_used_only_for_gemma() -> None:
    template = ChatTemplate.for_model(None, "gemma3", bos_token="<bos>")
    assert template.is_fallback
    assert template.render(MESSAGES) == (
        "<bos><start_of_turn>user\nBe kind.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate.for_model(None, "mystery-arch")


def test_templates_can_raise_and_bad_templates_are_reported() -> None:
    strict = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        strict.render(MESSAGES)
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_tojson_keeps_unicode_like_transformers() -> None:
    template = ChatTemplate("{{ messages[0]['content'] | tojson }}")
    assert template.render([{"role": "user", "content": "café <b>"}]) == '"café <b>"'


def test_same_semantics_as_transformers_apply_chat_template() -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    for source in (CHATML_TEMPLATE, GEMMA3_TEMPLATE):
        tok.chat_template = source
        ours = ChatTemplate(source, bos_token="<bos>").render(MESSAGES)
        theirs = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True,
                                         bos_token="<bos>")
        assert ours == theirs
