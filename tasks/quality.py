"""Quality: Gopher's heuristic filters (MassiveText's quality and repetition rules, Rae et al. 2021),
one score column per heuristic. C4's rules (terminal punctuation, "lorem ipsum", curly braces, ...)
are not implemented: they would drop every Python file of the default corpus.

Per document (words = runs of non-whitespace; lines = the non-blank lines of `text`):

- word_count, mean_word_length (characters per word)
- symbol_to_word_ratio: max(#'s, ellipses ("..." or "…")) per word (Gopher: "for either")
- ellipsis_line_fraction / bullet_line_fraction: lines ending in an ellipsis / starting
  with a bullet (•, ‣, ◦, ●, -, *) after leading whitespace
- duplicate_line_fraction: characters in lines that repeat an earlier line of the same
  document, over the document's characters (the first copy is not counted)
- top_2gram_fraction: word characters covered by the most frequent word bigram (counted
  only when it occurs at least twice), over all word characters
- duplicate_5gram_fraction: word characters covered by word 5-grams that repeat an earlier
  5-gram of the document (overlaps counted once), over all word characters
- alpha_word_fraction: words with at least one alphabetic character

Rules (`Thresholds`, Gopher defaults; None switches a rule off) are checked in field order;
`quality_drop_reason` is the first failing rule's name (null when kept). Gopher's rules were
set for web prose: Python source (`#` comments, repeated `return`/`else:` lines, long dotted
names) and the short reasoning-gym problems fail them wholesale, so `per_source` relaxes
them for those sources by default. Measured on the default corpus (configs/default.yaml
sources before dedup: 3823 documents, 12.3M characters): Gopher's defaults alone keep 23% of
the documents (67% of the characters; 2527 of 3000 reasoning problems fail min_words, 270
of 729 stdlib files fail a rule), the defaults here keep 98.9% (98.3%): what goes is
near-empty files, codec/token tables, heavily repeated code and a few pydoc grammar listings.
Unknown sources get `thresholds`.

Outputs: `documents` (kept rows, input schema + the score columns + `quality_kept`, one
shard per input shard with the same name), `dropped` (reason: the first failing rule) and `scores` (`doc_id`, `source`, `chars`, the
score columns, `quality_kept`, `quality_drop_reason` for every input document), so what a
rule removed is one query away. Metrics: a filter's (tasks.core.filters), with dropped.<rule> for
every rule. Each shard's decision is made on a worker that writes its outputs and scores; the scores
table is then assembled from per-shard files, so memory is bounded by the shards in flight.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from tasks.core.filters import Decision, filter_documents
from tasks.core.outputs import document_shards
from tasks.core.shared_scratch import scratch_files
from tasks.core.stage import Stage, StageConfig, StageContext, StageError
from tasks.core.store import Artifact, write_parquet

VERSION = 2  # 2: a dropped table (tasks.core.filters)
SCORES = ("word_count", "mean_word_length", "symbol_to_word_ratio", "ellipsis_line_fraction", "bullet_line_fraction",
          "duplicate_line_fraction", "top_2gram_fraction", "duplicate_5gram_fraction", "alpha_word_fraction")
BULLET = r"^\s*[•‣◦●\-*]"
ELLIPSIS = r"(\.\.\.|…)\s*$"
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier: the n-gram hash depends on word order
# Text scored at once: its words, exploded one row each with their hashes and n-grams, take ~40x the
# text's size (a 7 MB shard of the default corpus scored whole: +290 MB of RSS; in 1 MB batches: +100 MB).
BATCH_CHARS = 1 << 20


class Thresholds(StageConfig):
    """One rule per field, checked in this order: a document fails `min_x` when x < value and
    `max_x` when x > value. None switches the rule off."""

    min_words: int | None = Field(50, description="Gopher: at least 50 words")
    max_words: int | None = Field(100_000, description="Gopher: at most 100,000 words")
    min_mean_word_length: float | None = Field(3.0, description="Gopher: mean word length in [3, 10] characters")
    max_mean_word_length: float | None = Field(10.0, description="Gopher: mean word length in [3, 10] characters")
    max_symbol_to_word_ratio: float | None = Field(0.1, description="Gopher: # or ellipses per word at most 0.1")
    max_ellipsis_line_fraction: float | None = Field(0.3, description="Gopher: at most 30% of lines end in an ellipsis")
    max_bullet_line_fraction: float | None = Field(0.9, description="Gopher: at most 90% of lines start with a bullet")
    max_duplicate_line_fraction: float | None = Field(0.2, description="Gopher: characters in duplicate lines at most 20%")
    max_top_2gram_fraction: float | None = Field(0.2, description="Gopher: top word bigram covers at most 20% of characters")
    max_duplicate_5gram_fraction: float | None = Field(0.15, description="Gopher: duplicate 5-grams cover at most 15%")
    min_alpha_word_fraction: float | None = Field(0.8, description="Gopher: at least 80% of words contain a letter")


# Relaxations for the default corpus, chosen from its measured score distributions:
# - stdlib (Python source): comment `#`s, repeated short lines (`return`, `else:`, `pass`),
#   dotted names and operators as "words" are normal code; keep the length bounds and the
#   n-gram rules loose enough to drop only generated tables and near-empty files.
# - reasoning_gym: worked problems are 10-300 words and some tasks (word_sorting, spell_backward,
#   letter_counting, caesar_cipher) are by design lists or scrambled letters.
DEFAULT_PER_SOURCE: dict[str, dict[str, float | None]] = {
    "stdlib": {"min_words": 20, "max_mean_word_length": 12.0, "max_symbol_to_word_ratio": None,
               "max_duplicate_line_fraction": 0.3, "max_top_2gram_fraction": 0.3,
               "max_duplicate_5gram_fraction": 0.3, "min_alpha_word_fraction": 0.6},
    "reasoning_gym": {"min_words": 5, "min_mean_word_length": None, "max_mean_word_length": 20.0,
                      "max_symbol_to_word_ratio": None, "max_duplicate_line_fraction": None,
                      "max_top_2gram_fraction": None, "max_duplicate_5gram_fraction": None,
                      "min_alpha_word_fraction": None},
}


class QualityConfig(StageConfig):
    thresholds: Thresholds = Field(default_factory=Thresholds, description="rules for sources not in per_source")
    per_source: dict[str, dict[str, float | None]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_PER_SOURCE.items()},
        description="source -> {rule: value or None}: overrides of `thresholds` for that source")


def check(cfg: QualityConfig) -> None:
    for source, overrides in cfg.per_source.items():
        unknown = sorted(set(overrides) - set(Thresholds.model_fields))
        if unknown:
            raise StageError(f"quality.per_source.{source}: unknown rule {unknown[0]!r} "
                             f"(rules: {', '.join(Thresholds.model_fields)})")


def source_thresholds(cfg: QualityConfig, source: str) -> Thresholds:
    return Thresholds.model_validate({**cfg.thresholds.model_dump(), **cfg.per_source.get(source, {})})


def rule_column(rule: str) -> str:
    """`min_words` -> word_count, `max_top_2gram_fraction` -> top_2gram_fraction."""
    return "word_count" if rule.endswith("_words") else rule[4:]


# ---------------------------------------------------------------------------------------
# Scores


def _ngram_hashes(h: np.ndarray, doc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hash and start index of every word n-gram that lies inside one document.

    h: uint64 word hashes, doc: the document index of each word (non-decreasing)."""
    m = len(h) - n + 1
    if m <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    start = np.flatnonzero(doc[: m] == doc[n - 1:])  # first and last word in the same document
    g = np.zeros(len(start), np.uint64)
    for k in range(n):  # polynomial in the word hashes; uint64 arithmetic wraps (intended)
        g = g * _MIX + h[start + k]
    return g, start


