"""Generated chat and preference data: JSONL a tiny model can learn from, written without downloading anything.

Every conversation asks a small task whose answer follows from the question (add, subtract or multiply two
numbers; repeat or reverse a few words) and the assistant answers it correctly, so a model that learns the responses
shows it in its loss. Some conversations open with a system message, some run two or three rounds, and the numbers
and word counts vary the lengths. Preference pairs share such a prompt; the chosen response is the correct answer,
the rejected one a plausible wrong answer (off by a little, or the words out of order), so a DPO phase has a signal.

The same ``(n, seed)`` always gives the same bytes (``random.Random(seed)``, no other state), which the run-start
tokenization's reuse relies on. As source paths they are the built-in corpora ``builtin:chat-arithmetic`` (format
chat) and ``builtin:preference-arithmetic`` (format preference), of ``BUILTIN_RECORDS`` records each.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "BUILTIN_CHAT",
    "BUILTIN_CHAT_CORPORA",
    "BUILTIN_PREFERENCE",
    "BUILTIN_RECORDS",
    "CHAT_CORPUS_VERSION",
    "builtin_jsonl",
    "chat_records",
    "preference_records",
    "write_chat_jsonl",
    "write_preference_jsonl",
]

BUILTIN_CHAT = "builtin:chat-arithmetic"
BUILTIN_PREFERENCE = "builtin:preference-arithmetic"
BUILTIN_CHAT_CORPORA = {BUILTIN_CHAT: "chat", BUILTIN_PREFERENCE: "preference"}  # path -> what it holds
BUILTIN_RECORDS = 4000  # a few epochs of a tiny model's SFT / DPO phase in well under a minute of tokenizing
BUILTIN_SEED = 0
CHAT_CORPUS_VERSION = 1  # bump when the generator changes: cached shard sets of the old version are not reused

SYSTEM_PROMPTS = (
    "You are a careful assistant. Answer exactly.",
    "You are a calculator. Reply with the result.",
    "Answer briefly and correctly.",
)
WORDS = (
    "apple river stone cloud green quick seven north table light paper music garden silver window forest "
    "orange bridge candle winter"
).split()


def _task(rng: random.Random) -> tuple[str, str, str]:
    """A question, its correct answer and a plausible wrong one."""
    kind = rng.choice(("add", "sub", "mul", "copy", "reverse"))
    if kind in ("add", "sub", "mul"):
        a, b = rng.randint(0, 99 if kind != "mul" else 12), rng.randint(0, 99 if kind != "mul" else 12)
        symbol, value = {"add": ("+", a + b), "sub": ("-", a - b), "mul": ("*", a * b)}[kind]
        wrong = value + rng.choice((-10, -2, -1, 1, 2, 10))
        question = rng.choice((f"What is {a} {symbol} {b}?", f"Compute {a} {symbol} {b}.", f"{a} {symbol} {b} = ?"))
        return question, f"{a} {symbol} {b} = {value}", f"{a} {symbol} {b} = {wrong}"
    words = rng.sample(WORDS, rng.randint(2, 7))
    text = " ".join(words)
    if kind == "copy":
        answer = text
        question = f"Repeat exactly: {text}"
    else:
        answer = " ".join(reversed(words))
        question = f"Reverse the order of these words: {text}"
    shuffled = words[:]
    while shuffled == (words if kind == "copy" else list(reversed(words))):
        rng.shuffle(shuffled)
    return question, answer, " ".join(shuffled)


def _prompt(rng: random.Random, rounds: int) -> tuple[list[dict], tuple[str, str]]:
    """A conversation up to its last user turn (earlier rounds answered correctly), and the last turn's answers."""
    messages: list[dict] = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rounds - 1):
        question, answer, _ = _task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    question, answer, wrong = _task(rng)
    messages.append({"role": "user", "content": question})
    return messages, (answer, wrong)


def _rounds(rng: random.Random) -> int:
    return rng.choices((1, 2, 3), weights=(6, 3, 1))[0]


def chat_records(n: int, seed: int = 0) -> Iterator[dict]:
    """``n`` conversations ({"messages": [...]}), each ending with a correct assistant answer."""
    rng = random.Random(seed)
    for _ in range(n):
        messages, (answer, _) = _prompt(rng, _rounds(rng))
        yield {"messages": [*messages, {"role": "assistant", "content": answer}]}


def preference_records(n: int, seed: int = 0) -> Iterator[dict]:
    """``n`` preference pairs ({"prompt", "chosen", "rejected"}): chosen correct, rejected wrong. Both accepted
    shapes occur: a one-question prompt as a string with string responses, a longer one as messages with message
    responses."""
    rng = random.Random(seed)
    for _ in range(n):
        messages, (answer, wrong) = _prompt(rng, _rounds(rng))
        if len(messages) == 1 and rng.random() < 0.5:
            yield {"prompt": messages[0]["content"], "chosen": answer, "rejected": wrong}
        else:
            yield {
                "prompt": messages,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }


def _write(path: str | os.PathLike[str], records: Iterator[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # whole or not at all: a reader never sees half the corpus
    return path


def write_chat_jsonl(path: str | os.PathLike[str], n: int, seed: int = 0) -> Path:
    """Write ``chat_records(n, seed)`` as JSONL to ``path``."""
    return _write(path, chat_records(n, seed))


def write_preference_jsonl(path: str | os.PathLike[str], n: int, seed: int = 0) -> Path:
    """Write ``preference_records(n, seed)`` as JSONL to ``path``."""
    return _write(path, preference_records(n, seed))


def builtin_jsonl(source_path: str, folder: str | os.PathLike[str]) -> Path:
    """The JSONL file of a built-in chat corpus in ``folder``, written once (its name carries the version, size and
    seed, so an existing file is always the right one, and keeps its mtime: the tokenization's units are reused)."""
    content = BUILTIN_CHAT_CORPORA[source_path]
    name = f"{source_path.removeprefix('builtin:')}-v{CHAT_CORPUS_VERSION}-{BUILTIN_RECORDS}-{BUILTIN_SEED}.jsonl"
    path = Path(folder) / name
    if not path.is_file():
        write = write_chat_jsonl if content == "chat" else write_preference_jsonl
        write(path, BUILTIN_RECORDS, BUILTIN_SEED)
    return path
