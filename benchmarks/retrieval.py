"""Retrieval on the sotu Q&A demo: how well each embedder finds a question's speech, and what the
retrieved passages do for held-out answers.

    make pretrain && python -m benchmarks.retrieval                    # CPU, 2 cores: ~20 min a seed
    python -m benchmarks.retrieval --seeds 0,1 --plain=models:/llama-tiny-sft/1,models:/llama-tiny-sft/2 \\
        --rag=models:/llama-tiny-rag/1,models:/llama-tiny-rag/2      # models trained already

1. Retrieval: the speeches (corpus.jsonl of jobs.sotu_qa, titled "President, State of the Union
   YEAR (Party)") indexed by jobs.index with each embedder (tfidf, lsa, the mean hidden state of
   the registered model); every question of sft.jsonl (its passage quoted in it) is a query.
   Prints the share whose top-1 and top-5 passages come from the question's own speech; the
   share whose best passage among those not sharing a 6-word run with the quoted one does (a
   topical match: another part of the same speech); the build seconds and the milliseconds per
   query (one query at a time, flat index).
2. Answers: SFT from the same base at equal steps on sft.jsonl (configs/sft.yaml), on
   sft_rag.jsonl (configs/sft-rag.yaml: the same rows, two retrieved passages before each
   question) and on sft_search.jsonl (the same questions through the search tool), per seed
   (train.seed), unless --plain/--rag/--search name the models. Held-out speeches' questions
   (data.split_key speech), greedy, exact match, per question kind: the first two models with
   the passages in the prompt and without them, the third calling the search tool itself
   (its data under .generalmodel/sotu-qa-search: --query_words of the quotation per call,
   --search_words per result, --search_steps of SFT; the second try in RESULTS.md:
   --seeds 0 --skip_retrieval --query_words 8 --search_words 12 --search_steps 600 with the
   seed-0 plain and retrieval models named).
Record the output, with the machine, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.reasoning import mean_spread

ROOT = Path(__file__).resolve().parent.parent
QA = ROOT / ".generalmodel/sotu-qa"
QA_SEARCH = ROOT / ".generalmodel/sotu-qa-search"  # the search-tool data, with its own query and result lengths
INDEX = ROOT / ".generalmodel/indexes/sotu-qa"


def retrieval_table(embedders: list[str]) -> None:
    from generalmodel.config import StorageConfig, load_config
    from generalmodel.retrieval import open_index
    from generalmodel.tracking import tracking_uri
    from jobs.index import IndexJobConfig
    from jobs.index import main as build

    uri = tracking_uri(load_config(ROOT / "configs/sft.yaml"))
    rows = [json.loads(line) for line in (QA / "sft.jsonl").read_text().splitlines()]
    titles = {json.loads(line)["speech"]: json.loads(line)["title"] for line in (QA / "corpus.jsonl").open()}
    queries = [r["messages"][0]["content"] for r in rows]
    quoted = [q.split("\n\n", 1)[1] for q in queries]
    print(f"\n{len(queries)} questions; does retrieval find the question's speech?")
    print("| embedder | dims | top-1 | top-5 | top-1 of the other passages | build s | ms / query |")
    print("|---|---|---|---|---|---|---|")
    for embedder in embedders:
        with tempfile.TemporaryDirectory() as out:
            manifest = build(
                IndexJobConfig(source=str(QA / "corpus.jsonl"), title_field="title", out=out, embedder=embedder)
            )
            index = open_index(out, StorageConfig().resolved(), uri)
            t0 = time.perf_counter()
            found = [index.search([q], 20)[0] for q in queries]
            ms = (time.perf_counter() - t0) / len(queries) * 1e3
        want = [titles[r["speech"]] for r in rows]
        top1 = sum(h[0].title == w for h, w in zip(found, want, strict=True)) / len(rows)
        top5 = sum(any(x.title == w for x in h[:5]) for h, w in zip(found, want, strict=True)) / len(rows)
        # topical: the best passage that does not share a 6-word run with the quoted one
        pairs = zip(found, quoted, strict=True)
        other = [next((x for x in h if not _shingles(x.text) & _shingles(q)), None) for h, q in pairs]
        topical = sum(x is not None and x.title == w for x, w in zip(other, want, strict=True)) / len(rows)
        dims, secs = manifest["index"]["dim"], manifest["seconds"]
        print(f"| {embedder} | {dims} | {top1:.3f} | {top5:.3f} | {topical:.3f} | {secs} | {ms:.1f} |")


def _shingles(text: str, n: int = 6) -> set[tuple[str, ...]]:
    words = text.strip('"').split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


SEARCH = {  # the search-tool variant of configs/sft-rag.yaml
    "data.source": str(QA_SEARCH / "sft_search.jsonl"),
    "data.tools": True,
    "tracking.registered_model": "llama-tiny-rag-search",
}


def train(config: str, seed: int, steps: int, overrides: dict) -> str:
    """The registered URI of an SFT run of `config` (+ `overrides`, which name the registered
    model) for `seed`, a run of its own."""
    from generalmodel.config import load_config
    from jobs.sft import main as sft

    name = overrides["tracking.registered_model"]
    run = {"train.run_name": f"{name}-s{seed}-{time.strftime('%m%d%H%M%S')}", "train.seed": seed}
    overrides = {"train.steps": steps, "train.answer_eval": 0, **run, **overrides}
    return sft(load_config(ROOT / config, overrides))["model_uri"]


def heldout() -> list[dict]:
    """The held-out speeches' rows of sft_rag.jsonl (the same split as the SFT runs'), in order."""
    from generalmodel.config import load_config
    from generalmodel.data.conversations import split_of

    data = load_config(ROOT / "configs/sft-rag.yaml").data
    rows = [json.loads(line) for line in (QA / "sft_rag.jsonl").read_text().splitlines()]
    return [r for i, r in enumerate(rows) if split_of(r, data, f"row {i}") == "val"]


def load(reference: str):
    from generalmodel.config import load_config
    from generalmodel.infer.export import load_model
    from generalmodel.tracking import download_model, tracking_uri

    cfg = load_config(ROOT / "configs/sft.yaml")
    return load_model(download_model(reference, tracking_uri(cfg), cfg.storage.resolved()))


KINDS = ("president", "party", "decade", "all")


def accuracy(reference: str, rows: list[dict], passages: bool) -> dict[str, float]:
    """Greedy answers to the held-out questions, with the passages' system turn or without it."""
    from generalmodel.infer import SamplingParams, sample_chat

    model, tokenizer = load(reference)
    params = SamplingParams(temperature=0, max_new_tokens=48)
    first = 0 if passages else 1  # sft_rag.jsonl's rows start with the passages' system turn
    return per_kind(["".join(sample_chat(model, tokenizer, r["messages"][first:-1], params)) for r in rows], rows)