def _word_scores(texts: pl.Series) -> pl.DataFrame:
    """Per document (row index `d`): word counts, characters and the two n-gram repetition scores."""
    words = (pl.DataFrame({"w": texts.str.extract_all(r"\S+")}).with_row_index("d")
             .explode("w").drop_nulls("w")
             .with_columns(n=pl.col("w").str.len_chars().cast(pl.Int64), h=pl.col("w").hash(seed=0),
                           alpha=pl.col("w").str.contains(r"\p{Alphabetic}")))
    n_docs = len(texts)
    doc = words["d"].to_numpy().astype(np.int64)
    h, wlen = words["h"].to_numpy(), words["n"].to_numpy()
    per_doc = (words.group_by("d").agg(word_count=pl.len(), word_chars=pl.col("n").sum(), alpha=pl.col("alpha").sum()))
    out = pl.DataFrame({"d": np.arange(n_docs, dtype=np.uint32)}).join(per_doc, on="d", how="left").fill_null(0).sort("d")

    # Top bigram: occurrences x its characters (its two words), only when it repeats.
    g2, s2 = _ngram_hashes(h, doc, 2)
    top = (pl.DataFrame({"d": doc[s2], "g": g2, "chars": wlen[s2] + wlen[s2 + 1]})
           .group_by("d", "g").agg(count=pl.len(), chars=pl.col("chars").first())
           .filter(pl.col("count") >= 2)
           .group_by("d").agg(top=(pl.col("chars") * pl.col("count")).sort_by("count", "chars").last()))

    # Duplicate 5-grams: every occurrence after the first covers its 5 words; union of covers.
    g5, s5 = _ngram_hashes(h, doc, 5)
    later = ~pl.DataFrame({"d": doc[s5], "g": g5}).select(pl.struct("d", "g").is_first_distinct()).to_series().to_numpy()
    cover = np.zeros(len(h) + 1, np.int64)
    np.add.at(cover, s5[later], 1)
    np.add.at(cover, s5[later] + 5, -1)
    covered = np.cumsum(cover[:-1]) > 0
    dup5 = np.bincount(doc[covered], weights=wlen[covered], minlength=n_docs)

    chars = pl.col("word_chars")
    return (out.join(top.with_columns(pl.col("d").cast(pl.UInt32)), on="d", how="left").sort("d")
            .with_columns(dup5=pl.Series(dup5))
            .select(
                "d", "word_count",
                mean_word_length=_ratio(chars, pl.col("word_count")),
                top_2gram_fraction=pl.min_horizontal(_ratio(pl.col("top").fill_null(0), chars), 1.0),
                duplicate_5gram_fraction=_ratio(pl.col("dup5"), chars),
                alpha_word_fraction=_ratio(pl.col("alpha"), pl.col("word_count")),
            ))


