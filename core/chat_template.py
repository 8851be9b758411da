"""Chat formats: how a conversation becomes text, which characters of it are trained on, and the same format as a
Jinja template for transformers' ``apply_chat_template``.

One definition per format (:class:`ChatFormat`: text before the conversation, a prefix and a suffix per role, the
special tokens, the end-of-turn token), from which both the Python renderer (what ``stagerun tokenize`` trains on)
and the Jinja template (what ``stagerun export`` writes to tokenizer_config.json) are derived, so the two cannot
drift; tests/test_chat_template.py checks that transformers' rendering of the Jinja template equals
:meth:`ChatFormat.render` on generated conversations, text and token ids.

Loss spans: an assistant message's content and its suffix (the end-of-turn marker the model must learn to emit);
never the prefixes, the system or user messages. Pure Python: the operator image imports core without torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation the format cannot write (unknown role, non-string content), or a format definition that is
    incomplete; the message says which field."""


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
    special_tokens: tuple[str, ...]  # added to the tokenizer as special tokens: never split, one id each
    bos: str = ""  # text before the whole conversation (e.g. Llama 3's <|begin_of_text|>)
    generation_prompt: str = ""  # what add_generation_prompt appends: the assistant prefix
    end_of_turn: str | None = None  # the token that ends a reply: generate() stops there (export)
    strip_content: bool = False  # strip whitespace around each message's content (Llama 3's template trims it)

    def render(
        self, messages: Sequence[Mapping[str, Any]], where: str = "messages", add_generation_prompt: bool = False
    ) -> RenderedChat:
        """The conversation's text and the character spans of its assistant turns (content + suffix)."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ChatFormatError(f"{where}: must be a list of messages, got {type(messages).__name__}")
        parts: list[str] = [self.bos]
        spans: list[tuple[int, int]] = []
        length = len(self.bos)
        for i, message in enumerate(messages):
            role, content = _role_content(message, f"{where}[{i}]")
            fmt = self.roles[role]
            if self.strip_content:
                content = content.strip()
            parts.append(fmt.prefix)
            length += len(fmt.prefix)
            body = content + fmt.suffix
            if role == "assistant":
                spans.append((length, length + len(body)))
            parts.append(body)
            length += len(body)
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return RenderedChat("".join(parts), tuple(spans))

    def jinja(self) -> str:
        """The same format as a Jinja chat template (transformers' ``chat_template``).

        One line of tags and expressions with no text between them, so Jinja's whitespace control
        (transformers renders with trim_blocks and lstrip_blocks) has nothing to remove or keep: the output is
        exactly the expressions' strings. Errors name the message index, as :meth:`render`'s do."""
        content = "message['content'] | trim" if self.strip_content else "message['content']"
        where = "'messages[' ~ loop.index0 ~ ']"
        out = []
        if self.bos:
            out.append("{{- " + _jinja_str(self.bos) + " }}")
        out.append("{%- for message in messages %}")
        out.append(
            "{%- if message['content'] is not string %}{{- raise_exception(" + where + ".content: must be a string') }}"
            "{%- endif %}"
        )
        for i, role in enumerate(ROLES):
            fmt = self.roles[role]
            out.append(
                "{%- " + ("if" if i == 0 else "elif") + " message['role'] == " + _jinja_str(role) + " %}"
                "{{- " + _jinja_str(fmt.prefix) + " + " + content + " + " + _jinja_str(fmt.suffix) + " }}"
            )
        unknown = where + ".role: ' ~ message['role'] ~ ' is not one of " + ", ".join(ROLES) + "'"
        out.append("{%- else %}{{- raise_exception(" + unknown + ") }}{%- endif %}")
        out.append("{%- endfor %}")
        out.append("{%- if add_generation_prompt %}{{- " + _jinja_str(self.generation_prompt) + " }}{%- endif %}")
        return "".join(out)

    def jinja_sha256(self) -> str:
        """A fingerprint of the format as transformers applies it (shard manifests record it)."""
        return hashlib.sha256(self.jinja().encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """What a shard manifest and a checkpoint's meta.json store: enough to rebuild the format exactly."""
        return {
            "name": self.name,
            "bos": self.bos,
            "roles": {role: {"prefix": self.roles[role].prefix, "suffix": self.roles[role].suffix} for role in ROLES},
            "specialTokens": list(self.special_tokens),
            "generationPrompt": self.generation_prompt,
            "endOfTurn": self.end_of_turn,
            "stripContent": self.strip_content,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "chatTemplate") -> ChatFormat:
        """The format :meth:`to_json` wrote; ChatFormatError naming the field when ``data`` is not such a record."""
        if not isinstance(data, Mapping):
            raise ChatFormatError(f"{where}: must be an object (ChatFormat.to_json), got {type(data).__name__}")
        roles_raw = data.get("roles")
        if not isinstance(roles_raw, Mapping):
            raise ChatFormatError(f"{where}.roles: must be an object with {', '.join(ROLES)}")
        roles = {}
        for role in ROLES:
            entry = roles_raw.get(role)
            if not isinstance(entry, Mapping):
                raise ChatFormatError(f"{where}.roles.{role}: must be an object with prefix and suffix")
            roles[role] = RoleFormat(
                _string(entry.get("prefix"), f"{where}.roles.{role}.prefix"),
                _string(entry.get("suffix"), f"{where}.roles.{role}.suffix"),
            )
        tokens = data.get("specialTokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise ChatFormatError(f"{where}.specialTokens: must be a list of non-empty strings")
        end = data.get("endOfTurn")
        if end is not None:
            _string(end, f"{where}.endOfTurn")
        strip = data.get("stripContent", False)
        if not isinstance(strip, bool):
            raise ChatFormatError(f"{where}.stripContent: must be true or false")
        return cls(
            name=_string(data.get("name"), f"{where}.name"),
            roles=roles,
            special_tokens=tuple(tokens),
            bos=_string(data.get("bos", ""), f"{where}.bos"),
            generation_prompt=_string(data.get("generationPrompt", ""), f"{where}.generationPrompt"),
            end_of_turn=end,
            strip_content=strip,
        )


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ChatFormatError(f"{where}: must be a string, got {type(value).__name__}")
    return value


def _role_content(message: Any, where: str) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ChatFormatError(
            f"{where}: a message must be an object with role and content, got {type(message).__name__}"
        )
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ChatFormatError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ChatFormatError(f"{where}.content: must be a string, got {type(content).__name__}")
    return role, content


# Characters a Jinja string literal cannot hold as they are: the quote and the backslash (escapes), and control
# characters (Jinja's lexer turns a raw "\r" or "\r\n" into "\n"). Jinja decodes a literal with Python's
# unicode-escape, so \xNN, \uNNNN and \UNNNNNNNN spell any character. ("}}" or "%}" inside a literal are fine: the
# lexer reads a string whole before it looks for the end of the tag.)
_JINJA_UNSAFE = set("\\'")


def _jinja_str(text: str) -> str:
    """A Jinja string literal holding ``text`` exactly."""
    out = []
    for char in text:
        if char == "\n":
            out.append("\\n")
        elif char in _JINJA_UNSAFE or not char.isprintable():
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def _uniform(start: str, end: str) -> dict[str, RoleFormat]:
    """Roles written as ``start.format(role) + content + end``."""
    return {role: RoleFormat(start.format(role=role), end) for role in ROLES}


CHATML = ChatFormat(
    name="chatml",
    roles=_uniform("<|im_start|>{role}\n", "<|im_end|>\n"),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    generation_prompt="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>",
)

# StableLM 2 Zephyr 1.6B (huggingface.co/stabilityai/stablelm-2-zephyr-1_6b, model card "Usage" and its
# tokenizer_config.json): HuggingFaceH4's zephyr-7b-beta template, '<|role|>\n' + content + eos_token, with
# eos_token = <|endoftext|>. That template's tags sit on lines of their own; under transformers' trim_blocks each
# expression's line break stays, so every message ends '<|endoftext|>\n' and the generation prompt is
# '<|assistant|>\n'. (The original emits the generation prompt inside the loop, after the last message: the same
# text for any non-empty conversation.) The end of turn is the document separator of stagerun tokenizers too.
ZEPHYR = ChatFormat(
    name="zephyr",
    roles=_uniform("<|{role}|>\n", "<|endoftext|>\n"),
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"),
    generation_prompt="<|assistant|>\n",
    end_of_turn="<|endoftext|>",
)

# Llama 3 Instruct (meta-llama's tokenizer_config.json chat_template): bos_token once, then per message
# '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>'; the generation prompt is
# the assistant header. Meta's template trims each content, so this one does too.
LLAMA3 = ChatFormat(
    name="llama3",
    roles=_uniform("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    bos="<|begin_of_text|>",
    generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    end_of_turn="<|eot_id|>",
    strip_content=True,
)

FORMATS: dict[str, ChatFormat] = {f.name: f for f in (CHATML, ZEPHYR, LLAMA3)}


def named_format(name: str, where: str = "--chat-template") -> ChatFormat:
    """One of the built-in formats by name; ChatFormatError naming ``where`` and the choices otherwise."""
    if name not in FORMATS:
        raise ChatFormatError(f"{where}: {name!r} is not a chat format; use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def chat_format(spec: Any, where: str = "spec.tokenizer.chatTemplate") -> ChatFormat:
    """The ChatFormat of a ``spec.tokenizer.chatTemplate`` (core.spec.run.ChatTemplateSpec)."""
    if spec.format != "custom":
        return named_format(spec.format, f"{where}.format")
    roles = {}
    for role in ROLES:
        given = getattr(spec, role)
        if given is None:
            raise ChatFormatError(f"{where}.{role}: is required with format custom; give its prefix and suffix")
        roles[role] = RoleFormat(given.prefix, given.suffix)
    special = tuple(spec.special_tokens or ())
    empty = [t for t in special if not t]
    if empty:
        raise ChatFormatError(f"{where}.specialTokens: an empty string is not a token; drop it")
    return ChatFormat(
        name="custom",
        roles=roles,
        special_tokens=tuple(dict.fromkeys(special)),
        generation_prompt=roles["assistant"].prefix,
        end_of_turn=_end_of_turn(roles["assistant"].suffix, special),
    )


def _end_of_turn(suffix: str, special: Sequence[str]) -> str | None:
    """The first special token in an assistant suffix (None: it has none): the token that ends a reply."""
    found = [(suffix.find(t), -len(t), t) for t in special if t in suffix]
    return min(found)[2] if found else None
