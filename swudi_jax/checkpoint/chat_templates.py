"""Chat templates by name, for a config's ``chat_template: <name>``, written here from each
format's public description (the model cards and papers that define them).

Each is a Jinja template over ``messages`` (``role``, ``content``) with ``bos_token``,
``eos_token`` and ``add_generation_prompt``, as ``transformers``' ``apply_chat_template``
renders them:

- ``chatml`` (OpenAI's ChatML, used by Qwen, Hermes, ...): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
  per message; prompt ``<|im_start|>assistant\\n``.
- ``llama3`` (Meta Llama 3): ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
  per message (content stripped) after ``bos_token``; prompt ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``.
- ``alpaca`` (Stanford Alpaca): a system text, then ``### Instruction:\\n{user}\\n\\n`` and
  ``### Response:\\n{assistant}{eos_token}\\n\\n``; prompt ``### Response:\\n``.
- ``mistral`` (Mistral Instruct v0.1): ``bos_token``, then ``[INST] {user} [/INST]`` and
  ``{assistant}{eos_token}``; a system message is put before the next user message.
- ``zephyr`` (HuggingFaceH4 Zephyr): ``<|{role}|>\\n{content}{eos_token}\\n`` per message;
  prompt ``<|assistant|>\\n``.
- ``exaone`` (LG EXAONE 3): ``[|system|]{content}[|endofturn|]\\n``, ``[|user|]{content}\\n``,
  ``[|assistant|]{content}[|endofturn|]\\n``; prompt ``[|assistant|]``.

mergekit 0.1.5 ships alpaca, chatml, exaone, llama3 and mistral (zephyr is an addition here).
"""

from __future__ import annotations

BUNDLED: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}
"""Template text by name."""


def named(value: str) -> str | None:
    """The bundled template ``value`` names, read as mergekit reads a name (short, one line, no
    ``{``), or None when it is not such a name."""
    if len(value) < 256 and "\n" not in value and "{" not in value:
        return BUNDLED.get(value)
    return None


__all__ = ["BUNDLED", "named"]
