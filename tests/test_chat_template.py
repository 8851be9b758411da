"""Chat templates (issue 18): core/chat_template.py's formats against transformers' own rendering, the tokenizer's
chat special tokens, and the chat template in an exported Hugging Face folder.

Every format's Jinja template is rendered by transformers (apply_chat_template: its sandboxed Jinja environment
with trim_blocks and lstrip_blocks) on generated conversations with hostile content (quotes, backslashes, Jinja
delimiters, newlines, carriage returns, unicode, empty and padded strings), and must give exactly the text and ids
that stagerun's renderer and tokenizer give.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from stagerun.core.chat_template import (  # noqa: E402
    CHATML,
    FORMATS,
    LLAMA3,
    ZEPHYR,
    ChatFormat,
    ChatFormatError,
    chat_format,
    named_format,
)
from stagerun.core.spec.run import ChatRoleSpec, ChatTemplateSpec  # noqa: E402
from stagerun.trainer.data.readers import DataError  # noqa: E402
from stagerun.trainer.data.tokenizer import (  # noqa: E402
    EOS_TOKEN,
    PAD_TOKEN,
    add_chat_tokens,
    check_chat_tokens,
    load_tokenizer,
    missing_chat_tokens,
    save_tokenizer,
    train_tokenizer,
    vocab_size,
)
from stagerun.trainer.data.tokenizer_commands import add_chat_tokens_command, chat_template_arg  # noqa: E402

VOCAB = 300

# Prefixes and suffixes a Jinja string literal cannot hold as they are: quotes, a backslash, Jinja's own
# delimiters, a carriage return (Jinja's lexer would make it "\n"), a tab, non-ASCII.
CUSTOM = ChatTemplateSpec(
    format="custom",
    system=ChatRoleSpec(prefix='<|sys|>\'s "{{x}}" {% raw %}\r\n', suffix="</s|>\t\\n\\\n"),
    user=ChatRoleSpec(prefix="### Üser 🙂 %}#}:\n", suffix="\n"),
    assistant=ChatRoleSpec(prefix="### Assistant:\n", suffix="<|end|>\n\n"),
    special_tokens=("<|sys|>", "</s|>", "<|end|>"),
)
ALL = {**FORMATS, "custom": chat_format(CUSTOM)}

CONTENTS = [
    "What is 2 + 3?",
    "5",
    "",
    "  padded with spaces  ",
    "line one\nline two\n\nline four\n",
    "\n\nstarts with newlines",
    'it\'s a "quote" and a back\\slash \\n (not a newline)',
    "{{ not a jinja expression }} {% nor a tag %} {# nor a comment #}",
    "Ünïcödé 🙂 中文 — ελληνικά",
    "windows\r\nline end\r",
    "tabs\tand\ttabs\t",
    "def f(x):\n    return x ** 2  # code\n",
    "12345678901234567890",
    "mentions <|im_end|> and <|eot_id|> in text",
]


def conversations(n: int = 50, seed: int = 0) -> list[list[dict]]:
    """``n`` conversations: with and without a system message, 1-4 exchanges, some ending on a user turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": rng.choice(CONTENTS)})
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": rng.choice(CONTENTS)})
            messages.append({"role": "assistant", "content": rng.choice(CONTENTS)})
        if i % 5 == 4:
            messages.append({"role": "user", "content": rng.choice(CONTENTS)})
        out.append(messages)
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    """A small byte-level BPE per format, trained with the format's special tokens reserved; name -> file."""
    folder = tmp_path_factory.mktemp("chat-tok")
    texts = [" ".join(CONTENTS) * 4, Path(json.__file__).read_text()]
    paths = {}
    for name, fmt in ALL.items():
        paths[name] = str(folder / f"{name}.json")
        train_tokenizer(texts, VOCAB, paths[name], fmt)
    return paths


def hf_tokenizer(tokenizer, fmt: ChatFormat):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=fmt.jinja())


def input_ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True)'s ids: transformers 5 returns a BatchEncoding, 4 a list."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


# ------------------------------------------------------------------------------ transformers renders the same


@pytest.mark.parametrize("name", list(ALL))
def test_transformers_renders_the_jinja_template_exactly_as_render(name, tokenizers):
    fmt = ALL[name]
    tokenizer = load_tokenizer(tokenizers[name])
    hf = hf_tokenizer(tokenizer, fmt)
    for messages in conversations():
        rendered = fmt.render(messages)
        assert hf.apply_chat_template(messages, tokenize=False) == rendered.text
        assert input_ids(hf.apply_chat_template(messages, tokenize=True)) == tokenizer.encode(rendered.text).ids
        prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == rendered.text + fmt.generation_prompt
        assert prompt == fmt.render(messages, add_generation_prompt=True).text
    # every special token is one id in the ids transformers produces
    ids = input_ids(hf.apply_chat_template(conversations()[0], tokenize=True))
    for token in {fmt.roles["assistant"].suffix.strip(), fmt.roles["user"].prefix} & set(fmt.special_tokens):
        assert tokenizer.token_to_id(token) in ids


