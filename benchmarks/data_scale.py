"""Data stages at scale: slmflow ingest + dedup + quality vs datatrove's MinHash vs plain datasketch,
on one realistic corpus at several sizes (default about 100 MB, 1 GB and 4 GB of text).

Prints ONE JSON object on stdout, progress on stderr:
  {size: {"corpus": {...}, system: {wall_s, stage_s, mb_per_s_per_core, dedup_mb_per_s_per_core,
                                    peak_rss_mb, recall, precision, ...}}, "settings": {...}}

Corpus (built once per size and seed under --workdir, then reused): a pool of unique paragraphs
from text files on this machine (Debian docs and changelogs, man pages with the roff stripped,
licences, Python's .rst/.md/.txt files: prose, 60%; Python source from the standard library and
site-packages: code, 40%; paragraphs split at blank lines, long ones cut at line ends (long lines
at spaces), exact repeats and junk dropped), recombined with a seed: each document is 3+ runs of
consecutive paragraphs from random places of the pool (log-normal length, median ~700 words,
150..8000), so no run is most of a document and two documents rarely share much. Planted, with
their pairs recorded (planted.parquet): exact copies (4% of documents), near duplicates (8%: word
substitutions, insertions and deletions aimed at a 5-shingle Jaccard of 0.70..0.99; the realized
Jaccard is recorded) and related documents (2%: they share a contiguous 50-75% of another
document, Jaccard ~0.3-0.6, not duplicates: there to make precision mean something). Every planted
copy comes from a base document anywhere earlier. Text is generated document by document from
(seed, index) and written as Parquet shards (id, text) of --shard-mb each: nothing holds the whole
corpus, at any size.

Systems, each a subprocess pinned to the same --cores CPUs (sched_setaffinity, as taskset) with
OMP/MKL/OpenBLAS/POLARS/RAYON thread counts set to --cores:
  slmflow     `slmflow run --only STAGE` once per stage on a fresh store: ingest (the corpus as a
              `parquet` source with its own id column), dedup (14 x 8, 5-gram shingles, verify off),
              decontaminate (with prompts, which it needs), quality. stage_s: the stages' `seconds`
              from their manifests (ingest + dedup + quality; process start-up, the pipeline's
              MLflow parent run and the store's commit (sha256 of every file) are outside it);
              wall_s: the four commands' wall time; peak RSS per stage: its command's. The
              commands share one Prefect server that this script starts (pinned likewise) so that
              no server is in a command's time or RSS; its start-up is reported
              (prefect_server_start_s).
  slmflow_verify  dedup again with `verify: true` (true-Jaccard check of candidate pairs, 0.7).
  slmflow_simplify, slmflow_simplify_verify  dedup again with `simplify: true` (shingles of
              datatrove's simplified text, as datatrove's: numbers folded to 0, diacritics stripped),
              verify off and on.
  datatrove   MinhashDedupSignature -> Buckets -> Cluster -> Filter, MinhashConfig(n_grams=5,
              num_buckets=14, hashes_per_bucket=8), LocalPipelineExecutor with tasks = shards (14 for
              buckets, 1 for clustering) and workers = --cores, Parquet in and out; its default English
              words (spaCy) on its simplify_text. Run with --datatrove-python (a separate venv).
              stage_s: the four executors' run() time. `datatrove_regex` (only when named in
              --systems): the same with \\w+ words instead of spaCy's, to separate the tokenizer's
              cost from the MinHash machinery's.
  datasketch  a plain script: re \\w+ words of the lowercased text -> 5-gram shingles ->
              MinHash.bulk(num_perm=112) -> for each document MinHashLSH(params=(14, 8)).query, then
              insert -> union-find. stage_s: reading the shards to clusters.
wall_s is the subprocess's whole wall time; mb_per_s_per_core = corpus MB (10^6 bytes of UTF-8
text) / stage_s / cores used (--cores; 1 for the single-threaded datasketch script);
dedup_mb_per_s_per_core: the same with the dedup stage's time (for datatrove and datasketch their
stage_s is their dedup); peak_rss_mb: the command's largest single process (ru_maxrss from wait4,
or psutil's sampled RSS of a process wait4 never sees, such as datatrove's forkserver workers);
peak_rss_tree_mb: the largest RSS summed over the command's process tree, sampled every 0.2 s
(with --cores > 1 datatrove runs that many worker processes).
Metrics (same definitions for every system):
  recall    = planted exact + near pairs whose two documents end in one predicted cluster / planted
              (also per kind and per true-Jaccard band, with the S-curve's expectation at 14 x 8)
  precision = predicted duplicate pairs (every pair inside a predicted cluster) that are planted
              (the same base document) or have a true 5-shingle Jaccard >= 0.7 / predicted pairs;
              unplanted pairs are checked on their texts (a seeded sample of at most 20,000).

Run: python benchmarks/data_scale.py [--sizes 100M 1G 4G] [--systems slmflow datatrove datasketch]
     [--cores N] [--workdir DIR] [--datatrove-python /tmp/dtvenv/bin/python]
(datatrove: python3 -m venv /tmp/dtvenv && /tmp/dtvenv/bin/pip install 'datatrove[processing]' spacy;
without it that system reads {"skipped": why}.) Develop with --sizes 20M --shard-mb 8.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NGRAM, BANDS, ROWS, MINHASH_SEED = 5, 14, 8, 1
VERIFY_THRESHOLD = 0.7
CORPUS_VERSION = 2  # 2: long lines cut, junk paragraphs left out
EXACT_FRAC, NEAR_FRAC, RELATED_FRAC = 0.04, 0.08, 0.02
PROSE_SHARE = 0.6
MAX_FILE_BYTES = 512_000  # per source file (after decompression), so many packages take part
MAX_PARA_WORDS = 120  # longer paragraphs are cut at line ends
MEDIAN_WORDS, MIN_WORDS, MAX_WORDS = 700, 150, 8000
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_MAX_THREADS",
               "POLARS_MAX_THREADS", "RAYON_NUM_THREADS", "ARROW_NUM_THREADS", "TOKENIZERS_PARALLELISM")
SYSTEMS = ("slmflow", "datatrove", "datasketch", "datatrove_regex")  # the last: only when asked for
MAX_CHECKED_PAIRS = 20_000
# slmflow's dedup again with other settings: verify (true Jaccard >= 0.7 of candidate pairs) and simplify
# (datatrove's simplified text under the shingles: numbers folded to 0, diacritics stripped)
DEDUP_VARIANTS = {"verify": ["dedup.verify=true"], "simplify": ["dedup.simplify=true"],
                  "simplify_verify": ["dedup.simplify=true", "dedup.verify=true"]}


def log(msg: str) -> None:
    print(f"[data_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)B?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 20M, 100M, 1G")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)])


# ---------------------------------------------------------------------------------------------
# The pool: unique paragraphs of text files on this machine


def _deroff(text: str) -> str:
    """A man page's roff source as plain text (rough: macros dropped, their text arguments kept)."""
    out = []
    for line in text.splitlines():
        if line.startswith((".\\\"", "'\\\"", ".\\#")):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.']\s*(\w+)\s*(.*)", line)
            if not m:
                continue
            macro, rest = m.groups()
            if macro in ("SH", "SS"):
                out += ["", rest.replace('"', ""), ""]
            elif macro in ("PP", "LP", "P", "sp", "TP", "IP", "HP", "RS", "RE"):
                out.append("")
                if macro == "IP" and rest:
                    out.append(rest.split('"')[1] if rest.startswith('"') and rest.count('"') > 1 else rest.split()[0])
            elif macro in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "Nm", "Ar", "Fl", "Nd"):
                out.append(rest.replace('"', ""))
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\\(..|\\\[[^\]]*\]|\\[*n](\(..|\[[^\]]*\]|.)", "", text)
    for a, b in (("\\-", "-"), ("\\e", "\\"), ("\\&", ""), ("\\ ", " "), ("\\|", ""), ("\\^", ""), ("\\c", "")):
        text = text.replace(a, b)
    return text


