"""Chat messages to a prompt, with the checkpoint's chat template rendered the way transformers does.

prefill's ModelInfo carries the template (from tokenizer_config.json or chat_template.jinja) and
the tokenizer's special tokens; `render` passes both to transformers' own renderer (sandboxed
Jinja, `raise_exception`, `strftime_now`, the special tokens as variables), as
`apply_chat_template(messages, add_generation_prompt=True)` does. The text is then tokenized
without adding special tokens (the template writes its own bos), as transformers tokenizes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from nxserve.openai.errors import invalid


def render(template: str, special_tokens: Mapping[str, str], messages: list[dict[str, Any]]) -> str:
    """The prompt text of `messages` with the generation prompt appended; 400 if the template refuses them."""
    if not template:
        raise invalid("the served model has no chat template (tokenizer_config.json): use /v1/completions", param="messages")
    try:
        variables: dict[str, Any] = dict(special_tokens)
        # (the rendered conversations, their generation indices), whatever the annotation says
        result: Any = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True, **variables)
    except TemplateError as exc:  # raise_exception() in the template, or messages it cannot render
        raise invalid(f"the chat template refused the messages: {exc}", param="messages") from None
    return str(result[0][0])