def search_accuracy(reference: str, rows: list[dict], index, words: int = 20) -> dict[str, float]:
    """Each held-out question answered through the search tool (`converse`: the model's call run
    on the index, its result fed back, the answer after it), greedy; and the share that called."""
    from generalmodel.data.chat import ChatFormat
    from generalmodel.data.tokenizer import eos_id
    from generalmodel.infer import SamplingParams
    from generalmodel.infer.tools import converse
    from generalmodel.retrieval import search_tool

    model, tokenizer = load(reference)
    fmt = ChatFormat.from_json(tokenizer.to_str())
    params = SamplingParams(temperature=0, max_new_tokens=64)
    tool = {"search": search_tool(index, k=2, words=words)}  # as sft_search.jsonl's results
    done = converse(model, fmt, [[r["messages"][1]] for r in rows], ["search"], params, {eos_id(tokenizer)}, 2, tool)
    out = per_kind([c.answer for c in done], rows)
    out["called"] = _mean([c.calls > 0 for c in done])
    return out


def per_kind(answers: list[str], rows: list[dict]) -> dict[str, float]:
    """The share of `answers` equal to the rows' own (exact match, as post.answers), per question
    kind and over all."""
    from generalmodel.post.answers import normalize_answer

    right = [
        normalize_answer(a) == normalize_answer(r["messages"][-1]["content"])
        for a, r in zip(answers, rows, strict=True)
    ]
    return {k: _mean([x for x, r in zip(right, rows, strict=True) if k in ("all", r["question"])]) for k in KINDS}