def _pool_files() -> dict[str, list[Path]]:
    """Candidate files per kind (prose, code), sorted: Debian docs, man pages, licences, Python's
    docs and sources (this interpreter's standard library and site-packages)."""
    import sysconfig

    def walk(root: str, ok) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "tests", "test"))
            found += [Path(dirpath, f) for f in sorted(filenames) if ok(f)]
        return found

    doc = lambda f: (f.endswith((".gz", ".md", ".txt", ".rst")) or f in ("copyright", "README", "NEWS", "AUTHORS")) \
        and not f.endswith((".html.gz", ".json.gz", ".svg.gz", ".png.gz"))
    prose = walk("/usr/share/doc", doc) + walk("/usr/share/man", lambda f: f.endswith(".gz")) \
        + walk("/usr/share/common-licenses", lambda f: True)
    code = []
    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    for root in roots:
        prose += walk(root, lambda f: f.endswith((".rst", ".md", ".txt")) and "LICENSE" not in f.upper())
        code += walk(root, lambda f: f.endswith(".py"))
    return {"prose": sorted(set(prose)), "code": sorted(set(code))}


def _read_text(path: Path) -> str | None:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in data:
        return None
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") > len(text) / 200:
        return None
    if "/man/" in str(path) or re.search(r"\.\d\w*\.gz$", path.name):
        text = _deroff(text)
    return text


def _paragraphs(text: str):
    """Blank-line separated paragraphs; those over MAX_PARA_WORDS words cut at line ends, and lines
    over it at spaces. Runs of junk (over 40 bytes per word: base64, hex dumps) are left out."""
    half = MAX_PARA_WORDS // 2
    for block in re.split(r"\n[ \t]*\n+", text):
        block = "\n".join(line.rstrip() for line in block.strip("\n").splitlines())
        words = len(block.split())
        if not words or len(block) > 40 * words + 200:
            continue
        if words <= MAX_PARA_WORDS:
            yield block
            continue
        piece, n = [], 0
        for line in block.splitlines():
            w = line.split()
            if len(w) > MAX_PARA_WORDS:  # one long line (generated tables, minified text)
                if piece:
                    yield "\n".join(piece)
                    piece, n = [], 0
                indent = line[:len(line) - len(line.lstrip())]
                for k in range(0, len(w), half):
                    yield indent + " ".join(w[k:k + half])
                continue
            piece.append(line)
            n += len(w)
            if n >= half:
                yield "\n".join(piece)
                piece, n = [], 0
        if piece and "".join(piece).strip():
            yield "\n".join(piece)