def _ratio(num, den) -> pl.Expr:
    """num / den, 0 where den is 0 (an empty document has no repetition, symbols or letters)."""
    return pl.when(den > 0).then(num.cast(pl.Float64) / den).otherwise(0.0)


def _line_scores(texts: pl.Series) -> pl.DataFrame:
    """Per document (row index `d`): ellipsis, bullet and duplicate-line fractions over non-blank lines."""
    lines = (pl.DataFrame({"line": texts.str.split("\n")}).with_row_index("d").explode("line")
             .filter(pl.col("line").str.strip_chars() != "")
             .with_columns(dup=pl.int_range(pl.len()).over("d", "line") > 0))  # rows stay in text order
    per_doc = lines.group_by("d").agg(
        lines=pl.len(),
        ellipsis=pl.col("line").str.contains(ELLIPSIS).sum(),
        bullet=pl.col("line").str.contains(BULLET).sum(),
        dup_chars=pl.col("line").str.len_chars().filter(pl.col("dup")).sum(),
    )
    total = pl.DataFrame({"d": np.arange(len(texts), dtype=np.uint32), "chars": texts.str.len_chars()})
    return (total.join(per_doc, on="d", how="left").fill_null(0)
            .select("d",
                    ellipsis_line_fraction=_ratio(pl.col("ellipsis"), pl.col("lines")),
                    bullet_line_fraction=_ratio(pl.col("bullet"), pl.col("lines")),
                    duplicate_line_fraction=_ratio(pl.col("dup_chars"), pl.col("chars"))))


def quality_scores(texts: list[str] | pl.Series) -> pl.DataFrame:
    """The score columns (SCORES order) for each text, one row per text in order."""
    texts = pl.Series("text", texts, dtype=pl.String)
    symbols = pl.DataFrame({"text": texts}).with_row_index("d").select(
        "d", hashes=pl.col("text").str.count_matches("#", literal=True),
        ellipses=pl.col("text").str.count_matches(r"\.\.\.|…"))
    df = _word_scores(texts).join(_line_scores(texts), on="d").join(symbols, on="d").sort("d")
    df = df.with_columns(symbol_to_word_ratio=_ratio(pl.max_horizontal("hashes", "ellipses"), pl.col("word_count")))
    return df.select(pl.col("word_count").cast(pl.Int64), *[pl.col(c).cast(pl.Float64) for c in SCORES[1:]])


