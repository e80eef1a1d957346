"""Which documents a dataset keeps (data.dedup, data.filters, data.decontaminate): exact and near
duplicates across the whole corpus (recall on planted near duplicates, no false positive on a corpus
without any), the Gopher/C4 heuristics, decontamination against an evaluation file, and the
preparation job counting what each removed, with samples, in the manifest."""

import json
import random

import pytest
from conftest import make_documents

from generalmodel.config import ConfigError, load_config
from generalmodel.config.sections import QUALITY_FILTERS
from generalmodel.data.quality import (
    FILTERS,
    NearDuplicates,
    c4,
    contaminated,
    eval_ngrams,
    exact_key,
    gopher_quality,
    gopher_repetition,
    minhash,
    shingles,
)
from jobs import prepare_data

VOCAB = [f"w{i}" for i in range(3000)]  # distinct documents share few 5-grams


def random_doc(rng: random.Random, words: int = 200) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(words))


def edited(rng: random.Random, doc: str, fraction: float) -> str:
    words = doc.split()
    for i in rng.sample(range(len(words)), round(fraction * len(words))):
        words[i] = rng.choice(VOCAB)
    return " ".join(words)


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb)


def test_the_config_names_every_filter():
    assert tuple(FILTERS) == QUALITY_FILTERS
    with pytest.raises(ConfigError, match="no filter named 'gopher'; filters: gopher_quality, gopher_repetition, c4"):
        load_config(overrides={"data.filters": ["gopher"]})
    with pytest.raises(ConfigError, match="data.dedup, data.filters, data.decontaminate and data.difficulty are"):
        load_config(overrides={"data.format": "chat", "data.dedup": "exact"})


def test_exact_keys_ignore_case_punctuation_and_spacing():
    assert exact_key("Hello,  World!\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello words")


def test_near_duplicates_are_found_and_distinct_documents_are_not():
    """Planted near duplicates of 300 documents (0.5-3% of the words replaced, or 5-20%: with 5-word
    shingles only the first reach a Jaccard similarity of 0.8; benchmarks/dedup.py has the curve):
    recall >= 0.95 among the pairs whose true Jaccard similarity is >= 0.8; none of the 300
    originals is taken for a duplicate of another."""
    rng = random.Random(0)
    originals = [random_doc(rng) for _ in range(300)]
    rates = [rng.uniform(0.005, 0.03) if k % 2 else rng.uniform(0.05, 0.2) for k in range(150)]
    picked = rng.sample(range(300), 150)
    copies = [(i, edited(rng, originals[i], rate)) for i, rate in zip(picked, rates, strict=True)]
    index = NearDuplicates(threshold=0.75, num_perm=128)
    false = [k for k, doc in enumerate(originals) if index.seen(k, minhash(doc, 5, 128)) is not None]
    assert false == []
    found = {i: index.seen(1000 + i, minhash(doc, 5, 128)) == i for i, doc in copies}
    similar = [i for i, doc in copies if jaccard(originals[i], doc) >= 0.8]
    assert len(similar) >= 20, len(similar)
    recall = sum(found[i] for i in similar) / len(similar)
    assert recall >= 0.95, recall


def test_quality_filters_catch_what_the_papers_describe():
    good = make_documents(1, seed=2, words_per_doc=120)[0]
    assert gopher_quality(good) is None and gopher_repetition(good) is None and c4(good) is None
    assert gopher_quality("Too short to be a document.") == "word_count"
    assert gopher_quality(" ".join(["#tag"] * 60) + " the and") == "symbol_ratio"
    assert gopher_quality(" ".join(["river mountain engine"] * 30)) == "stop_words"
    assert gopher_quality(" ".join(["x1 y2 z3 the and"] * 20)) == "mean_word_length"
    assert gopher_repetition("\n".join([good[:80]] * 10)) == "duplicate_lines"
    assert c4(good + " Lorem ipsum dolor sit amet.") == "lorem_ipsum"
    assert c4(good + " function() { return 1; }") == "curly_bracket"
    assert c4("no terminal punctuation here\nnor here") == "no_sentence_lines"


def test_decontamination_finds_a_shared_13_gram(tmp_path):
    from generalmodel.config import StorageConfig

    task = tmp_path / "task.jsonl"
    ending = "then the river rose over the old stone bridge and the market closed early that winter"
    task.write_text(json.dumps({"ctx": "A story.", "endings": ["no", ending], "label": 1}) + "\n")
    keys = eval_ngrams([str(task)], 13, StorageConfig())
    words = ending.split()
    assert contaminated("Once upon a time " + " ".join(words[:13]) + " and more.", 13, keys)
    assert not contaminated("Once upon a time " + " ".join(words[:12]) + " and more.", 13, keys)