def build_pool(path: Path, pool_bytes: int, seed: int) -> dict:
    """Unique paragraphs from files on this machine, in file order (runs stay coherent), as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _pool_files()
    rng = random.Random(f"pool:{seed}")
    budget = {"prose": int(pool_bytes * PROSE_SHARE), "code": pool_bytes - int(pool_bytes * PROSE_SHARE)}
    texts, file_ix, words, seen = [], array("i"), array("i"), set()
    stats = {k: {"files": 0, "bytes": 0, "candidates": len(v)} for k, v in files.items()}
    n_file = 0
    for kind in ("prose", "code"):
        order = list(files[kind])
        rng.shuffle(order)  # many packages rather than the first few in sort order
        for f in order:
            if stats[kind]["bytes"] >= budget[kind]:
                break
            text = _read_text(f)
            if not text:
                continue
            added = 0
            for para in _paragraphs(text):
                digest = hashlib.blake2b(para.encode(), digest_size=8).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                texts.append(para)
                file_ix.append(n_file)
                words.append(len(para.split()))
                added += len(para.encode())
            if added:
                stats[kind]["files"] += 1
                stats[kind]["bytes"] += added
                n_file += 1
        if kind == "prose":  # code fills what prose could not
            budget["code"] = pool_bytes - stats["prose"]["bytes"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, pa.large_string()), "file": pa.array(file_ix, pa.int32()),
                             "words": pa.array(words, pa.int32())}), tmp)
    tmp.rename(path)
    meta = {"paragraphs": len(texts), "bytes": sum(s["bytes"] for s in stats.values()), "kinds": stats}
    path.with_suffix(".json").write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------------------------------------
# The corpus: documents recombined from the pool, planted duplicates recorded


class DocMaker:
    """Document text as a pure function of (seed, index): a planted copy regenerates its base."""

    def __init__(self, pool_path: Path, seed: int):
        import pyarrow.parquet as pq

        table = pq.read_table(pool_path)
        self.texts = table["text"].to_pylist()
        self.file = array("i", table["file"].to_numpy())
        self.words = array("i", table["words"].to_numpy())
        self.seed = seed

    def _runs(self, r: random.Random, target: int, min_runs: int = 3) -> list[str]:
        n, parts, words = len(self.texts), [], 0
        per_run = target / max(min_runs, round(target / 400))
        while words < target:
            p = r.randrange(n)
            f, want, got = self.file[p], per_run * r.uniform(0.5, 1.5), 0
            while p < n and self.file[p] == f and got < want and words + got < target * 1.1:
                parts.append(self.texts[p])
                got += self.words[p]
                p += 1
            words += max(got, 1)
        return parts

    def base(self, j: int) -> str:
        r = random.Random(f"base:{self.seed}:{j}")
        target = int(min(MAX_WORDS, max(MIN_WORDS, r.lognormvariate(math.log(MEDIAN_WORDS), 0.8))))
        return "\n\n".join(self._runs(r, target))

    def _word(self, r: random.Random) -> str:
        words = self.texts[r.randrange(len(self.texts))].split()
        return words[r.randrange(len(words))] if words else "the"

    def near(self, text: str, j: int) -> str:
        """1+ word edits (substitute / insert / delete) aimed at a 5-shingle Jaccard in [0.70, 0.99]."""
        r = random.Random(f"near:{self.seed}:{j}")
        toks = re.split(r"(\s+)", text)  # words at even positions, their whitespace at odd ones
        n = (len(toks) + 1) // 2
        aim = r.uniform(0.70, 0.99)
        for _ in range(max(1, round(n * (1 - aim) / (NGRAM * (1 + aim)) * 1.3))):
            i = 2 * r.randrange(n)
            op = r.random()
            if op < 0.5:
                toks[i] = self._word(r)
            elif op < 0.75:
                toks[i] = f"{toks[i]} {self._word(r)}"
            else:
                toks[i] = ""
        return "".join(toks)

    def related(self, text: str, j: int) -> str:
        """Shares one contiguous 50-75% of `text`; the rest is fresh text."""
        r = random.Random(f"related:{self.seed}:{j}")
        toks = re.split(r"(\s+)", text)
        keep = int(len(toks) * r.uniform(0.5, 0.75))
        start = r.randrange(len(toks) - keep + 1)
        fresh = self._runs(r, max(MIN_WORDS // 2, (len(toks) - keep) // 2), min_runs=2)
        half = len(fresh) // 2
        shared = "".join(toks[start:start + keep]).strip()
        return "\n\n".join(["\n\n".join(fresh[:half]), shared, "\n\n".join(fresh[half:])])


def build_corpus(out: Path, size: int, pool_path: Path, seed: int, shard_bytes: int) -> dict:
    """Parquet shards part-NNNNN.parquet (id, text) of about `shard_bytes` text each, planted.parquet
    (a = base id, b = copy id, kind exact|near|related, jaccard = true 5-shingle Jaccard) and meta.json
    (written last: a corpus without it is incomplete). Streams: one shard in memory at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from tasks.dedup.minhash import shingle_jaccard, word_shingle_hashes

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    maker = DocMaker(pool_path, seed)
    plan = random.Random(f"plan:{seed}")
    bases = array("q")
    planted = {"a": [], "b": [], "kind": [], "jaccard": []}
    ids, texts, pending = [], [], []  # pending: (a, b, kind, base text, copy text) of this shard
    total = shard_total = shards = words = 0
    t0 = time.perf_counter()

    def flush() -> None:
        nonlocal shards, ids, texts, pending, shard_total
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}),
                       tmp / f"part-{shards:05d}.parquet")
        if pending:
            hashes, offsets = word_shingle_hashes([t for p in pending for t in p[3:]], ngram=NGRAM)
            jac = shingle_jaccard(hashes, offsets, [(2 * k, 2 * k + 1) for k in range(len(pending))])
            for (a, b, kind, _, _), jv in zip(pending, jac.tolist()):
                planted["a"].append(a)
                planted["b"].append(b)
                planted["kind"].append(kind)
                planted["jaccard"].append(round(jv, 4))
        shards += 1
        ids, texts, pending, shard_total = [], [], [], 0
        log(f"corpus {out.name}: {total / 1e6:,.0f} of {size / 1e6:,.0f} MB ({time.perf_counter() - t0:.0f} s)")

    j = 0
    while total < size:
        u = plan.random()
        kind = "base"
        if len(bases) >= 20:
            kind = ("exact" if u < EXACT_FRAC else "near" if u < EXACT_FRAC + NEAR_FRAC
                    else "related" if u < EXACT_FRAC + NEAR_FRAC + RELATED_FRAC else "base")
        if kind == "base":
            text = maker.base(j)
            bases.append(j)
        else:
            src = bases[plan.randrange(len(bases))]
            src_text = maker.base(src)
            text = (src_text if kind == "exact" else maker.near(src_text, j) if kind == "near"
                    else maker.related(src_text, j))
            if kind == "exact":
                planted["a"].append(f"doc{src:09d}")
                planted["b"].append(f"doc{j:09d}")
                planted["kind"].append("exact")
                planted["jaccard"].append(1.0)
            else:
                pending.append((f"doc{src:09d}", f"doc{j:09d}", kind, src_text, text))
        ids.append(f"doc{j:09d}")
        texts.append(text)
        n = len(text.encode())
        total += n
        shard_total += n
        words += len(text.split())
        j += 1
        if shard_total >= shard_bytes:
            flush()
    if ids:
        flush()
    pq.write_table(pa.table({k: pa.array(v) for k, v in planted.items()}), tmp / "planted.parquet")
    kinds = {k: planted["kind"].count(k) for k in ("exact", "near", "related")}
    near_j = sorted(jv for jv, k in zip(planted["jaccard"], planted["kind"]) if k == "near")
    rel_j = sorted(jv for jv, k in zip(planted["jaccard"], planted["kind"]) if k == "related")
    q = lambda xs, p: round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else None
    meta = {"bytes": total, "mb": round(total / 1e6, 1), "docs": j, "shards": shards, "seed": seed,
            "mean_words_per_doc": round(words / max(j, 1), 1), "planted": kinds,
            "near_jaccard": {f"p{int(p * 100)}": q(near_j, p) for p in (0, 0.1, 0.5, 0.9, 1.0)},
            "near_below_0.7": round(sum(x < 0.7 for x in near_j) / max(1, len(near_j)), 3),
            "related_jaccard": {f"p{int(p * 100)}": q(rel_j, p) for p in (0, 0.5, 1.0)},
            "build_s": round(time.perf_counter() - t0, 1), "version": CORPUS_VERSION}
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta


