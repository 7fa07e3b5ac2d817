"""The one chat format of SFT, RL and evaluation, and scoring with the task library's verifiers.

Template (token level; the role markers are single special-token ids, never text):

    prompt      <|bos|><|user|>{question}<|end|><|assistant|>
    completion  {solution}\\nAnswer: {answer}<|end|>        (or just "Answer: {answer}<|end|>")

`prompt_ids` is what a sampler feeds the model; `example_ids` is the prompt plus the
completion and the closing `<|end|>`, with a loss mask that is 1 exactly on the completion's
tokens and that `<|end|>` (SFT learns when to stop) and 0 on the prompt.

Text is always encoded as plain text: a special-token string inside a question or completion
(say a literal "<|end|>") becomes ordinary byte-level tokens, never the special id, so user
text cannot forge a turn boundary. `tokenizers` has one switch for that,
`Tokenizer.encode_special_tokens`; these functions set it for the duration of one encode and
restore it (nothing is changed when it is already True). A caller sharing one Tokenizer
between threads that also encode with special matching on should set it to True once instead.
The question and the completion are encoded separately (the special ids between them are a
hard boundary), so the completion's tokens are the same whether they came from
`example_ids` or from sampling after `prompt_ids`.

Answer extraction (`extract_answer`): the text after the LAST "Answer:" (case-sensitive),
stripped of surrounding whitespace, all of it (multi-line answers are kept whole: the model
ends its answer with `<|end|>`, which `decode_completion` cuts at). With no "Answer:" at all,
the whole stripped completion is the answer. `extract_answer(completion_text(a, s)) == a`
for every answer that is already stripped and does not itself contain "Answer:".

Scoring: `verifier(task)` is reasoning-gym's `score_answer` for the task (cached);
`score(row, completion)` rebuilds the generator's entry from a prompts-table row (metadata is
stored as JSON, so tuples come back as lists: the default tasks' verifiers read only
`answer`, see tests/test_chat.py) and never raises: a verifier exception scores 0.0. Scores
lie in [0, 1]; several verifiers give partial credit (e.g. the gold answer as a substring of
a longer reply scores len(gold) / len(reply)).
"""

from __future__ import annotations

import json
import math
from typing import Any

from tokenizers import Tokenizer

from tasks.core.base import StageError
from tasks.core.gym import verifier
from tasks.core.tokens import ASSISTANT, BOS, END, USER, special_ids

ANSWER_PREFIX = "Answer:"
CHAT_TOKENS = (BOS, USER, END, ASSISTANT)
# The same format for transformers' chat helpers (saved with an exported model): `apply_chat_template(
# [{"role": "user", "content": q}], add_generation_prompt=True)` gives `prompt_ids(tok, q)`.
HF_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}" + END
    + "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}" + END
    + "{% else %}{{ raise_exception('slmflow models know the user and assistant roles only') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def _ids(tok: Tokenizer) -> dict[str, int]:
    """{token: id} of the chat's special tokens; StageError when the tokenizer lacks one."""
    ids = {}
    for t in CHAT_TOKENS:
        i = tok.token_to_id(t)
        if i is None:
            raise StageError(f"chat: the tokenizer has no {t} token (tokenizer.special_tokens must include it)")
        ids[t] = i
    return ids


def encode_plain(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` as plain text: special-token strings in it are not matched."""
    if not text:
        return []
    if tok.encode_special_tokens:
        return tok.encode(text, add_special_tokens=False).ids
    tok.encode_special_tokens = True
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def prompt_ids(tok: Tokenizer, question: str) -> list[int]:
    """`<|bos|><|user|>{question}<|end|><|assistant|>`: what the model continues."""
    s = _ids(tok)
    return [s[BOS], s[USER], *encode_plain(tok, question), s[END], s[ASSISTANT]]


def answer_line(answer: str) -> str:
    """The one rendering of an answer, in prompts, completions and documents alike: `Answer: {answer}`
    (stripped; `extract_answer` reads it back, a multi-line answer included)."""
    return f"{ANSWER_PREFIX} {str(answer).strip()}"


def completion_text(answer: str, solution: str | None = None) -> str:
    """`Answer: {answer}`, or `{solution}\\nAnswer: {answer}` when there is a worked solution: what SFT
    teaches and RL rewards. Both parts are stripped; an empty or blank solution counts as none."""
    solution = solution.strip() if solution else ""
    return f"{solution}\n{answer_line(answer)}" if solution else answer_line(answer)


def document_text(question: str, answer: str | None, solution: str | None = None) -> str:
    """A worked problem as a pretraining document: question, worked solution, answer, a blank line apart."""
    parts = [str(question).strip(), *([solution.strip()] if solution and solution.strip() else [])]
    if answer is not None:
        parts.append(answer_line(answer))
    return "\n\n".join(parts) + "\n"


def example_ids(tok: Tokenizer, question: str, completion: str) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): prompt_ids + completion tokens + `<|end|>`; the mask is 1 exactly on
    the completion tokens and the final `<|end|>`, 0 on the prompt."""
    prompt = prompt_ids(tok, question)
    target = [*encode_plain(tok, completion), tok.token_to_id(END)]
    return prompt + target, [0] * len(prompt) + [1] * len(target)


def decode_completion(tok: Tokenizer, ids: list[int]) -> str:
    """Text of generated ids up to (not including) the first `<|end|>`; other special ids dropped."""
    ids = [int(i) for i in ids]
    end = _ids(tok)[END]
    if end in ids:
        ids = ids[: ids.index(end)]
    specials = set(special_ids(tok).values())
    return tok.decode([i for i in ids if i not in specials], skip_special_tokens=False)


def extract_answer(completion: str) -> str:
    """The stripped text after the last "Answer:"; the stripped completion when there is none."""
    head, sep, tail = completion.rpartition(ANSWER_PREFIX)
    return (tail if sep else completion).strip()


def entry_of(row: dict) -> dict:
    """The generator entry {"question", "answer", "metadata"} of a prompts-table row."""
    metadata = row.get("metadata")
    if isinstance(metadata, (str, bytes)):
        metadata = json.loads(metadata) if metadata else {}
    return {"question": row["question"], "answer": row["answer"], "metadata": metadata or {}}


def score(row: dict, completion: str) -> float:
    """The task's verifier on the extracted answer; never raises (an exception scores 0.0)."""
    fn = verifier(row["task"])
    try:
        value = float(fn(extract_answer(completion), entry_of(row)))
    except Exception:  # noqa: BLE001 - a verifier crash on a model's output is a wrong answer
        return 0.0
    return value if math.isfinite(value) else 0.0


def jsonable(value: Any) -> Any:
    """`value` with non-JSON types converted: tuples/sets -> lists, numpy scalars/arrays -> Python,
    dict keys -> str, anything else unknown -> str. Used for the prompts table's metadata."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, default=str))
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return jsonable(tolist())
    return str(value)