def test_the_job_removes_duplicates_low_quality_and_contaminated_documents(ray_cluster, tmp_path):
    """Across files (so across Ray tasks): 5 exact copies (one with other case and spacing) and 5
    near copies are removed, the first of each kept; a short document fails gopher_quality; one
    holding an evaluation ending is decontaminated. The manifest counts each, with samples."""
    rng = random.Random(1)
    base = make_documents(40, seed=12, words_per_doc=120)
    task = tmp_path / "task.jsonl"
    ending = " ".join(base[3].split()[20:40])
    task.write_text(json.dumps({"ctx": "Context.", "endings": ["x", ending], "label": 1}) + "\n")
    docs = list(base)
    docs += [base[i] for i in range(5, 9)] + [base[9].upper().replace(" ", "  ")]
    docs += [edited_words(rng, base[i], 0.02) for i in range(10, 15)]
    docs += ["Far too short to keep."]
    (tmp_path / "src").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "src" / f"{i:03d}.txt").write_text(doc)
    cfg = load_config(
        overrides={
            "data.source": str(tmp_path / "src"), "data.output": str(tmp_path / "ds"), "data.vocab_size": 400,
            "data.seq_len": 32, "data.val_fraction": 0.1, "data.dedup": "near", "data.dedup_threshold": 0.7,
            "data.filters": ["gopher_quality"], "data.decontaminate": [str(task)],
        }
    )  # fmt: skip
    manifest = prepare_data.main(cfg)
    removed = manifest["removed"]
    assert removed["exact_duplicate"]["documents"] == 5
    assert removed["near_duplicate"]["documents"] == 5
    assert removed["gopher_quality:word_count"]["documents"] == 1
    assert removed["decontaminated"]["documents"] == 1
    assert removed["gopher_quality:word_count"]["samples"] == ["Far too short to keep."]
    assert len(removed["exact_duplicate"]["samples"]) == 3  # data.removed_samples
    kept = sum(manifest["splits"][s]["documents"] for s in ("train", "val"))
    assert kept == len(docs) - 12


def edited_words(rng: random.Random, doc: str, fraction: float) -> str:
    words = doc.split()
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = "changed"
    return " ".join(words)


def test_difficulty_scores_order_documents():
    from generalmodel.config import DataConfig
    from generalmodel.data.quality import difficulty, difficulty_bounds

    repetitive = "the river and the river and the river " * 20
    varied = make_documents(1, seed=5, words_per_doc=120)[0]
    assert difficulty(repetitive, "compression") < difficulty(varied, "compression")
    assert difficulty("a b c", "length") == 3
    data = DataConfig(difficulty="length", difficulty_quantiles=(0.25, 0.75))
    low, high = difficulty_bounds([" ".join(["w"] * n) for n in range(1, 101)], data)
    assert 24 < low < 27 and 74 < high < 77
    assert difficulty_bounds(["a"], DataConfig(difficulty="length")) == (float("-inf"), float("inf"))
    with pytest.raises(ConfigError, match=r"data.difficulty_quantiles \[0.5, 0.5\]: need 0 <= low < high <= 1"):
        load_config(overrides={"data.difficulty": "length", "data.difficulty_quantiles": [0.5, 0.5]})


def test_difficulty_buckets_split_the_corpus(ray_cluster, tmp_path):
    """Two buckets by compression ratio (the easier and the harder half) prepared with one tokenizer:
    every document lands in exactly one, and the easy bucket's documents compress better."""
    from generalmodel.data.quality import difficulty

    rng = random.Random(3)
    docs = make_documents(30, seed=13, words_per_doc=150)
    docs += [" ".join(rng.choice(["the", "river", "and", "of"]) for _ in range(150)) for _ in range(10)]
    (tmp_path / "src").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "src" / f"{i:03d}.txt").write_text(doc)

    def bucket(name, quantiles, **extra):
        return prepare_data.main(
            load_config(
                overrides={
                    "data.source": str(tmp_path / "src"), "data.output": str(tmp_path / name),
                    "data.vocab_size": 300, "data.seq_len": 16, "data.val_fraction": 0.1,
                    "data.difficulty": "compression", "data.difficulty_quantiles": quantiles, **extra,
                }
            )
        )  # fmt: skip

    easy = bucket("easy", [0, 0.5])
    hard = bucket("hard", [0.5, 1], **{"data.tokenizer": str(tmp_path / "easy")})
    assert easy["difficulty"]["bounds"] == ["-inf", hard["difficulty"]["bounds"][0]]
    kept = [sum(m["splits"][s]["documents"] for s in ("train", "val")) for m in (easy, hard)]
    assert sum(kept) == len(docs) and min(kept) >= 10
    assert easy["removed"]["difficulty_out_of_range"]["documents"] == kept[1]
    cut = float(hard["difficulty"]["bounds"][0])
    scores = [difficulty(d, "compression") for d in docs]
    assert sum(score < cut for score in scores) == kept[0]
    assert all(score < cut for score in scores[30:])  # the repetitive documents are all easy