def drop_reasons(scores: pl.DataFrame, sources: list[str], cfg: QualityConfig) -> pl.Series:
    """The first failing rule's name per document (null when every rule passes)."""
    table = {s: source_thresholds(cfg, s).model_dump() for s in sorted(set(sources))}
    rules = list(Thresholds.model_fields)
    thr = pl.DataFrame({"source": list(table), **{r: [float(t[r]) if t[r] is not None else None for t in table.values()]
                                                  for r in rules}}, schema={"source": pl.String, **{r: pl.Float64 for r in rules}})
    df = scores.with_columns(source=pl.Series(sources, dtype=pl.String)).join(
        thr.rename({r: f"thr.{r}" for r in rules}), on="source", how="left", maintain_order="left")
    fails = []
    for r in rules:
        col, limit = pl.col(rule_column(r)), pl.col(f"thr.{r}")
        failed = (col < limit) if r.startswith("min_") else (col > limit)
        fails.append(pl.when(failed.fill_null(False)).then(pl.lit(r)))  # a null threshold: rule off
    return df.select(quality_drop_reason=pl.coalesce(fails)).to_series()


def batched_scores(texts: pl.Series, batch_chars: int = BATCH_CHARS) -> pl.DataFrame:
    """`quality_scores` a batch of about `batch_chars` characters at a time (a longer document alone):
    every score is per document, so the batching changes no number, only the peak memory."""
    ends = np.cumsum(texts.str.len_chars().to_numpy()) // batch_chars
    cuts = [0, *(np.flatnonzero(np.diff(ends)) + 1).tolist(), len(texts)]
    parts = [quality_scores(texts.slice(a, b - a)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return pl.concat(parts, rechunk=True) if parts else quality_scores(texts)


def shard_quality(table: pa.Table, cfg: QualityConfig) -> pl.DataFrame:
    """One shard's scores table: doc_id, source, chars, the scores, quality_kept, quality_drop_reason."""
    texts = pl.from_arrow(table["text"]).cast(pl.String)
    scores = batched_scores(texts)
    reason = drop_reasons(scores, table["source"].to_pylist(), cfg)
    return pl.concat([
        pl.DataFrame({"doc_id": table["id"].to_pylist(), "source": table["source"].to_pylist()},
                     schema={"doc_id": pl.String, "source": pl.String}).with_columns(chars=texts.str.len_chars().cast(pl.Int64)),
        scores,
        pl.DataFrame({"quality_kept": reason.is_null(), "quality_drop_reason": reason}),
    ], how="horizontal")


@scratch_files(reads=lambda **_: [])  # it only writes into scores_dir
def decide_quality(path: str, table: pa.Table, cfg: QualityConfig, scores_dir: Path) -> Decision:
    """One shard's decision (on a worker): the first failing rule per document. Its scores table goes to
    `scores_dir` under the shard's name, assembled into `scores` afterwards."""
    part = shard_quality(table, cfg)
    write_parquet(part.to_arrow(), scores_dir / path.rsplit("/", 1)[-1])
    return Decision(part["quality_kept"].to_numpy(), part["quality_drop_reason"].to_list(),
                    {c: part[c].to_arrow() for c in (*SCORES, "quality_kept")})


def concat_parquet(files: list[Path], path: Path, rows: int = 1 << 16) -> None:
    """Files of one schema into one Parquet file, holding at most `rows` rows (one row group) at a time.
    Below `rows` in all it is the file `write_parquet` writes for their concatenation, byte for byte."""
    schema = pq.read_schema(files[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        held: list[pa.Table] = []
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows):
                held.append(pa.Table.from_batches([batch]))
                while sum(map(len, held)) >= rows:
                    table = pa.concat_tables(held)
                    writer.write_table(table.slice(0, rows))
                    held = [table.slice(rows)]
        if not held or sum(map(len, held)):
            writer.write_table(pa.concat_tables(held) if held else schema.empty_table())


def quality(cfg: QualityConfig, inputs: dict[str, Artifact], ctx: StageContext) -> dict:
    files = document_shards(inputs["documents"], "quality")
    scores_dir = Path(tempfile.mkdtemp(prefix="scores-", dir=ctx.work_dir()))
    try:
        metrics = filter_documents(ctx, files, decide_quality, Thresholds.model_fields, cfg=cfg, scores_dir=scores_dir).metrics
        concat_parquet([scores_dir / f.rsplit("/", 1)[-1] for f in files], ctx.out / "scores" / "part-00000.parquet")
    finally:
        shutil.rmtree(scores_dir, ignore_errors=True)
    return {"rows": {"documents": metrics["docs_kept"], "scores": metrics["docs_in"]}, "metrics": metrics}


STAGE = Stage("quality", VERSION, QualityConfig, quality, check=check,
              report_metrics=("docs_kept", "chars_kept", "kept_doc_fraction", "kept_char_fraction"))
