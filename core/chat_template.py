"""Chat formats: how a conversation becomes text, which characters of it are trained on, and the same format as a
Jinja template for transformers' ``apply_chat_template``.

One definition per format (:class:`ChatFormat`: a prefix and a suffix per role, the special tokens), from which
both the Python renderer (what ``stagerun tokenize`` trains on) and the Jinja template (what ``stagerun export``
writes to tokenizer_config.json) are derived, so the two cannot drift; tests/test_chat_template.py checks that
transformers' rendering of the Jinja template equals :meth:`ChatFormat.render` on generated conversations.

Loss spans: an assistant message's content and its suffix (the end-of-turn marker the model must learn to emit);
never the prefixes, the system or user messages. Pure Python: the operator image imports core without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation the format cannot write (unknown role, non-string content); the message says which field."""


@dataclass(frozen=True)
class RoleFormat:
    prefix: str
    suffix: str


@dataclass(frozen=True)
class RenderedChat:
    text: str
    loss_spans: tuple[tuple[int, int], ...]  # character [start, stop) ranges of ``text`` that are trained on


@dataclass(frozen=True)
class ChatFormat:
    name: str
    roles: Mapping[str, RoleFormat]
    special_tokens: tuple[str, ...]
    bos: str = ""  # text before the whole conversation (e.g. Llama 3's <|begin_of_text|>)
    generation_prompt: str = ""  # what add_generation_prompt appends: the assistant prefix

    def render(self, messages: Sequence[Mapping[str, Any]], where: str = "messages") -> RenderedChat:
        """The conversation's text and the character spans of its assistant turns (content + suffix)."""
        parts: list[str] = [self.bos]
        spans: list[tuple[int, int]] = []
        length = len(self.bos)
        for i, message in enumerate(messages):
            role, content = _role_content(message, f"{where}[{i}]")
            fmt = self.roles[role]
            parts.append(fmt.prefix)
            length += len(fmt.prefix)
            body = content + fmt.suffix
            if role == "assistant":
                spans.append((length, length + len(body)))
            parts.append(body)
            length += len(body)
        return RenderedChat("".join(parts), tuple(spans))

    def jinja(self) -> str:
        """The same format as a Jinja chat template (transformers' ``chat_template``)."""
        out = []
        if self.bos:
            out.append("{{- " + _jinja_str(self.bos) + " }}")
        out.append("{%- for message in messages %}")
        first = True
        for role in ROLES:
            fmt = self.roles[role]
            keyword = "if" if first else "elif"
            first = False
            out.append(
                "{%- " + keyword + " message['role'] == " + _jinja_str(role) + " %}"
                "{{- " + _jinja_str(fmt.prefix) + " + message['content'] + " + _jinja_str(fmt.suffix) + " }}"
            )
        out.append("{%- else %}{{- raise_exception('unknown role: ' + message['role']) }}{%- endif %}")
        out.append("{%- endfor %}")
        out.append("{%- if add_generation_prompt %}{{- " + _jinja_str(self.generation_prompt) + " }}{%- endif %}")
        return "".join(out)


def _role_content(message: Any, where: str) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"{where}: a message must be an object with role and content, got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ChatFormatError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ChatFormatError(f"{where}.content: must be a string, got {type(content).__name__}")
    return role, content


def _jinja_str(text: str) -> str:
    """A Jinja string literal holding ``text`` exactly."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


CHATML = ChatFormat(
    name="chatml",
    roles={
        "system": RoleFormat("<|im_start|>system\n", "<|im_end|>\n"),
        "user": RoleFormat("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": RoleFormat("<|im_start|>assistant\n", "<|im_end|>\n"),
    },
    special_tokens=("<|im_start|>", "<|im_end|>"),
    generation_prompt="<|im_start|>assistant\n",
)

FORMATS: dict[str, ChatFormat] = {CHATML.name: CHATML}


def chat_format(spec: Any) -> ChatFormat:
    """The ChatFormat of a ``spec.tokenizer.chatTemplate`` (core.spec.run.ChatTemplateSpec)."""
    if spec.format == "custom":
        roles = {role: RoleFormat(getattr(spec, role).prefix, getattr(spec, role).suffix) for role in ROLES}
        return ChatFormat(
            name="custom",
            roles=roles,
            special_tokens=tuple(spec.special_tokens or ()),
            generation_prompt=roles["assistant"].prefix,
        )
    return FORMATS[spec.format]
