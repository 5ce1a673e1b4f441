"""What the benchmark feeds every system: conversations of a given length, follow-up messages,
the fidelity prompts and the scripted chat. Everything is fixed text, so every system (and every
run) sees the same prompts.

Histories are built from `resources/texts/alice.txt` (public domain): the user asks to go on with
the story and the assistant answers with the next passage, until the conversation, rendered with
the model's chat template, reaches the wanted number of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from engine.resources import resource_location

LONG_TEXT_PATH = resource_location("texts", "alice.txt")

# A new user message of about 30 tokens; a different one for each repeat, so that every repeat
# prefills a message the cache has not seen (the kept cache is cropped back to the history).
FOLLOW_UPS = (
    "Thank you. Now tell me in a few sentences what Alice learned in this part of the story, and why it matters.",
    "Good. Which of the characters we met so far do you find the most curious, and what makes them so strange?",
    "Please list three things in this passage that could not happen in the real world, each with a short reason.",
    "How would you describe the tone of the story so far to a friend who has never read it? Answer briefly.",
    "Imagine you could ask Alice one question at this point of the story. What would you ask her, and why?",
)

# A follow-up that asks for a long answer: the decode figures are measured on its reply.
LONG_ANSWER = ("Retell everything that happened so far in your own words, in great detail, "
               "as a long story with many paragraphs.")

# The fidelity prompts: 20 questions about one shared passage (which every strategy keeps in its
# cache, as a chat about a pasted document would).
FIDELITY_QUESTIONS = (
    "Who is the main character of this passage?",
    "What was Alice doing before she saw the White Rabbit?",
    "What did the White Rabbit take out of its waistcoat-pocket?",
    "Describe the rabbit-hole in one sentence.",
    "What did Alice find on the shelves as she fell?",
    "Why did Alice not drop the jar of marmalade?",
    "What did Alice think about latitude and longitude?",
    "Who is Dinah?",
    "What did Alice wonder about cats and bats?",
    "How did the fall end?",
    "What did Alice see in the long, low hall?",
    "What did Alice find on the little three-legged table?",
    "What was behind the low curtain?",
    "What was written on the bottle?",
    "Why was Alice careful before drinking from the bottle?",
    "What happened after Alice drank from the bottle?",
    "Why could Alice not reach the key after she shrank?",
    "What was written on the cake?",
    "Summarise the passage in two sentences.",
    "What is the mood of this passage?",
)

# The chat workload: free questions, a turn that edits earlier code and one that summarises an
# earlier reply (the kinds of turns where a reply repeats text from the conversation).
CHAT_TURNS = (
    "What is a hash table? Answer in three sentences.",
    "Write a Python function that counts how often each word appears in a text.",
    "Change that function so that it ignores case and punctuation. Show the whole function again.",
    "Summarise your answer about hash tables in one sentence.",
    "Give me three tips for writing clear emails.",
    "Explain recursion to a ten-year-old.",
)

RenderFn = Callable[[Sequence[dict[str, str]]], int]  # messages -> rendered token count


def long_text() -> str:
    return LONG_TEXT_PATH.read_text(encoding="utf-8")


def passages(text: str | None = None) -> list[str]:
    """The long text's paragraphs (blank-line separated, re-wrapped onto one line each)."""
    body = long_text() if text is None else text
    paras = [" ".join(p.split()) for p in body.split("\n\n")]
    return [p for p in paras if len(p) > 40]


def _exchanges(paras: Sequence[str]) -> Iterator[tuple[str, str]]:
    asks = ("Go on with the story.", "And then?", "Continue, please.", "What happens next?")
    for i, para in enumerate(paras):
        yield asks[i % len(asks)], para


@dataclass(frozen=True)
class History:
    """A conversation of (about) `target` tokens that ends with an assistant reply."""

    target: int
    messages: tuple[dict[str, str], ...]
    tokens: int  # its rendered length (chat template, no generation prompt)


def build_history(target: int, render_len: RenderFn, tokenize: Callable[[str], list[int]],
                  detokenize: Callable[[list[int]], str]) -> History:
    """The longest story conversation whose rendered length is at most `target` tokens.

    The last assistant reply is cut (by tokens) so that the conversation comes within a user
    message's length of `target`.
    """
    messages: list[dict[str, str]] = []
    length = 0
    paras = passages()
    for ask, answer in _exchanges(paras * 8):
        trial = [*messages, {"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        n = render_len(trial)
        if n <= target:
            messages, length = trial, n
            if n == target:
                break
            continue
        base = render_len([*messages, {"role": "user", "content": ask}, {"role": "assistant", "content": "."}])
        ids = tokenize(answer)
        keep = max(target - base, 0)
        while keep > 0:
            cut = detokenize(ids[:keep]).strip()
            trial = [*messages, {"role": "user", "content": ask}, {"role": "assistant", "content": cut}]
            n = render_len(trial)
            if cut and n <= target:
                messages, length = trial, n
                break
            keep -= max(1, n - target)
        break
    return History(target, tuple(messages), length)


def fidelity_document(max_tokens: int, tokenize: Callable[[str], list[int]],
                      detokenize: Callable[[list[int]], str]) -> str:
    """The first `max_tokens` tokens of the long text's story (after its title line)."""
    body = long_text().split("\n", 1)[1]
    return detokenize(tokenize(body)[:max_tokens]).strip()


def fidelity_prompt(document: str, question: str) -> str:
    return f"Read this passage and answer the question after it.\n\n{document}\n\nQuestion: {question}"


def as_messages(history: History, extra: str | None = None) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [dict(m) for m in history.messages]
    if extra is not None:
        msgs.append({"role": "user", "content": extra})
    return msgs