def ensure_corpus(workdir: Path, size: int, seed: int, shard_mb: int, pool_mb: int) -> tuple[Path, dict]:
    pool = workdir / f"pool-v{CORPUS_VERSION}-{pool_mb}M-s{seed}" / "pool.parquet"
    if not pool.exists():
        log(f"building the paragraph pool ({pool_mb} MB of unique paragraphs) from files on this machine")
        meta = build_pool(pool, pool_mb * 1_000_000, seed)
        log(f"pool: {meta['paragraphs']:,} paragraphs, {meta['bytes'] / 1e6:,.0f} MB")
    out = workdir / f"corpus-v{CORPUS_VERSION}-{size}-s{seed}-shard{shard_mb}M-pool{pool_mb}M"
    if not (out / "meta.json").exists():
        log(f"building corpus {out.name}")
        build_corpus(out, size, pool, seed, shard_mb * 1_000_000)
    else:
        log(f"reusing corpus {out}")
    meta = json.loads((out / "meta.json").read_text())
    meta["pool"] = json.loads(pool.with_suffix(".json").read_text())
    meta["path"] = str(out)
    return out, meta


def corpus_shards(corpus: Path) -> list[Path]:
    return sorted(corpus.glob("part-*.parquet"))


# ---------------------------------------------------------------------------------------------
# Running a system under the same limits


def limited_env(cores: int, extra: dict | None = None) -> dict:
    env = {**os.environ, **{v: str(cores) for v in THREAD_VARS}, **(extra or {})}
    env["TOKENIZERS_PARALLELISM"] = "false" if cores == 1 else "true"
    return env


def pin(cores: int):
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    return lambda: os.sched_setaffinity(0, cpus)


class TreeMemory:
    """Samples the RSS of a process and its descendants every 0.2 s (psutil) in a thread: the largest
    sum over the tree (worker processes that wait4 cannot see: datatrove's forkserver pool)."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak_sum, self.peak_one = pid, 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            while not self.done.is_set():
                total = 0
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss = p.memory_info().rss
                        total += rss
                        self.peak_one = max(self.peak_one, rss)
                self.peak_sum = max(self.peak_sum, total)
                self.done.wait(0.2)

    def stop(self) -> tuple[float, float]:
        self.done.set()
        self.thread.join()
        return self.peak_sum / 2**20, self.peak_one / 2**20


def run_measured(cmd: list[str], cores: int, log_path: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd` pinned to `cores` CPUs: wall seconds, exit code, peak RSS of its largest process
    (wait4's ru_maxrss, or the sampled one where a process it never waited for was larger) and the
    sampled peak of the RSS summed over its process tree; its stdout and stderr go to log_path."""
    t = time.perf_counter()
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env or limited_env(cores), cwd=cwd or ROOT, preexec_fn=pin(cores))
        memory = TreeMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    tree, one = memory.stop()
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(max(usage.ru_maxrss / 1024, one), 1),
            "peak_rss_tree_mb": round(tree, 1), "rc": proc.returncode}


def tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(ln.strip() for ln in text.splitlines()[-lines:] if ln.strip())[-1500:]


