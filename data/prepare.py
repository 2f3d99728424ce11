"""Question sets: an offline QA set generated from the Vital Articles, and the HotpotQA download.

The tiny set needs no internet: every question is made from the ~10k Wikipedia leads that the agent
searches (retrieve.load_vital_articles), so each one is answerable with the BM25 retriever.

    qa = load_tiny_qa(seed=0)          # {"train": [...], "dev": [...], "test": [...]}, built on first use
    qa["train"][2]
    # {"id": "tiny-2", "question": 'What is X, described as "Algebraic operation on coordinate vectors", in:
    #   "In mathematics, X is an algebraic operation that takes two equal-length sequences of numbers, and
    #   returns a single number."?', "golden_answers": ["Dot product"], "dataset": "tiny",
    #  "supporting_titles": ["Dot product"], "hops": 1, "split": "train"}

Two kinds of question, about an answer article A:
  single-hop  a sentence of A's lead with A's name replaced by X, plus A's short description;
  bridge      the same, with a sentence that names a second article B, and B's name replaced by B's own
              description: 'X is a region in the western part of East Asia, covering much of the plateau in
              Central, South and East Asia.' (A = Tibet, B = Tibetan Plateau; supporting_titles [B, A]).
              The bare question usually retrieves A but rarely B: collecting both takes a second search.
The answer's name (and B's) never appears in the question: see leaks().

From the shell:
    python data/prepare.py tiny [--seed S]        # build the set, print its statistics and BM25 recall@3
    python data/prepare.py hotpotqa [--out PATH]  # download the HotpotQA dev (distractor) file
"""
import argparse
import functools
import json
import os
import random
import re
import string
import sys
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python data/prepare.py` puts data/ on the path, not the repository root
    sys.path.insert(0, str(ROOT))

import retrieve  # noqa: E402
from retrieve import DataError  # noqa: E402

TINY_VERSION = "v3"  # bump when build_tiny_qa changes, so that a stale generated file is not reused
HOTPOT_URL = "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json"
SPLITS = ("train", "dev", "test")
MIN_WORDS, MAX_WORDS = 10, 40  # shorter sentences ('X was an American poet.') fit too many articles
MAX_BRIDGE_MENTIONS = 200  # a B named in more leads than this (a big country) would crowd out the others


def data_dir():
    return Path(os.environ.get("IGSEARCH_DATA_DIR", ROOT / "data" / "generated"))


def tiny_qa_path(seed=0):
    return data_dir() / f"tiny_qa_{TINY_VERSION}_seed{seed}.jsonl"


# ----------------------------------------------------------------------------------------------------
# Names, masks and leaks

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(s):
    """rewards.normalize_answer (lowercase, no punctuation, no a/an/the), fast enough to run ~100k times."""
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s.lower().translate(_PUNCTUATION)).split())


def base_title(title):
    """The title without a trailing disambiguation: 'Protein (nutrient)' -> 'Protein'."""
    return re.sub(r"\s*\([^)]*\)$", "", title).strip() or title


@functools.lru_cache(maxsize=None)
def name_pattern(title, case_sensitive):
    """A regex for a title in running text: an optional leading 'the', any punctuation between its words,
    and a plural ending (so 'Proteins' is masked too, not left behind as a leak)."""
    words = re.findall(r"\w+", base_title(title))
    if len(words) > 1 and words[0].lower() in ("the", "a", "an"):
        words = words[1:]
    body = r"\W{1,3}".join(re.escape(w) for w in words)
    return re.compile(r"\b(?:[Tt]he\s+)?" + body + r"(?:s|es)?\b", 0 if case_sensitive else re.IGNORECASE)


def distinctive_words(title, vocab):
    """Words of the title that the corpus never writes in lowercase (proper names like 'Brecht'):
    one of them alone would give the answer away even when the full title is masked."""
    return [w for w in retrieve.tokenize(base_title(title)) if len(w) >= 3 and not w.isdigit() and w not in vocab]


def leaks(title, text, vocab=()):
    """Whether text gives the title away: its normalized form (or that of its base title) is a substring of
    the normalized text, also with all spaces removed, or a distinctive word of it starts a word of the text.
    vocab: word_counts of the corpus; without it, every title word counts as distinctive (the strictest)."""
    q = normalize(text)
    for name in (normalize(title), normalize(base_title(title))):
        if name and (name in q or name.replace(" ", "") in q.replace(" ", "")):
            return True
    words = [normalize(w) for w in distinctive_words(title, vocab)]
    return any(t.startswith(w) for t in q.split() for w in words)


# A sentence ends at . ! or ? before a capital, but not after an initial ('E. T. A. Hoffmann') or c./St./Dr.
SENTENCE_END = re.compile(r"(?<![\s.][A-Z]\.)(?<!\bc\.)(?<!\bSt\.)(?<!\bDr\.)(?<!\bMt\.)(?<=[.!?])\s+(?=[A-Z\"'(])")


def sentences(text):
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


def word_counts(docs):
    """How often each word occurs in the corpus, as written: a word that ever occurs in lowercase is a
    common word, one that never does is a name ('Brecht')."""
    counts = Counter()
    for d in docs:
        counts.update(re.findall(r"\b[^\W\d_]+\b", d["text"]))
    return counts


def mask_answer(sentence, title):
    """The sentence with the answer's name (or a leading pronoun standing for it) replaced by X; None when
    the sentence does not refer to the answer that way."""
    if re.search(r"\bX\b", sentence):  # an X of its own ('Malcolm X') would be mistaken for the mask
        return None
    masked = name_pattern(title, case_sensitive=False).sub("X", sentence)
    if not re.search(r"\bX\b", masked):
        masked = re.sub(r"^(He|She|It|They)\b", "X", masked)
    return masked if re.search(r"\bX\b", masked) else None


def as_phrase(description, vocab):
    """'Public university in Beijing' -> 'public university ...', so that 'the <description>' reads as running
    text; 'German playwright' and 'Mediterranean sea' stay (the corpus (almost) never writes them in
    lowercase), and so does 'Prime Minister of India' (a name of two capitalized words)."""
    first = re.match(r"[^\W\d_]*", description).group()
    second = description.split()[1:2]
    if first[1:].islower() and vocab.get(first.lower(), 0) >= 5 and not (second and second[0][:1].isupper()):
        return description[0].lower() + description[1:]
    return description


# ----------------------------------------------------------------------------------------------------
# The tiny QA set

def question_text(masked, description):
    if description:
        return f'What is X, described as "{description}", in: "{masked}"?'
    return f'What is X in: "{masked}"?'


def masked_sentences(doc):
    """The sentences of doc's lead that refer to doc itself, with its name replaced by X."""
    masked = [mask_answer(s, doc["title"]) for s in sentences(doc["text"])]
    return [m for m in masked if m is not None and MIN_WORDS <= len(m.split()) <= MAX_WORDS]


def single_question(doc, vocab):
    """A single-hop question whose answer is doc's title, or None when no sentence of its lead works."""
    for masked in masked_sentences(doc):
        for desc in (doc["description"], ""):  # a description that names the answer is dropped
            q = question_text(masked, desc)
            if not leaks(doc["title"], q, vocab):
                return q
    return None


def bridge_index(docs, vocab):
    """The articles usable as the bridge B, as first title word -> [(title words, doc)], longest first.
    B's name is unambiguous: no disambiguation in its title ('Joseph (Genesis)' is not every Joseph), no
    other title starting with it ('Amazon' vs 'Amazon River'), and not a common word; and its description
    is shared by no other article, so that 'the <description>' points at B alone."""
    titles = [tuple(retrieve.tokenize(d["title"])) for d in docs]
    n_prefix = Counter(t[:n] for t in titles for n in range(1, len(t) + 1))  # how many titles start so
    n_desc = Counter(d["description"] for d in docs)
    index = {}
    for d, words in zip(docs, titles):
        if (base_title(d["title"]) == d["title"] and n_prefix[words] == 1 and len(d["title"]) >= 4
                and distinctive_words(d["title"], vocab)
                and len(d["description"].split()) >= 3 and n_desc[d["description"]] == 1
                and not leaks(d["title"], d["description"], vocab)):
            index.setdefault(words[0], []).append((words, d))
    for entries in index.values():
        entries.sort(key=lambda e: -len(e[0]))
    return index


def mentions(text, index):
    """Docs of the index whose base title occurs as a run of words of the text, in the order of the text
    (at each word, the longest title first)."""
    tokens = retrieve.tokenize(text)
    found = []
    for i, t in enumerate(tokens):
        for words, d in index.get(t, ()):
            if tuple(tokens[i:i + len(words)]) == words and d not in found:
                found.append(d)
    return found


NAME_LINKS = frozenset("de da di del do dos du van von y".split())  # 'Santiago de Cali': one name, not two


def capitalized(word):
    return word[:1].isupper()


def replace_bridge(sentence, b, vocab):
    """The sentence with its first mention of B replaced by 'the <B's description>', or None when B is not
    named there on its own: case-sensitively (a proper noun, not a common word that matches the title) and
    not inside a longer name ('David di Donatello Award', 'the Phanerozoic Eon')."""
    m = name_pattern(b["title"], case_sensitive=True).search(sentence)
    if m is None:
        return None
    before, after = sentence[:m.start()].split()[-1:], sentence[m.end():].split()[:2]
    # 'Paris, France' holds two names; 'Joseph Simmons' and 'Santiago de Cali' hold one
    if before and capitalized(before[0]) and not before[0].endswith((",", ";", ":", ")")) \
            or after and capitalized(after[0]) or len(after) == 2 and after[0] in NAME_LINKS and capitalized(after[1]):
        return None
    phrase = "the " + as_phrase(b["description"], vocab)
    start = m.start()
    # 'the family Bovidae' -> 'the family of mammals ...', not 'the family the family of mammals ...'
    head = re.search(r"(?:\b[Tt]he\s+)?\b" + re.escape(phrase.split()[1]) + r"\s+$", sentence[:start], re.IGNORECASE)
    if head:
        start = head.start()
    if start == 0:
        phrase = phrase[0].upper() + phrase[1:]
    return sentence[:start] + phrase + sentence[m.end():]


def bridge_questions(doc, index, n_mentions, vocab):
    """Every bridge question with answer doc: (question, B) pairs, in the order of doc's sentences."""
    out = []
    for masked in masked_sentences(doc):
        for b in mentions(masked, index):
            if b is doc or n_mentions[b["title"]] > MAX_BRIDGE_MENTIONS:
                continue
            bridged = replace_bridge(masked, b, vocab)
            if bridged is None or len(bridged.split()) > MAX_WORDS + 10:
                continue
            q = question_text(bridged, doc["description"])
            if not leaks(doc["title"], q, vocab) and not leaks(b["title"], q, vocab):
                out.append((q, b))
    return out


def build_tiny_qa(docs, seed=0, n_single=2000, n_bridge=1000):
    """Single-hop and bridge questions over docs (see the module docstring), split 80/10/10 by answer so
    that no answer is in two splits. The same docs and seed give the same list."""
    if not docs or not all({"title", "text"} <= set(d) for d in docs):
        raise DataError("build_tiny_qa needs documents {'title', 'text', 'description'}; use retrieve.load_vital_articles()")
    docs = [dict(d, description=d.get("description") or "") for d in docs]
    rng = random.Random(seed)
    vocab = word_counts(docs)
    usable = [d for d in docs if len(d["title"]) >= 3 and normalize(d["title"])]

    singles = [(d, q) for d in usable for q in [single_question(d, vocab)] if q]
    index = bridge_index(docs, vocab)
    n_mentions = Counter(b["title"] for d in docs for b in mentions(d["text"], index))
    bridges = []
    for d in usable:
        options = bridge_questions(d, index, n_mentions, vocab)
        if options:
            q, b = rng.choice(options)
            bridges.append((d, q, b))

    records = []
    for d, q in rng.sample(singles, min(n_single, len(singles))):
        records.append({"question": q, "golden_answers": [d["title"]], "supporting_titles": [d["title"]], "hops": 1})
    for d, q, b in rng.sample(bridges, min(n_bridge, len(bridges))):
        records.append({"question": q, "golden_answers": [d["title"]],
                        "supporting_titles": [b["title"], d["title"]], "hops": 2})

    split_of = assign_splits([r["golden_answers"][0] for r in records], rng)
    rng.shuffle(records)  # 1-hop and 2-hop mixed through every split: a run's first N dev questions hold both
    return [{"id": f"tiny-{i}", "question": r["question"], "golden_answers": r["golden_answers"], "dataset": "tiny",
             "supporting_titles": r["supporting_titles"], "hops": r["hops"], "split": split_of[r["golden_answers"][0]]}
            for i, r in enumerate(records)]


def assign_splits(answers, rng, fractions=(0.8, 0.1, 0.1)):
    """answer -> split, by a seeded shuffle of the distinct answers: a split never sees another's answers."""
    distinct = list(dict.fromkeys(answers))  # first-seen order, never hash order
    rng.shuffle(distinct)
    n_train, n_dev = int(fractions[0] * len(distinct)), int(fractions[1] * len(distinct))
    return {a: "train" if i < n_train else "dev" if i < n_train + n_dev else "test" for i, a in enumerate(distinct)}


def write_jsonl(records, path):
    """Write atomically (tmp file, then rename), so that an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_tiny_qa(seed=0, path=None):
    """split -> questions of the tiny set; builds the file from the Vital Articles on first use."""
    path = Path(path) if path is not None else tiny_qa_path(seed)
    if not path.exists():
        write_jsonl(build_tiny_qa(retrieve.load_vital_articles(), seed=seed), path)
    splits = {s: [] for s in SPLITS}
    for at, r in retrieve.read_records(path):
        if r.get("split") not in splits:
            raise DataError(f"{at}: the record has no split train/dev/test; delete the file to rebuild it")
        retrieve.check_question(at, r.get("question"), r.get("golden_answers"))
        splits[r["split"]].append(r)
    return splits


# ----------------------------------------------------------------------------------------------------
# Statistics

def hops_of(q):
    # sets from elsewhere (NQ, HotpotQA) may lack "hops": one search per supporting title, else 1
    return q.get("hops") or len(q.get("supporting_titles") or [None])


def qa_stats(questions, retriever, k=3):
    """Counts per split and hop count, and BM25 recall@k of the supporting articles with the bare question
    as the query, per hop count: "any" (a supporting title in the top k) and "all" (every one of them).
    Questions without supporting_titles are counted but left out of the recall.

    -> {"counts": {split: {hops: n}}, "recall": {hops: {"n", "any", "all"}}, "k": k}"""
    counts = {}
    for q in questions:
        split = counts.setdefault(q.get("split", "all"), {})
        split[hops_of(q)] = split.get(hops_of(q), 0) + 1
    with_titles = [q for q in questions if q.get("supporting_titles")]
    hits = retriever.search([q["question"] for q in with_titles], k)
    tally = {}
    for q, docs in zip(with_titles, hits):
        found = {d["title"] for d in docs}
        t = tally.setdefault(hops_of(q), {"n": 0, "any": 0, "all": 0})
        t["n"] += 1
        t["any"] += any(s in found for s in q["supporting_titles"])
        t["all"] += all(s in found for s in q["supporting_titles"])
    recall = {h: {"n": t["n"], "any": t["any"] / t["n"], "all": t["all"] / t["n"]} for h, t in sorted(tally.items())}
    return {"counts": counts, "recall": recall, "k": k}


def format_stats(stats):
    """The statistics as two small Markdown tables."""
    hops = sorted({h for c in stats["counts"].values() for h in c})
    lines = ["| split | " + " | ".join(f"hops={h}" for h in hops) + " | total |",
             "|---|" + "---|" * (len(hops) + 1)]
    splits = [s for s in SPLITS if s in stats["counts"]] + [s for s in stats["counts"] if s not in SPLITS]
    for s in splits + ["total"]:
        row = [sum(stats["counts"][x].get(h, 0) for x in splits) if s == "total" else stats["counts"][s].get(h, 0)
               for h in hops]
        lines.append(f"| {s} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
    k = stats["k"]
    lines += ["", f"| hops | questions | recall@{k} any | recall@{k} all |", "|---|---|---|---|"]
    for h, r in stats["recall"].items():
        lines.append(f"| {h} | {r['n']} | {r['any']:.3f} | {r['all']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# HotpotQA

def download_hotpotqa(out, timeout=10):
    """Download the official HotpotQA dev (distractor) file to out, atomically. Raises OSError offline."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        with urllib.request.urlopen(HOTPOT_URL, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description="Build or download question sets.")
    sub = p.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="build the offline QA set from the Vital Articles and print its statistics")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--k", type=int, default=3, help="recall@k of the supporting articles")
    hot = sub.add_parser("hotpotqa", help="download the HotpotQA dev (distractor) file")
    hot.add_argument("--out", type=Path, default=None, help="where to save it (default: data/generated/)")
    args = p.parse_args(argv)

    try:
        if args.command == "tiny":
            path = tiny_qa_path(args.seed)
            splits = load_tiny_qa(args.seed, path)
            questions = [q for s in SPLITS for q in splits[s]]
            stats = qa_stats(questions, retrieve.Retriever(retrieve.load_vital_articles()), k=args.k)
            print(f"{path}: {len(questions)} questions (seed {args.seed})\n")
            print(format_stats(stats))
            return 0
        out = args.out or data_dir() / "hotpot_dev_distractor_v1.json"
        try:
            download_hotpotqa(out)
        except OSError as e:  # URLError and timeouts are OSErrors: offline, say where the file goes instead
            reason = " ".join(str(getattr(e, "reason", None) or e).split())
            print(f"could not download {HOTPOT_URL} ({reason}); put hotpot_dev_distractor_v1.json at "
                  f"{out.parent}/ and pass --data/--corpus hotpotqa:{out}", file=sys.stderr)
            return 1
        n = len(retrieve.load_hotpotqa(out)[1])
        print(f"saved {n} HotpotQA dev questions to {out}; pass --data/--corpus hotpotqa:{out}")
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