@pytest.mark.parametrize("name", list(ALL))
def test_loss_spans_are_exactly_each_assistant_content_and_suffix(name):
    fmt = ALL[name]
    for messages in conversations():
        rendered = fmt.render(messages)
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        assert len(rendered.loss_spans) == len(assistant)
        suffix = fmt.roles["assistant"].suffix
        for (start, stop), content in zip(rendered.loss_spans, assistant):
            expected = (content.strip() if fmt.strip_content else content) + suffix
            assert rendered.text[start:stop] == expected
            assert rendered.text[:start].endswith(fmt.roles["assistant"].prefix)  # the prefix is never trained on
        # what is left outside the spans is the conversation without the assistant replies
        outside, last = [], 0
        for start, stop in rendered.loss_spans:
            outside.append(rendered.text[last:start])
            last = stop
        outside.append(rendered.text[last:])
        expected_outside = fmt.bos + "".join(
            fmt.roles[m["role"]].prefix
            + ("" if m["role"] == "assistant" else (m["content"].strip() if fmt.strip_content else m["content"]))
            + ("" if m["role"] == "assistant" else fmt.roles[m["role"]].suffix)
            for m in messages
        )
        assert "".join(outside) == expected_outside


def test_the_built_in_formats_write_what_their_models_were_trained_on():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert CHATML.render(messages).text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    # the StableLM 2 Zephyr 1.6B model card's example format
    assert ZEPHYR.render(messages[1:], add_generation_prompt=False).text == (
        "<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello!<|endoftext|>\n"
    )
    assert ZEPHYR.render(messages[1:2], add_generation_prompt=True).text == "<|user|>\nHi<|endoftext|>\n<|assistant|>\n"
    assert LLAMA3.render([{"role": "user", "content": " Hi \n"}], add_generation_prompt=True).text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert (CHATML.end_of_turn, ZEPHYR.end_of_turn, LLAMA3.end_of_turn) == ("<|im_end|>", EOS_TOKEN, "<|eot_id|>")