def _mean(values: list) -> float:
    return sum(values) / max(len(values), 1)


def main() -> None:
    from generalmodel.cluster import ray_session
    from generalmodel.config import RayConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedders", default="tfidf,lsa,models:/llama-tiny/latest")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plain", default=None, help="the plain SFT models of the first seeds (the rest trained here)")
    parser.add_argument("--rag", default=None, help="the retrieval SFT models, likewise")
    parser.add_argument("--search", default=None, help="the search-tool SFT models, likewise")
    parser.add_argument("--query_words", type=int, default=16, help="search data: words of the quotation queried")
    parser.add_argument("--search_words", type=int, default=20, help="search data and tool: words of each result")
    parser.add_argument("--search_steps", type=int, default=300, help="SFT steps of the search-tool model")
    parser.add_argument("--skip_retrieval", action="store_true", help="no embedder table (only the answers)")
    args = parser.parse_args()
    with ray_session(RayConfig()):  # one local cluster for the index builds and the SFT runs
        run(args)


def run(args) -> None:
    from generalmodel.config import StorageConfig
    from generalmodel.post.sotu_qa import write_rag
    from generalmodel.retrieval import Index
    from jobs.index import IndexJobConfig
    from jobs.index import main as build
    from jobs.sotu_qa import SotuQaConfig
    from jobs.sotu_qa import main as write_data

    write_data(SotuQaConfig(out=str(QA)))
    build(IndexJobConfig(source=str(QA / "corpus.jsonl"), title_field="title", out=str(INDEX), overwrite=True))
    write_data(SotuQaConfig(out=str(QA), index=str(INDEX)))
    QA_SEARCH.mkdir(parents=True, exist_ok=True)
    (QA_SEARCH / "sft.jsonl").write_bytes((QA / "sft.jsonl").read_bytes())
    index = Index.load(str(INDEX), StorageConfig())
    write_rag(QA_SEARCH, index, 2, args.search_words, args.query_words)
    if not args.skip_retrieval:
        retrieval_table(args.embedders.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    given = {
        "plain SFT": (args.plain, "configs/sft.yaml", {"tracking.registered_model": "llama-tiny-sft"}),
        "retrieval SFT": (args.rag, "configs/sft-rag.yaml", {"tracking.registered_model": "llama-tiny-rag"}),
        "search-tool SFT": (args.search, "configs/sft-rag.yaml", SEARCH),
    }
    models = {}
    for name, (refs, config, extra) in given.items():  # the models named, then trained for the other seeds
        named = refs.split(",") if refs else []
        steps = args.search_steps if extra is SEARCH else args.steps
        models[name] = named + [train(config, s, steps, extra) for s in seeds[len(named) :]]
    rows = heldout()
    print(f"\n{len(rows)} held-out questions (speeches training never saw), greedy exact match, seeds {args.seeds}:")
    print("| model | passages | president | party | decade | all |")
    print("|---|---|---|---|---|---|")
    for name in ("plain SFT", "retrieval SFT"):
        for passages in (False, True):
            runs = [accuracy(ref, rows, passages) for ref in models[name]]
            cells = [mean_spread([r[k] for r in runs]) for k in KINDS]
            print(f"| {name} | {'in the prompt' if passages else 'none'} | " + " | ".join(cells) + " |")
    runs = [search_accuracy(ref, rows, index, args.search_words) for ref in models["search-tool SFT"]]
    cells = [mean_spread([r[k] for r in runs]) for k in KINDS]
    called = mean_spread([r["called"] for r in runs])
    print(f"| search-tool SFT | its own search calls (made: {called}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
