"""reasoning-gym, adapted once: task names and settings checked, items generated, worked solutions.

The ingest source (worked problems as documents), the prompts stage (train and held-out prompts)
and the verifiers (`tasks.core.chat.score`) all go through here, so a fix to how a generator is
called reaches every user of it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from typing import Any, Iterator

from tasks.core.base import StageError

_COT_RESULT = re.compile(r"(?:^|\n)#### [^\n]*\s*$")  # gsm_symbolic's last line repeats the answer


def quiet():
    """Some generators print (e.g. bf) when built or asked for an item."""
    return contextlib.redirect_stdout(io.StringIO())


def check_task(task: str, kwargs: dict[str, Any], setting: str) -> None:
    """StageError naming `setting` when `task` is unknown or its generator settings fail. Builds the
    config and one item (milliseconds): some settings pass the config class and break the generator,
    e.g. aiw's task_types from YAML are strings where it wants its TaskType enum."""
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        known = ", ".join(sorted(DATASETS)[:8])
        raise StageError(f"{setting}: unknown task {task!r} (known: {known}, ... {len(DATASETS)} in all)")
    if {"size", "seed"} & set(kwargs):
        raise StageError(f"{setting}.{task}: may not set size/seed")
    try:
        conf = DATASETS[task][1](size=1, seed=0, **kwargs)
        getattr(conf, "validate", lambda: None)()
        with quiet():
            DATASETS[task][0](conf)[0]
    except Exception as e:  # noqa: BLE001 - any constructor/validate/generation failure is a bad setting
        msg = " ".join(f"{type(e).__name__}: {e}".splitlines())
        raise StageError(f"{setting}.{task}: bad generator settings ({msg})") from None


def items(task: str, kwargs: dict[str, Any], size: int, seed: int, setting: str) -> Iterator[dict]:
    """The generator's items 0..size-1 of (task, kwargs, seed), in index order; a generator failure is a
    StageError naming `setting` and the item."""
    import reasoning_gym

    try:
        with quiet():
            ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"{setting}.{task}: generator failed ({type(e).__name__}: {e})") from None
    for i in range(size):
        try:
            with quiet():
                item = ds[i]
        except Exception as e:  # noqa: BLE001
            raise StageError(f"{setting}.{task}: generator failed on item {i} ({type(e).__name__}: {e})") from None
        yield item


def solution_of(metadata: dict) -> str | None:
    """A worked solution from the generator's metadata (gsm_symbolic's answer_cot), or None."""
    cot = metadata.get("answer_cot") if isinstance(metadata, dict) else None
    if not isinstance(cot, str):
        return None
    cot = _COT_RESULT.sub("", cot.strip()).strip()
    return cot or None


@functools.lru_cache(maxsize=None)
def verifier(task: str):
    """reasoning-gym's score function for `task`: (answer, entry) -> score in [0, 1].

    An unknown task raises ValueError (the prompts stage validates task names up front)."""
    import reasoning_gym

    with quiet():  # some generators print when built
        return reasoning_gym.get_score_answer_fn(task)