@pytest.mark.parametrize("name", list(ALL))
def test_bad_messages_name_the_message_in_render_and_in_transformers(name, tokenizers):
    fmt = ALL[name]
    hf = hf_tokenizer(load_tokenizer(tokenizers[name]), fmt)
    ok = {"role": "user", "content": "hi"}
    cases = [
        ([ok, ok, {"role": "tool", "content": "x"}], "messages[2].role"),
        ([ok, {"role": "assistant", "content": ["a", "list"]}], "messages[1].content"),
        ([{"role": "user"}], "messages[0].content"),
    ]
    for messages, field in cases:
        with pytest.raises(ChatFormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
            fmt.render(messages)
        with pytest.raises(Exception, match=field.replace("[", r"\[").replace("]", r"\]")):
            hf.apply_chat_template(messages, tokenize=False)
    with pytest.raises(ChatFormatError, match=r"records\[7\]\[0\]: a message must be an object"):
        fmt.render(["hi"], where="records[7]")
    with pytest.raises(ChatFormatError, match="must be a list of messages"):
        fmt.render("hi")


# ------------------------------------------------------------------------------ definitions: json, names, custom


@pytest.mark.parametrize("name", list(ALL))
def test_to_json_round_trips_and_the_fingerprint_follows_the_template(name):
    fmt = ALL[name]
    data = json.loads(json.dumps(fmt.to_json()))
    again = ChatFormat.from_json(data)
    assert again == fmt and again.jinja() == fmt.jinja() and again.jinja_sha256() == fmt.jinja_sha256()
    changed = dict(data, generationPrompt=data["generationPrompt"] + " ")
    assert ChatFormat.from_json(changed).jinja_sha256() != fmt.jinja_sha256()
    assert len({f.jinja_sha256() for f in ALL.values()}) == len(ALL)


def test_from_json_names_the_bad_field():
    data = CHATML.to_json()
    for broken, field in [
        (
            {**data, "roles": {**data["roles"], "user": {"prefix": "u"}}},
            r"manifest.json: chatTemplate.roles.user.suffix",
        ),
        ({**data, "specialTokens": ["<|a|>", ""]}, r"chatTemplate.specialTokens"),
        ({**data, "name": 3}, r"chatTemplate.name"),
        ({**data, "stripContent": "yes"}, r"chatTemplate.stripContent"),
        ([], r"must be an object"),
    ]:
        with pytest.raises(ChatFormatError, match=field):
            ChatFormat.from_json(broken, "manifest.json: chatTemplate")


def test_custom_formats_come_from_the_spec_and_name_what_is_missing():
    fmt = chat_format(CUSTOM)
    assert fmt.name == "custom" and fmt.generation_prompt == "### Assistant:\n" and fmt.end_of_turn == "<|end|>"
    assert fmt.special_tokens == ("<|sys|>", "</s|>", "<|end|>")
    no_marker = ChatTemplateSpec(
        format="custom",
        system=ChatRoleSpec("S: ", "\n"),
        user=ChatRoleSpec("U: ", "\n"),
        assistant=ChatRoleSpec("A: ", "\n"),
    )
    assert chat_format(no_marker).end_of_turn is None and chat_format(no_marker).special_tokens == ()
    with pytest.raises(ChatFormatError, match=r"spec.tokenizer.chatTemplate.user: is required with format custom"):
        chat_format(ChatTemplateSpec(format="custom", system=no_marker.system, assistant=no_marker.assistant))
    with pytest.raises(ChatFormatError, match="'chatlm' is not a chat format; use one of chatml, zephyr, llama3"):
        named_format("chatlm")
    assert chat_format(ChatTemplateSpec(format="llama3")) is LLAMA3


def test_chat_template_arg_reads_names_and_custom_files(tmp_path):
    assert chat_template_arg("zephyr") is ZEPHYR and chat_template_arg(None) is None
    block = tmp_path / "template.yaml"
    block.write_text(
        "chatTemplate:\n  format: custom\n  system: {prefix: 'S: ', suffix: '<|e|>'}\n"
        "  user: {prefix: 'U: ', suffix: '<|e|>'}\n  assistant: {prefix: 'A: ', suffix: '<|e|>'}\n"
        "  specialTokens: ['<|e|>']\n"
    )
    fmt = chat_template_arg(str(block))
    assert fmt is not None and fmt.end_of_turn == "<|e|>" and fmt.roles["user"].prefix == "U: "
    block.write_text("format: custom\nuser: {prefix: 'U: ', suffix: x}\nsystm: {prefix: a, suffix: b}\n")
    with pytest.raises(DataError, match=r"(?s)template.yaml.*chatTemplate.systm: unknown field"):
        chat_template_arg(str(block))
    with pytest.raises(DataError, match="neither a chat format"):
        chat_template_arg(str(tmp_path / "nope.yaml"))


# ------------------------------------------------------------------------------ tokenizer special tokens


def test_a_trained_tokenizer_reserves_the_chat_tokens_within_its_vocab_size(tokenizers):
    for name, fmt in ALL.items():
        tokenizer = load_tokenizer(tokenizers[name])
        assert vocab_size(tokenizer) <= VOCAB
        assert tokenizer.token_to_id(EOS_TOKEN) == 0 and tokenizer.token_to_id(PAD_TOKEN) == 1
        assert missing_chat_tokens(tokenizer, fmt) == []
        check_chat_tokens(tokenizer, fmt, "spec.tokenizer.path")
        text = fmt.render(conversations()[1]).text
        assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
        stripped = tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=True)
        assert not any(t in stripped for t in fmt.special_tokens if t not in "".join(CONTENTS))
    with pytest.raises(DataError, match=r"use at least 262 \(256 bytes \+ 6 special tokens.*llama3"):
        train_tokenizer(["abc"], 261, None, LLAMA3)


def test_add_chat_tokens_adds_special_tokens_and_check_names_the_field(tmp_path):
    plain = train_tokenizer([" ".join(CONTENTS) * 4], VOCAB)
    with pytest.raises(DataError, match=r"spec.tokenizer.path: .*<\|im_start\|>, <\|im_end\|>.*add-chat-tokens"):
        check_chat_tokens(plain, CHATML, "spec.tokenizer.path")
    before = vocab_size(plain)
    plain.add_tokens(["<|im_end|>"])  # present, but as an ordinary added token: still not what the format needs
    assert missing_chat_tokens(plain, CHATML) == ["<|im_start|>", "<|im_end|>"]
    chat = add_chat_tokens(plain, CHATML)
    assert missing_chat_tokens(plain, CHATML) == ["<|im_start|>", "<|im_end|>"]  # the input is left as it was
    assert missing_chat_tokens(chat, CHATML) == []
    assert vocab_size(chat) == before + 2 and chat.token_to_id("<|im_end|>") == plain.token_to_id("<|im_end|>")
    assert add_chat_tokens(chat, CHATML).to_str() == chat.to_str()  # nothing left to add
    ids = chat.encode("a<|im_start|>user\nb<|im_end|>").ids
    assert chat.token_to_id("<|im_start|>") in ids and chat.decode(ids) == "auser\nb"