@contextlib.contextmanager
def prefect_server(home: Path, cores: int, log_path: Path):
    """Prefect's API server as `slmflow run` starts it (uvicorn create_app), pinned like the commands."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = limited_env(cores, {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                              "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    home.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log_path, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
                                 "--lifespan", "on"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                preexec_fn=pin(cores))
    try:
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            if proc.poll() is not None or time.perf_counter() - t > 600:
                raise RuntimeError(f"Prefect server did not start: {tail(log_path)}")
            time.sleep(0.3)
        yield url, time.perf_counter() - t
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# slmflow


def _manifests(data_root: Path) -> dict[str, dict]:
    return {str(p): json.loads(p.read_text()) for p in data_root.glob("*/*/manifest.json")}


def run_slmflow(corpus: Path, run_dir: Path, cores: int, workdir: Path, mb: float, verify: bool,
                dask_workers: list[int] | None = None) -> dict:
    data_root = run_dir / "data"
    config = {
        "run": {"data_root": str(data_root), "models_root": str(run_dir / "models"),
                "mlflow_uri": f"sqlite:///{run_dir / 'mlflow.db'}", "experiment": "slmflow-data-scale"},
        "ingest": {"sources": [{"kind": "parquet", "name": "corpus", "path": str(corpus / "part-*.parquet"),
                                "text_column": "text", "id_column": "id"}]},
        "dedup": {"ngram": NGRAM, "bands": BANDS, "rows": ROWS, "seed": MINHASH_SEED, "verify": False},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    slmflow = str(Path(sys.executable).parent / "slmflow")
    commands = [("ingest", ["--only", "ingest"]), ("dedup", ["--only", "dedup"])]
    for variant, settings in DEDUP_VARIANTS.items():  # the dedup stage alone again, ingest reused
        if verify or "dedup.verify=true" not in settings:
            commands.append((f"dedup_{variant}", ["--only", "dedup", *(a for x in settings for a in ("--set", x))]))
    for n in dask_workers or []:  # the same dedup on a local Dask cluster of n single-threaded worker processes
        commands.append((f"dedup_dask_{n}", ["--only", "dedup", "--force", "dedup", "--set", "run.runner=dask",
                                              "--set", f"run.dask_workers={n}"]))
    commands += [("decontaminate", ["--only", "decontaminate"]), ("quality", ["--only", "quality"])]
    stages, seen = {}, {}
    with prefect_server(workdir / "prefect-home", cores, run_dir / "prefect-server.log") as (url, server_s):
        log(f"slmflow: Prefect server up in {server_s:.1f} s")
        env = limited_env(cores, {"PREFECT_API_URL": url, "PREFECT_HOME": str(workdir / "prefect-home")})
        for name, args in commands:
            log(f"slmflow: {name} ...")
            res = run_measured([slmflow, "run", "-c", str(cfg_path), *args], cores, run_dir / f"{name}.log", env,
                               run_dir)
            if res["rc"]:
                raise RuntimeError(f"slmflow {name} exited {res['rc']}: {tail(run_dir / f'{name}.log')}")
            now = _manifests(data_root)
            new = {k: v for k, v in now.items() if seen.get(k) != v}  # a forced rerun rewrites its manifest
            seen = now
            computed = {m["stage"]: m for m in new.values()}
            stage_s = sum(float(m["seconds"]) for m in computed.values())
            stages[name] = {"stage_s": round(stage_s, 2), "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"],
                            "peak_rss_tree_mb": res["peak_rss_tree_mb"],
                            "mb_per_s_per_core": round(mb / max(stage_s, 1e-9) / cores, 2),
                            "computed": {s: round(float(m["seconds"]), 2) for s, m in computed.items()}}
            if name.startswith("dedup"):
                m = computed["dedup"]
                keep = ("docs_in", "docs_kept", "dropped.exact_duplicate", "dropped.near_duplicate", "clusters", "largest_cluster",
                        "candidate_pairs", "verified_pairs", "audit_precision", "audit_jaccard_mean")
                stages[name]["metrics"] = {k: m["metrics"][k] for k in keep if k in m["metrics"]}
                stages[name]["clusters_path"] = str(data_root / "dedup" / m["key"] / "clusters")
            if name == "quality":
                m = computed["quality"]["metrics"]
                stages[name]["metrics"] = {k: m.get(k) for k in ("docs_in", "docs_kept", "chars_in", "chars_kept")}
            log(f"slmflow: {name}: stage {stage_s:.1f} s, command {res['wall_s']:.1f} s, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB")
    main = ("ingest", "dedup", "quality")
    stage_s = sum(stages[s]["stage_s"] for s in main)
    out = {"slmflow": {
        "wall_s": round(sum(stages[s]["wall_s"] for s in ("ingest", "dedup", "decontaminate", "quality")), 2),
        "stage_s": round(stage_s, 2), "cores_used": cores,
        "mb_per_s_per_core": round(mb / stage_s / cores, 2),
        "dedup_stage_s": stages["dedup"]["stage_s"],
        "dedup_mb_per_s_per_core": stages["dedup"]["mb_per_s_per_core"],
        "peak_rss_mb": max(stages[s]["peak_rss_mb"] for s in main + ("decontaminate",)),
        "peak_rss_tree_mb": max(stages[s]["peak_rss_tree_mb"] for s in main + ("decontaminate",)),
        "prefect_server_start_s": round(server_s, 2),
        "stages": {k: v for k, v in stages.items() if k in main + ("decontaminate",)},
        "clusters_path": stages["dedup"]["clusters_path"],
        "note": "stage_s and mb_per_s_per_core: ingest + dedup + quality stage seconds; wall_s: the four commands "
                "(ingest, dedup, decontaminate with prompts, quality), each a separate process (start-up counted "
                "four times), not counting the shared Prefect server's start",
    }}
    if dask_workers:
        dask = {f"workers_{n}": {**{k: stages[f"dedup_dask_{n}"][k] for k in ("stage_s", "wall_s", "peak_rss_tree_mb")},
                                 "docs_kept": stages[f"dedup_dask_{n}"]["metrics"]["docs_kept"]}
                for n in dask_workers}
        base = dask[f"workers_{dask_workers[0]}"]["stage_s"]
        for n in dask_workers:
            dask[f"workers_{n}"]["speedup"] = round(base / dask[f"workers_{n}"]["stage_s"], 2)
        out["slmflow_dask"] = {**dask, "note": f"the dedup stage alone (--force dedup) with run.runner dask on a local "
                                               f"cluster; speedup against {dask_workers[0]} worker(s)"}
    for variant, settings in DEDUP_VARIANTS.items():
        if f"dedup_{variant}" not in stages:
            continue
        v = {k: stages[f"dedup_{variant}"][k] for k in ("wall_s", "stage_s", "mb_per_s_per_core", "peak_rss_mb",
                                                       "peak_rss_tree_mb", "metrics", "clusters_path")}
        out[f"slmflow_{variant}"] = {**v, "cores_used": cores, "dedup_mb_per_s_per_core": v["mb_per_s_per_core"],
                                     "note": f"the dedup stage alone, {', '.join(settings)} (ingest reused)"}
    return out


# ---------------------------------------------------------------------------------------------
# datasketch and datatrove (run as `--arm NAME`, in their own process)


def arm_datasketch(corpus: Path, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    word = re.compile(r"\w+")
    lsh = MinHashLSH(num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    ids: list[str] = []
    parent = array("q")

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    hits = 0
    for f in corpus_shards(corpus):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=["id", "text"]):
            shingle_sets, keys = [], []
            for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                w = word.findall(text.lower())
                grams = [w] if 0 < len(w) < NGRAM else [w[i:i + NGRAM] for i in range(len(w) - NGRAM + 1)]
                ids.append(doc_id)
                parent.append(len(parent))
                if grams:
                    shingle_sets.append([" ".join(g).encode("utf-8") for g in grams])
                    keys.append(len(ids) - 1)
            for key, m in zip(keys, MinHash.bulk(shingle_sets, num_perm=BANDS * ROWS, seed=MINHASH_SEED)):
                for other in lsh.query(m):  # every earlier document sharing a band: the same components
                    hits += 1
                    ri, rj = find(key), find(other)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
                lsh.insert(key, m, check_duplication=False)
        log(f"datasketch: {f.name} done, {len(ids):,} documents, {time.perf_counter() - t0:.0f} s")
    labels = [find(i) for i in range(len(ids))]
    stage_s = time.perf_counter() - t0
    sizes: dict[int, int] = {}
    for lab in labels:
        sizes[lab] = sizes.get(lab, 0) + 1
    rows = [(ids[i], lab) for i, lab in enumerate(labels) if sizes[lab] > 1]
    pq.write_table(pa.table({"doc_id": [r[0] for r in rows], "cluster": [str(r[1]) for r in rows]}),
                   out / "clusters.parquet")
    return {"stage_s": round(stage_s, 2), "docs": len(ids), "lsh_query_hits": hits}


def arm_datatrove(corpus: Path, out: Path, cores: int, words: str) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWords(WordTokenizer):
        """slmflow's and the datasketch script's words (runs of \\w), after datatrove's simplify_text."""

        def word_tokenize(self, text: str) -> list[str]:
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    language = RegexWords("en") if words == "regex" else "eng"  # eng: datatrove's English default (spaCy)
    n_files = len(corpus_shards(corpus))
    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=MINHASH_SEED)

    def reader():
        return ParquetReader(str(corpus), glob_pattern="part-*.parquet", text_key="text", id_key="id")

    w = {k: str(out / k) for k in ("sigs", "buckets", "remove", "kept", "removed", "logs")}
    steps = [
        ("signature", [reader(), MinhashDedupSignature(output_folder=w["sigs"], config=cfg, language=language)],
         n_files),
        ("buckets", [MinhashDedupBuckets(input_folder=w["sigs"], output_folder=w["buckets"], config=cfg)], BANDS),
        ("cluster", [MinhashDedupCluster(input_folder=w["buckets"], output_folder=w["remove"], config=cfg,
                                         save_cluster_id=True)], 1),
        ("filter", [reader(), MinhashDedupFilter(input_folder=w["remove"], load_cluster_ids=True,
                                                 exclusion_writer=ParquetWriter(w["removed"])),
                    ParquetWriter(w["kept"])], n_files),
    ]
    times = {}
    for name, pipeline, tasks in steps:
        t = time.perf_counter()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(cores, tasks), skip_completed=False,
                              logging_dir=f"{w['logs']}/{name}").run()
        times[name] = round(time.perf_counter() - t, 2)
        log(f"datatrove: {name} {times[name]:.1f} s")
    ids, clusters, removed = [], [], 0
    for folder in ("kept", "removed"):
        for f in sorted(Path(w[folder]).rglob("*.parquet")):
            table = pq.read_table(f, columns=[c for c in pq.ParquetFile(f).schema_arrow.names if c != "text"])
            cid = (table["minhash_cluster_id"] if "minhash_cluster_id" in table.column_names
                   else pc.struct_field(table["metadata"], "minhash_cluster_id")).to_pylist()
            removed += table.num_rows if folder == "removed" else 0
            for doc_id, c in zip(table["id"].to_pylist(), cid):
                if c is not None and c != -1:
                    ids.append(doc_id)
                    clusters.append(str(c))
    pq.write_table(pa.table({"doc_id": ids, "cluster": clusters}), out / "clusters.parquet")
    return {"stage_s": round(sum(times.values()), 2), "steps": times, "removed": removed, "tasks": n_files,
            "workers": cores, "words": "spaCy (datatrove's English default)" if words == "spacy" else "regex \\w+"}


