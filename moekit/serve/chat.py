"""Chat prompts: messages rendered through a Jinja template kept with the checkpoint
(tokenizer_config.json's "chat_template", the Hugging Face convention) or the default below."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)


def render_chat(messages: list[dict], template: str = DEFAULT_CHAT_TEMPLATE, add_generation_prompt: bool = True) -> str:
    return _env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def load_chat_template(ckpt_dir: Path) -> str:
    path = Path(ckpt_dir) / "tokenizer_config.json"
    if path.is_file():
        template = json.loads(path.read_text()).get("chat_template")
        if isinstance(template, str) and template:
            return template
    return DEFAULT_CHAT_TEMPLATE