def test_add_chat_tokens_command_writes_a_new_tokenizer(tmp_path, capsys):
    source = tmp_path / "tok.json"
    save_tokenizer(train_tokenizer([" ".join(CONTENTS) * 4], VOCAB), source)
    parser = argparse.ArgumentParser()
    add_chat_tokens_command(parser.add_subparsers())
    args = parser.parse_args(
        ["add-chat-tokens", "--chat-template", "llama3", str(source), "--out", str(tmp_path / "o.json")]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    result = load_tokenizer(tmp_path / "o.json")
    assert missing_chat_tokens(result, LLAMA3) == []
    assert f"spec.model.vocabSize must be at least {vocab_size(result):,}" in out and "<|eot_id|>=" in out
    args = parser.parse_args(["add-chat-tokens", "--chat-template", "chatlm", str(source), "--out", "x.json"])
    assert args.func(args) == 1
    assert "neither a chat format (chatml, zephyr, llama3) nor a file" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Hugging Face export


def _tiny_model(vocab: int = VOCAB):
    from stagerun.core.spec.model import ModelSpec
    from stagerun.core.spec.presets import resolve_model
    from stagerun.trainer.model import Transformer, init_weights

    spec = resolve_model(
        ModelSpec(vocab_size=vocab, dim=64, layers=2, heads=4, kv_heads=2, ffn_hidden=96, max_seq_len=256)
    )
    model = Transformer(spec)
    init_weights(model, 0)
    return model, spec


@pytest.mark.parametrize("name", ["chatml", "llama3", "custom"])
def test_an_exported_folder_applies_the_chat_template_trained_on_and_generate_stops_at_the_end_of_turn(
    name, tokenizers, tmp_path
):
    from stagerun.trainer.hf.export import export_model

    fmt = ALL[name]
    model, spec = _tiny_model()
    tokenizer = load_tokenizer(tokenizers[name])
    end_id = tokenizer.token_to_id(fmt.end_of_turn)
    prompt = torch.tensor([tokenizer.encode(fmt.render(conversations()[0][:2], add_generation_prompt=True).text).ids])
    hidden = []
    hook = model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    with torch.no_grad():  # point the end-of-turn row along the final hidden states: the model replies with it
        model(prompt)
        hook.remove()
        direction = hidden[0].mean(dim=(0, 1))
        model.output.weight[end_id] = 100 * direction / direction.norm() * model.output.weight.norm(dim=-1).max()
    export_model(model, spec, tmp_path / "hf", tokenizer=tokenizers[name], chat_template=fmt)

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for messages in conversations(20, seed=1):
        ids = input_ids(hf_tok.apply_chat_template(messages, tokenize=True))
        assert ids == tokenizer.encode(fmt.render(messages).text).ids
    assert hf_tok.eos_token == fmt.end_of_turn and hf_tok.eos_token_id == end_id
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == fmt.jinja()
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [end_id, tokenizer.token_to_id(EOS_TOKEN)]

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=8, do_sample=False)
    assert generated[0, prompt.shape[1] :].tolist() == [end_id]  # stopped at the end of the reply


def test_a_zephyr_export_stops_at_the_document_eos_it_shares(tokenizers, tmp_path):
    from stagerun.trainer.hf.export import export_model

    model, spec = _tiny_model()
    export_model(model, spec, tmp_path / "hf", tokenizer=tokenizers["zephyr"], chat_template=ZEPHYR)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0  # <|endoftext|> ends both a reply and a document: listed once
    special = json.loads((tmp_path / "hf" / "special_tokens_map.json").read_text())
    assert special["eos_token"] == EOS_TOKEN
    assert special["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>"]


def test_export_checkpoint_writes_the_template_its_meta_records_and_refuses_a_tokenizer_without_it(
    tokenizers, tmp_path
):
    from stagerun.core.spec import to_manifest
    from stagerun.trainer.checkpoint import CheckpointManager, ModelOptimizerState
    from stagerun.trainer.hf.export import ExportError, export_checkpoint

    model, spec = _tiny_model()
    meta = {
        "tokens": 1024,
        "phase_index": 0,
        "model": {k: v for k, v in to_manifest(spec).items() if k != "init"},
        "chatTemplate": LLAMA3.to_json(),
    }
    root = tmp_path / "ckpt"
    CheckpointManager(str(root), keep=1).save(
        3, {"train": ModelOptimizerState(model, None)}, meta, phase_boundary=False
    )
    result = export_checkpoint(str(root), tmp_path / "hf", tokenizer=tokenizers["llama3"])
    assert "chat template llama3" in result.notes
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = conversations(3, seed=2)[2]
    ids = input_ids(hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    tokenizer = load_tokenizer(tokenizers["llama3"])
    assert ids == tokenizer.encode(LLAMA3.render(messages, add_generation_prompt=True).text).ids

    with pytest.raises(ExportError, match=r"chatml.json: the tokenizer lacks the llama3 chat template's special"):
        export_checkpoint(str(root), tmp_path / "hf2", tokenizer=tokenizers["chatml"])
