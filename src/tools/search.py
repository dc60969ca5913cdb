"""Search over a local document collection, ranked by Okapi BM25 in Lucene's form (Robertson & Zaragoza 2009;
the index is ``bm25s``'s sparse matrices, a maintained library, rather than one written here):

    score(D, Q) = sum_{distinct q in Q} idf(q) * f(q,D) / (f(q,D) + k1 (1 - b + b |D| / avgdl))
    idf(q)      = ln(1 + (N - n(q) + 0.5) / (n(q) + 0.5))

with the ``1 +`` inside the log so idf never goes negative for a term in most documents, Lucene's omission of the
constant ``(k1 + 1)`` factor (the ranking is the classic formula's), and a repeated query word counted once.
Terms are lowercased ``\\w+`` runs of title and text. A document is a dict with ``text`` and optional ``title``;
the collection comes from a list or a JSONL file and is indexed at construction (a bad file is a config error,
raised there, not an observation shown to the model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from src.tools.base import Tool, ToolError

_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class BM25:
    """BM25 scores (the module docstring's formula) of every document for a query, over tokenised documents."""

    def __init__(self, corpus: list[list[str]], k1: float = 1.5, b: float = 0.75):
        import bm25s

        self.n_docs, self.index = len(corpus), None
        if any(corpus):  # bm25s cannot index a collection without a single term
            self.index = bm25s.BM25(k1=k1, b=b, method="lucene")
            self.index.index([list(doc) for doc in corpus], show_progress=False)

    def scores(self, query: list[str]) -> list[float]:
        if self.index is None:
            return [0.0] * self.n_docs
        return self.index.get_scores(sorted(set(query))).tolist()


def load_documents(path: str | Path) -> list[dict]:
    """Rows of a JSONL file with ``text`` (and optional ``title``); a bad line raises naming file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"search documents {path} do not exist")
    docs = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from e
            if not isinstance(row, dict) or "text" not in row:
                raise ValueError(f"{path}:{lineno}: a document needs a 'text' field")
            docs.append(row)
    return docs


class SearchTool(Tool):
    """``{"query": str}`` -> the ``top_k`` best documents as ``[i] title`` and a snippet around the match.

    Args:
        documents: ``[{"title": ..., "text": ...}, ...]``; combined with ``path`` when both are given.
        path: JSONL file of such documents; ``None`` (and no ``documents``) is an empty collection.
        top_k: results returned.
        snippet_chars: characters of text shown per result.
        k1, b: BM25 term-frequency saturation and length normalisation.
    """

    name = "search"
    description = "Search a local document collection. Returns the best-matching passages with their titles."
    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "keywords to search for"}},
        "required": ["query"],
    }

    def __init__(self, documents: list[dict] | None = None, path: str | None = None, top_k: int = 3,
                 snippet_chars: int = 400, k1: float = 1.5, b: float = 0.75):
        self.documents = [dict(d) for d in documents or []] + (load_documents(path) if path else [])
        for i, doc in enumerate(self.documents):
            if "text" not in doc:
                raise ValueError(f"search document {i} has no 'text' field; has {sorted(doc)}")
        self.top_k, self.snippet_chars = top_k, snippet_chars
        self.index = BM25([tokenize(f"{d.get('title', '')} {d['text']}") for d in self.documents], k1=k1, b=b)

    def search(self, query: str, top_k: int | None = None) -> list[tuple[float, dict]]:
        scores = self.index.scores(tokenize(query))
        ranked = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: -scores[i])
        return [(scores[i], self.documents[i]) for i in ranked[: top_k or self.top_k]]

    def snippet(self, text: str, query: list[str]) -> str:
        if len(text) <= self.snippet_chars:
            return text
        terms = set(query)
        hit = next((m.start() for m in _TOKEN.finditer(text.lower()) if m.group() in terms), 0)
        start = max(0, hit - self.snippet_chars // 4)
        if start:
            space = text.find(" ", start)
            start = space + 1 if 0 <= space < hit else start
        end = min(len(text), start + self.snippet_chars)
        return ("..." if start else "") + text[start:end].strip() + ("..." if end < len(text) else "")

    def run(self, query: str) -> str:
        terms = tokenize(query)
        if not terms:
            raise ToolError("empty query: give some keywords")
        hits = self.search(query)
        if not hits:
            empty = " (the collection is empty)" if not self.documents else ""
            return f"no results for {query!r}{empty}"
        return "\n\n".join(f"[{rank}] {doc.get('title') or '(untitled)'}\n{self.snippet(doc['text'], terms)}"
                           for rank, (_, doc) in enumerate(hits, 1))
