"""Samples as Hugging Face chat messages (docs/design.md §4): image first, then the prompt; the caption answers."""
from __future__ import annotations

import re


def messages(caption: str, prompt: str, system_prompt: str = "") -> list[dict]:
    """System (optional), user (image + prompt), assistant (caption) turns."""
    out = []
    if system_prompt:
        out.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    out.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
    out.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return out


def answer(msgs: list[dict]) -> str:
    """The assistant's text of a conversation."""
    return "".join(c["text"] for m in msgs if m["role"] == "assistant" for c in m["content"] if c["type"] == "text")


def with_answer(msgs: list[dict], caption: str) -> list[dict]:
    """A copy of the conversation whose assistant turn says `caption`."""
    return [
        {"role": "assistant", "content": [{"type": "text", "text": caption}]} if m["role"] == "assistant" else m
        for m in msgs
    ]


def parse_label(text: str, pattern: str, labels: tuple[str, ...]) -> str | None:
    """The label stated in an answer (params `data.label_pattern`), or None if absent or unknown."""
    m = re.search(pattern, text, flags=re.IGNORECASE)
    if not m:
        return None
    found = m.group(1).lower()
    return next((l for l in labels if l.lower() == found), None)


# Google's Gemma 3 chat template (as shipped in the google/gemma-3-*-it tokenizer_config.json).
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
