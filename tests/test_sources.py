import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import TypeAdapter, ValidationError

from tasks.ingest.sources import (
    JsonlSource, PackageTextsSource, ParquetSource, PydocSource, RawDoc, ReasoningGymSource,
    SourceConfig, SourceError, StdlibSource, _chunks,
)


def docs(cfg, stats=None):
    return list(cfg.read(stats))


def raises(cfg, *parts, cheap=True):
    """check() (unless not cheap) and read() fail at call time, one line naming every part."""
    for fn in (lambda c: c.check(), lambda c: c.read()) if cheap else (lambda c: c.read(),):
        with pytest.raises(SourceError) as ei:
            fn(cfg)
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith(f"{cfg.kind} source: ")
        for p in parts:
            assert p in msg, msg
    return msg


def test_yaml_shapes_parse_and_extra_keys_are_rejected():
    raw = [
        {"kind": "stdlib", "max_bytes": 200000, "max_files": None},
        {"kind": "pydoc"},
        {"kind": "package_texts", "packages": ["reasoning_gym"], "patterns": ["*.txt"], "max_bytes": 2000000},
        {"kind": "reasoning_gym", "tasks": ["basic_arithmetic"], "size": 200, "seed": 1234,
         "task_args": {"basic_arithmetic": {"min_terms": 2}}},
        {"kind": "parquet", "path": "corpus/*.parquet", "text_column": "text"},
        {"kind": "jsonl", "path": "corpus/*.jsonl", "text_column": "text"},
    ]
    cfgs = TypeAdapter(list[SourceConfig]).validate_python(raw)
    assert [type(c) for c in cfgs] == [StdlibSource, PydocSource, PackageTextsSource, ReasoningGymSource,
                                        ParquetSource, JsonlSource]
    with pytest.raises(ValidationError):
        TypeAdapter(SourceConfig).validate_python({"kind": "pydoc", "bogus": 1})
    with pytest.raises(ValidationError):
        TypeAdapter(SourceConfig).validate_python({"kind": "nope"})