def run_arm(name: str, python: str, corpus: Path, run_dir: Path, cores: int, mb: float) -> dict:
    """datasketch or datatrove in its own process; datasketch's script is single-threaded: 1 core used."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{name}.log"
    arm, words = (name.split("_") + ["spacy"])[:2]
    res = run_measured([python, str(Path(__file__).resolve()), "--arm", arm, "--words", words, "--corpus", str(corpus),
                        "--out", str(run_dir), "--cores", str(cores)], cores, log_path)
    if res["rc"] or not (run_dir / "result.json").exists():
        raise RuntimeError(f"{name} exited {res['rc']}: {tail(log_path)}")
    arm = json.loads((run_dir / "result.json").read_text())
    used = 1 if name == "datasketch" else cores
    return {"wall_s": res["wall_s"], "stage_s": arm["stage_s"], "cores_used": used,
            "mb_per_s_per_core": round(mb / arm["stage_s"] / used, 2),
            "dedup_mb_per_s_per_core": round(mb / arm["stage_s"] / used, 2),
            "peak_rss_mb": res["peak_rss_mb"], "peak_rss_tree_mb": res["peak_rss_tree_mb"],
            **{k: v for k, v in arm.items() if k != "stage_s"},
            "clusters_path": str(run_dir / "clusters.parquet")}


def python_with(python: str | None, modules: str) -> tuple[str | None, str]:
    """(interpreter, why not) for an interpreter that imports `modules`."""
    if not python:
        return None, "no interpreter given"
    if not Path(python).exists():
        return None, f"{python} does not exist"
    probe = subprocess.run([python, "-c", f"import {modules}"], capture_output=True, text=True)
    if probe.returncode:
        return None, f"{python} cannot import {modules}: {probe.stderr.strip().splitlines()[-1:]}"
    return python, ""


# ---------------------------------------------------------------------------------------------
# Recall and precision against the planted pairs


def evaluate(clusters_path: str, corpus: Path, seed: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from tasks.dedup.minhash import collision_probability, shingle_jaccard, word_shingle_hashes

    table = pq.read_table(clusters_path)
    id_col = "doc_id"
    label_col = "cluster" if "cluster" in table.column_names else "cluster_id"
    label = dict(zip(table[id_col].to_pylist(), map(str, table[label_col].to_pylist())))
    planted = pq.read_table(corpus / "planted.parquet").to_pydict()
    group: dict[str, str] = {}
    found: dict[str, list[bool]] = {"exact": [], "near": [], "related": []}
    bands = {"<0.7": [], "0.7-0.8": [], "0.8-0.9": [], ">=0.9": []}
    dup_jaccard = []
    for a, b, kind, jv in zip(planted["a"], planted["b"], planted["kind"], planted["jaccard"]):
        hit = a in label and label.get(a) == label.get(b)
        found[kind].append(hit)
        if kind != "related":
            group[a] = group[b] = a
            dup_jaccard.append(jv)
        if kind == "near":
            bands["<0.7" if jv < 0.7 else "0.7-0.8" if jv < 0.8 else "0.8-0.9" if jv < 0.9 else ">=0.9"].append(hit)
    dups = found["exact"] + found["near"]
    # predicted pairs: every pair inside a cluster; planted = same base document; the rest checked on text
    members: dict[str, list[str]] = {}
    for doc, lab in label.items():
        members.setdefault(lab, []).append(doc)
    rng = random.Random(f"eval:{seed}")
    total = planted_ok = 0
    unplanted: list[tuple[str, str, float]] = []  # (x, y, weight)
    for docs in members.values():
        s = len(docs)
        if s < 2:
            continue
        total += s * (s - 1) // 2
        counts: dict[str, int] = {}
        for d in docs:
            counts[group.get(d, d)] = counts.get(group.get(d, d), 0) + 1
        ok = sum(c * (c - 1) // 2 for c in counts.values())
        planted_ok += ok
        n_un = s * (s - 1) // 2 - ok
        if not n_un:
            continue
        if s <= 100:
            pairs = [(docs[i], docs[k]) for i in range(s) for k in range(i + 1, s)
                     if group.get(docs[i], docs[i]) != group.get(docs[k], docs[k])]
            unplanted += [(x, y, 1.0) for x, y in pairs]
        else:
            picks = []
            while len(picks) < 200:
                x, y = rng.sample(docs, 2)
                if group.get(x, x) != group.get(y, y):
                    picks.append((x, y))
            unplanted += [(x, y, n_un / len(picks)) for x, y in picks]
    n_unplanted = sum(w for _, _, w in unplanted)
    checked = unplanted if len(unplanted) <= MAX_CHECKED_PAIRS else rng.sample(unplanted, MAX_CHECKED_PAIRS)
    good_share = 1.0
    if checked:
        wanted = sorted({d for x, y, _ in checked for d in (x, y)})
        texts: dict[str, str] = {}
        want = pa.array(wanted)
        for f in corpus_shards(corpus):
            t = pq.read_table(f, columns=["id", "text"])
            t = t.filter(pc.is_in(t["id"], value_set=want))
            texts.update(zip(t["id"].to_pylist(), t["text"].to_pylist()))
        index = {d: k for k, d in enumerate(wanted)}
        hashes, offsets = word_shingle_hashes([texts[d] for d in wanted], ngram=NGRAM)
        jac = shingle_jaccard(hashes, offsets, np.array([(index[x], index[y]) for x, y, _ in checked], np.int64))
        weights = np.array([w for _, _, w in checked])
        good_share = float((weights * (jac >= VERIFY_THRESHOLD)).sum() / weights.sum())
    precision = (planted_ok + n_unplanted * good_share) / total if total else 1.0
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None
    return {
        "recall": mean(dups), "precision": round(precision, 4),
        "recall_exact": mean(found["exact"]), "recall_near": mean(found["near"]),
        "recall_near_by_jaccard": {k: mean(v) for k, v in bands.items()},
        "expected_recall_s_curve": round(float(np.mean(collision_probability(np.array(dup_jaccard), BANDS, ROWS))), 4),
        "related_pairs_clustered": mean(found["related"]),
        "predicted_pairs": total, "unplanted_pairs": round(n_unplanted),
        "unplanted_true_duplicates": round(good_share, 4) if unplanted else None,
        "unplanted_checked": len(checked), "clusters": sum(len(v) > 1 for v in members.values()),
        "largest_cluster": max((len(v) for v in members.values()), default=0),
    }


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["100M", "1G", "4G"], help="corpus sizes of text: 100M, 1G, ...")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS[:3]), choices=SYSTEMS,
                        help="datatrove_regex: datatrove with \\w+ words instead of spaCy's (not run by default)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "slmflow-data-scale",
                        help="corpus cache (kept) and run directories")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="CPUs every system may use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=int, default=64, help="MB of text per corpus Parquet shard")
    parser.add_argument("--pool-mb", type=int, default=256, help="MB of unique paragraphs to recombine")
    parser.add_argument("--no-verify", action="store_true", help="skip slmflow's dedup runs with verify: true")
    parser.add_argument("--dask-workers", type=int, nargs="*", default=[],
                        help="also run slmflow's dedup on a local Dask cluster of each of these worker counts (1 2)")
    parser.add_argument("--datatrove-python", default=os.environ.get("DATATROVE_PYTHON", "/tmp/dtvenv/bin/python"),
                        help="an interpreter with datatrove and spacy (python3 -m venv /tmp/dtvenv && "
                             "/tmp/dtvenv/bin/pip install 'datatrove[processing]' spacy)")
    parser.add_argument("--keep", action="store_true", help="keep each system's outputs (default: removed)")
    parser.add_argument("--arm", choices=("datasketch", "datatrove"), help=argparse.SUPPRESS)
    parser.add_argument("--words", choices=("spacy", "regex"), default="spacy", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.arm:  # inside a system's own process
        result = arm_datasketch(args.corpus, args.out) if args.arm == "datasketch" else \
            arm_datatrove(args.corpus, args.out, args.cores, args.words)
        (args.out / "result.json").write_text(json.dumps(result))
        return

    cores = min(args.cores, len(os.sched_getaffinity(0)))
    dt_python, dt_why = python_with(args.datatrove_python, "datatrove, spacy, pyarrow") \
        if {"datatrove", "datatrove_regex"} & set(args.systems) else (None, "")
    results: dict = {}
    for size_text in args.sizes:
        size = parse_size(size_text)
        corpus, meta = ensure_corpus(args.workdir, size, args.seed, args.shard_mb, args.pool_mb)
        mb = meta["bytes"] / 1e6
        entry: dict = {"corpus": meta}
        results[size_text] = entry
        for system in args.systems:
            run_dir = args.workdir / "runs" / f"{size_text}-{system}-{os.getpid()}"
            shutil.rmtree(run_dir, ignore_errors=True)
            log(f"{size_text}: {system} on {cores} core(s)")
            try:
                if system == "slmflow":
                    got = run_slmflow(corpus, run_dir, cores, args.workdir, mb, not args.no_verify, args.dask_workers)
                elif system.startswith("datatrove"):
                    if not dt_python:
                        entry[system] = {"skipped": f"datatrove not available: {dt_why} (--datatrove-python)"}
                        log(entry[system]["skipped"])
                        continue
                    got = {system: run_arm(system, dt_python, corpus, run_dir, cores, mb)}
                else:
                    got = {system: run_arm(system, sys.executable, corpus, run_dir, cores, mb)}
                for name, res in got.items():
                    if "clusters_path" not in res:  # slmflow_dask: timings only
                        entry[name] = res
                        log(f"{size_text}: {name}: {res}")
                        continue
                    res.update(evaluate(res.pop("clusters_path"), corpus, args.seed))
                    entry[name] = res
                    log(f"{size_text}: {name}: stage {res['stage_s']:.1f} s, wall {res['wall_s']:.1f} s, "
                        f"{res['dedup_mb_per_s_per_core']} MB/s/core (dedup), recall {res['recall']}, "
                        f"precision {res['precision']}, peak RSS {res['peak_rss_mb']:.0f} MB")
            except Exception as e:  # one failing system must not lose the others' numbers
                entry[system] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{size_text}: {system} failed: {e}")
            finally:
                if not args.keep:
                    shutil.rmtree(run_dir, ignore_errors=True)
    results["settings"] = {
        "cores": cores, "cpus": sorted(os.sched_getaffinity(0))[:cores], "thread_env": list(THREAD_VARS),
        "ngram": NGRAM, "bands_rows": [BANDS, ROWS], "minhash_seed": MINHASH_SEED, "verify_threshold": VERIFY_THRESHOLD,
        "planted_fractions": {"exact": EXACT_FRAC, "near": NEAR_FRAC, "related": RELATED_FRAC},
        "shard_mb": args.shard_mb, "pool_mb": args.pool_mb, "seed": args.seed,
        "datatrove_python": dt_python, "host_cpus": os.cpu_count(),
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
