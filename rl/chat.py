"""Chat rendering: prompts and conversations as the tokens the model reads, through the tokenizer's chat template
(its own, or `model.chat_template`: one of CHAT_TEMPLATES, or a Jinja file, for a base model that has none).

The multi-turn environments build on this: a turn's prompt is rendered from messages once, and what the model
then says stays as the tokens it sampled (never re-rendered from text).
"""

from __future__ import annotations

import functools
from pathlib import Path

from rl.types import Datum

CHAT_TEMPLATES = {
    "plain": "{% for message in messages %}{{ message['content'] }}{% if message['role'] == 'assistant' %}"
             "{{ eos_token }}{% endif %}{% endfor %}",
    "role_colon": "{% for message in messages %}{% if message['role'] == 'assistant' %}"
                  "{{ 'Assistant: ' + message['content'] + eos_token + '\n\n' }}{% else %}"
                  "{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}",
}
"""model.chat_template's names, for a base model whose tokenizer has no template. plain: the messages' text as it
is, the end-of-sequence token after each reply (prompts written as a continuation: "Question: ...\nAnswer:");
role_colon: "User: ...\n\nAssistant: ..." (tinker-cookbook's renderer of that name, which ends a reply with the
end-of-sequence token here, as the sampler stops there)."""


def with_chat_template(tokenizer, template: str | None, *, model: str):
    """`tokenizer`, rendering chats with `template` (a name of CHAT_TEMPLATES or a Jinja file) or, None, its own:
    a tokenizer without one is refused, naming model.chat_template."""
    if template is not None:
        tokenizer.chat_template = CHAT_TEMPLATES.get(template) or Path(template).read_text(encoding="utf-8")
    elif not tokenizer.chat_template:
        raise ValueError(f"model.chat_template=None: {model}'s tokenizer has no chat template (a base model's often "
                         f"has none); give one: {', '.join(CHAT_TEMPLATES)} (rl.chat.CHAT_TEMPLATES) or a Jinja file")
    return tokenizer


def chat_tokens(tokenizer, text: str | list[dict[str, str]]) -> list[int]:
    """A user message (or a conversation of messages) rendered with the chat template, ready for the assistant's
    reply."""
    messages = [{"role": "user", "content": text}] if isinstance(text, str) else text
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


_BEFORE = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
"""A finished exchange for `message_tokens` to render a new message after: its text never reaches the model."""


def message_tokens(tokenizer, message: dict[str, str]) -> list[int]:
    """The tokens the chat template puts after an assistant reply that ended with its end-of-turn token: the
    new message (a tool result, the user's next line) with its markers, then the generation prompt of the next
    reply. Appended to the sampled tokens, they give what rendering the whole conversation would, without ever
    re-rendering the model's own tokens."""
    finished = _finished_exchange(tokenizer)
    after = tokenizer.apply_chat_template(_BEFORE + [message], tokenize=True, return_dict=False,
                                          add_generation_prompt=True)
    if after[:len(finished)] != finished:
        raise ValueError("the chat template renders a finished reply differently once a message follows it")
    return after[len(finished):]


@functools.cache
def _finished_exchange(tokenizer) -> list[int]:
    """`_BEFORE` rendered, up to its reply's end-of-turn token (rendered once per tokenizer: every observation
    of every turn needs it)."""
    before = tokenizer.apply_chat_template(_BEFORE, tokenize=True, return_dict=False)
    end_of_turn = max(index for index, token in enumerate(before) if token == tokenizer.eos_token_id)
    return before[:end_of_turn + 1]


def completion_text(tokenizer, tokens: list[int]) -> str:
    """What the model said in `tokens`, as the task's scorer reads it (special tokens left out)."""
    return tokenizer.decode(tokens, skip_special_tokens=True)


def conversation_datum(tokenizer, messages: list[dict[str, str]], *, trained_from: int = 0) -> Datum:
    """A conversation as a cross-entropy datum whose weights select the assistant's tokens (1) from the rest (0):
    of every assistant turn, or of those from message `trained_from` on (a DPO reply after a prompt that has
    assistant turns of its own).

    Each assistant turn's tokens are those its rendering adds to the conversation before it (rendered with the
    generation prompt), so the template's own markers around the reply are trained as the model will emit them.
    """
    def render(upto: int, generation_prompt: bool) -> list[int]:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=True, return_dict=False,
                                             add_generation_prompt=generation_prompt)

    tokens_T = render(len(messages), False)
    weights_T = [0.0] * len(tokens_T)
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and index >= trained_from:
            upto = render(index + 1, False)
            start, end = len(render(index, True)), len(upto)
            if upto != tokens_T[:end]:
                raise ValueError(f"the chat template renders turn {index} differently inside the conversation: "
                                 "assistant tokens cannot be located")
            weights_T[start:end] = [1.0] * (end - start)
    return Datum.next_token(tokens_T, weights=weights_T)