def test_parquet_reads_rows_in_order_skipping_nulls(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a", None, "c"]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"text": ["first"]}), tmp_path / "a.parquet")
    cfg = ParquetSource(path=str(tmp_path / "*.parquet"), batch_size=2)
    stats = {}
    out = docs(cfg, stats)
    assert [(d.ref.split("/")[-1], d.data) for d in out] == [("a.parquet:0", "first"), ("b.parquet:0", "a"),
                                                           ("b.parquet:2", "c")]
    assert all(d.source == "parquet" for d in out) and stats == {"dropped_null": 1}
    assert cfg.estimate() == 4
    assert docs(ParquetSource(path=str(tmp_path / "*.parquet"), name="mine"))[0].source == "mine"


def test_refs_do_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    """Relative, absolute, ./-prefixed or through a symlinked directory: the same refs (so the same
    document ids and stage keys), naming each file below the glob's directory and the row."""
    (tmp_path / "corpus" / "2024").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "corpus" / "2024" / "a.parquet")
    (tmp_path / "corpus" / "b.jsonl").write_text('{"text": "z"}\n')
    (tmp_path / "link").symlink_to(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    for kind, pattern, expected in ((ParquetSource, "**/*.parquet", ["2024/a.parquet:0", "2024/a.parquet:1"]),
                                    (JsonlSource, "*.jsonl", ["b.jsonl:1"])):
        spellings = [f"corpus/{pattern}", f"./corpus/{pattern}", f"{tmp_path}/corpus/{pattern}", f"link/{pattern}",
                     f"{tmp_path}/corpus/../corpus/{pattern}"]
        for spelling in spellings:
            assert [d.ref for d in docs(kind(path=spelling))] == expected, spelling
    single = [d.ref for d in docs(JsonlSource(path="corpus/b.jsonl"))]
    assert single == [d.ref for d in docs(JsonlSource(path=f"{tmp_path}/link/b.jsonl"))] == ["b.jsonl:1"]


def test_parquet_bad_inputs(tmp_path):
    raises(ParquetSource(path=str(tmp_path / "*.parquet")), "no files match", "*.parquet")
    pq.write_table(pa.table({"text": ["ok"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "b.parquet")
    (tmp_path / "c.parquet").write_text("not parquet")
    glob = str(tmp_path / "*.parquet")
    raises(ParquetSource(path=glob), "b.parquet has no column 'text' (columns: id, body)")
    raises(ParquetSource(path=str(tmp_path / "c.parquet")), "c.parquet is not a Parquet file (")
    raises(ParquetSource(path=glob, text_column="id"), "a.parquet has no column 'id'")
    raises(ParquetSource(path=str(tmp_path / "b.parquet"), text_column="id"), "column 'id' has type int64")


def test_jsonl_reads_lines_keeps_invalid_utf8_as_bytes(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n\n{"text": null}\n{"text": "caf\xe9 ok", "n": 1}\r\n'
                  + json.dumps({"text": "\u00e9t\u00e9"}).encode() + b'\n{"text": "lone \\ud800"}\n')
    stats = {}
    out = docs(JsonlSource(path=str(f)), stats)
    assert [d.ref for d in out] == ["a.jsonl:1", "a.jsonl:4", "a.jsonl:5", "a.jsonl:6"]
    assert isinstance(out[3].data, bytes) and out[3].data.startswith(b"lone ")  # unpaired \ud800 escape
    assert out[0].data == "hello" and out[2].data == "été"
    assert out[1].data == b"caf\xe9 ok"  # invalid UTF-8 passed through; ingest decodes with replace
    assert stats == {"dropped_null": 1}
    assert JsonlSource(path=str(f)).estimate() is None


def test_jsonl_bad_inputs(tmp_path):
    raises(JsonlSource(path=str(tmp_path / "*.jsonl")), "no files match")
    good = '{"text": "x"}\n'
    (tmp_path / "a.jsonl").write_text(good * 16 + "{not json\n")
    bad17 = JsonlSource(path=str(tmp_path / "a.jsonl"))
    bad17.check()  # the cheap check reads the first line only; read() reads all before yielding
    raises(bad17, "a.jsonl line 17: not valid JSON", cheap=False)
    (tmp_path / "b.jsonl").write_text(good * 2 + '{"body": "x"}\n')
    raises(JsonlSource(path=str(tmp_path / "b.jsonl")), "b.jsonl line 3: no key 'text'", cheap=False)
    (tmp_path / "c.jsonl").write_text('["text"]\n')
    raises(JsonlSource(path=str(tmp_path / "c.jsonl")), "c.jsonl line 1: expected a JSON object")
    (tmp_path / "d.jsonl").write_text(good + '{"text": 5}\n')
    raises(JsonlSource(path=str(tmp_path / "d.jsonl")), "d.jsonl line 2: 'text' is int", cheap=False)


def test_stdlib_small_deterministic_and_size_limit():
    cfg = StdlibSource(max_files=5)
    out = docs(cfg)
    assert len(out) == 5 == cfg.estimate() and out == docs(cfg)
    assert all(isinstance(d, RawDoc) and d.ref.endswith(".py") and isinstance(d.data, bytes) for d in out)
    stats = {}
    small = docs(StdlibSource(max_bytes=300, max_files=3), stats)
    assert all(len(d.data) <= 300 for d in small) and stats["dropped_too_large"] > 0
    refs = [d.ref for d in docs(StdlibSource(max_bytes=2000))]
    assert refs and not any(r.startswith("test/") or "/tests/" in r or "site-packages" in r for r in refs)


def test_pydoc_one_doc_per_topic():
    from pydoc_data.topics import topics

    out = docs(PydocSource())
    assert len(out) == len(topics) == PydocSource().estimate()
    assert out[0].ref.startswith("topic:") and all(isinstance(d.data, str) for d in out)
    assert [d.ref for d in out] == sorted(d.ref for d in out)


def test_package_texts_novel_is_stripped_and_chunked():
    cfg = PackageTextsSource(patterns=["data/in_the_year_*.txt"], chunk_chars=8000)
    out = docs(cfg)
    assert len(out) > 3 and out[0].ref == "reasoning_gym/data/in_the_year_2889.txt#0"
    assert b"Gutenberg" not in out[0].data and b"END OF THE PROJECT" not in out[-1].data
    assert all(len(d.data) <= 12000 for d in out) and out == docs(cfg)
    whole = docs(PackageTextsSource(patterns=["data/in_the_year_*.txt"], chunk_chars=None))
    assert len(whole) == 1 and b"".join(d.data for d in out) == whole[0].data
    raises(PackageTextsSource(packages=["no_such_pkg_xyz"]), "'no_such_pkg_xyz' is not installed")
    raises(PackageTextsSource(patterns=["*.nothing"]), "no files matching", "'reasoning_gym'")


def test_chunks_split_at_paragraphs():
    data = b"aaaa\n\nbbbb\n\ncccccccccccc\n\nd\n"
    parts = _chunks(data, 8)
    assert b"".join(parts) == data and parts[0] == b"aaaa\n\n" and b"cccccccccccc\n\n" in parts


def test_reasoning_gym_deterministic_by_seed():
    cfg = ReasoningGymSource(tasks=["basic_arithmetic", "gsm_symbolic"], size=5, seed=7)
    a, b = docs(cfg), docs(cfg)
    assert a == b and len(a) == 10 == cfg.estimate()
    assert a[0].ref == "basic_arithmetic:7:0" and "\n\nAnswer: " in a[0].data
    assert a[5].data.count("\n\n") >= 2 and "####" not in a[5].data  # gsm_symbolic: worked solution
    c = docs(ReasoningGymSource(tasks=["basic_arithmetic", "gsm_symbolic"], size=5, seed=8))
    assert [d.data for d in c] != [d.data for d in a]
    two = docs(ReasoningGymSource(tasks=["basic_arithmetic"], size=5, seed=7,
                                  task_args={"basic_arithmetic": {"min_terms": 2, "max_terms": 2}}))
    assert sum(len(d.data) for d in two) < sum(len(d.data) for d in a[:5])  # 2 terms instead of 2-6


def test_reasoning_gym_bad_inputs():
    raises(ReasoningGymSource(tasks=["foo"]), "unknown task 'foo' (known: ab, ")
    raises(ReasoningGymSource(tasks=["gcd"], task_args={"gcd": {"bogus": 1}}), "task_args.gcd: bad generator settings", "bogus")
    raises(ReasoningGymSource(tasks=["gcd"], task_args={"lcm": {}}), "'lcm'", "not in tasks")


def test_a_new_kind_is_one_class(tmp_path):
    """A Source subclass with its own `kind` is a source kind (the config union is built from `_kinds`)."""
    from typing import Iterator, Literal

    from tasks.ingest import sources

    class LinesSource(sources.Source):
        kind: Literal["lines"] = "lines"
        path: str

        def documents(self, stats=None) -> Iterator[RawDoc]:
            for n, line in enumerate(open(self.path), 1):
                yield RawDoc(self.source, f"{self.path}:{n}", line.strip())

    assert LinesSource in sources._kinds()
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    src = LinesSource(path=str(tmp_path / "a.txt"))
    assert [d.data for d in src.read()] == ["one", "two"] and src.estimate() is None


def memory_corpus(root: str) -> None:
    """Under memory://<root>: two Parquet shards (one in a subdirectory, a Hugging Face layout) and plain
    and gzipped JSONL, on fsspec's in-memory filesystem (no network)."""
    import gzip

    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open(f"/{root}/data/train-00000.parquet", "wb") as f:
        pq.write_table(pa.table({"text": ["x", None, "y"]}), f)
    with fs.open(f"/{root}/data/more/train-00001.parquet", "wb") as f:
        pq.write_table(pa.table({"text": ["z"]}), f)
    with fs.open(f"/{root}/a.jsonl", "wb") as f:
        f.write(b'{"text": "one"}\n\n{"text": "two"}\n')
    with fs.open(f"/{root}/b.jsonl.gz", "wb") as f:
        f.write(gzip.compress(b'{"text": "three"}\n'))


def test_fsspec_urls_glob_and_read_with_refs_independent_of_spelling():
    memory_corpus("fsspec-a")
    spellings = ["memory://fsspec-a/data/**/*.parquet", "memory:///fsspec-a/data/**/*.parquet",
                 "memory://fsspec-a/./data//**/*.parquet", "memory://fsspec-a/x/../data/**/*.parquet"]
    for spelling in spellings:
        out = docs(ParquetSource(path=spelling))
        assert [(d.ref, d.data) for d in out] == [("more/train-00001.parquet:0", "z"), ("train-00000.parquet:0", "x"),
                                                  ("train-00000.parquet:2", "y")], spelling
    files = ParquetSource(path=spellings[0]).files()
    assert files == ["memory:///fsspec-a/data/more/train-00001.parquet", "memory:///fsspec-a/data/train-00000.parquet"]
    out = docs(JsonlSource(path="memory://fsspec-a/*.jsonl*"))
    assert [(d.ref, d.data) for d in out] == [("a.jsonl:1", "one"), ("a.jsonl:3", "two"), ("b.jsonl.gz:1", "three")]
    raises(ParquetSource(path="memory://fsspec-a/nothing/*.parquet"), "no files match 'memory://fsspec-a/nothing/*.parquet'")
    raises(ParquetSource(path="memory://fsspec-a/*.jsonl"), "memory:///fsspec-a/a.jsonl is not a Parquet file (")


def test_file_urls_read_as_the_plain_path(tmp_path):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    for kind, pattern in ((ParquetSource, "*.parquet"), (JsonlSource, "*.jsonl")):
        plain, url = docs(kind(path=f"{tmp_path}/{pattern}")), docs(kind(path=f"file://{tmp_path}/{pattern}"))
        assert plain == url and len(plain) == 1


def test_documents_share_out_their_files_bytes(tmp_path):
    """Each document's `nbytes` is its file's bytes read since the previous one, as stored (compressed):
    they add up to `total_bytes`, the progress line's total."""
    import gzip

    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(50)]}), tmp_path / "a.parquet")
    lines = "".join(json.dumps({"text": f"line {i} " * 30}) + "\n" for i in range(300)).encode()
    (tmp_path / "b.jsonl").write_bytes(lines)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    for src in (ParquetSource(path=str(tmp_path / "*.parquet"), batch_size=7), JsonlSource(path=str(tmp_path / "b.jsonl")),
                JsonlSource(path=str(tmp_path / "c.jsonl.gz"))):
        out = docs(src)
        assert all(d.nbytes >= 0 for d in out) and sum(d.nbytes for d in out) == src.total_bytes(), src
    assert ParquetSource(path=str(tmp_path / "*.parquet")).total_bytes() == (tmp_path / "a.parquet").stat().st_size
    assert JsonlSource(path=str(tmp_path / "c.jsonl.gz")).total_bytes() < len(lines)  # compressed bytes count
    assert PydocSource().total_bytes() is None  # counts documents instead
