"""The baseline text_gpt is judged against: an interpolated Kneser-Ney byte n-gram model (Chen & Goodman's
interpolated KN with one discount per order and kind of count, D = n1 / (n1 + 2 n2)), trained on the same
documents, order chosen on the validation split. Pure Python over strings: tokens become characters (chr(token)), so
a context is a string slice and a count table is a dict; the corpus is ~100 KB, so counting and scoring take seconds.

The tables of a model of order n are the first n levels of any higher-order model's (raw counts at the top level,
continuation counts below it), so one fit at the highest order scores every order."""

from __future__ import annotations

import math
from collections import Counter, defaultdict


class KneserNey:
    def __init__(self, docs: list[list[int]], max_order: int, vocab_size: int) -> None:
        """`docs`: token lists; each is counted on its own, so no n-gram spans two documents."""
        self.max_order, self.vocab_size = max_order, vocab_size
        self.order = max_order  # the order `prob` and `bits` use; best_order sets it
        self.raw = [Counter() for _ in range(max_order)]  # raw[k][(h, w)], len(h) = k
        for doc in docs:
            s = "".join(map(chr, doc))
            for i in range(len(s)):
                for k in range(min(max_order, i + 1)):
                    self.raw[k][(s[i - k:i], s[i])] += 1
        # Continuation counts: how many distinct tokens precede (h, w), read off the next level's raw counts.
        self.cont = [Counter() for _ in range(max_order)]
        for k in range(1, max_order):
            for (h, w) in self.raw[k]:
                self.cont[k - 1][(h[1:], w)] += 1
        self.discount = {(is_raw, k): _discount((self.raw if is_raw else self.cont)[k])
                         for k in range(max_order) for is_raw in (True, False)}
        self.totals: list[dict[tuple[bool, str], tuple[int, int]]] = []  # per context: (count, distinct followers)
        for k in range(max_order):
            acc: dict[tuple[bool, str], list[int]] = defaultdict(lambda: [0, 0])
            for is_raw, table in ((True, self.raw[k]), (False, self.cont[k])):
                for (h, _), c in table.items():
                    a = acc[(is_raw, h)]
                    a[0] += c
                    a[1] += 1
            self.totals.append({key: (a[0], a[1]) for key, a in acc.items()})

    def prob(self, history: str, token: str) -> float:
        """P(token | history) at `self.order`: the longest usable context takes raw counts, every shorter one
        continuation counts, ending in the uniform distribution over the vocabulary."""
        h = history[max(0, len(history) - self.order + 1):] if self.order > 1 else ""
        p = 1.0 / self.vocab_size
        for k in range(len(h) + 1):
            ctx = h[len(h) - k:]
            is_raw = k == len(h)
            total, types = self.totals[k].get((is_raw, ctx), (0, 0))
            if total == 0:
                continue
            d = self.discount[(is_raw, k)]
            c = (self.raw if is_raw else self.cont)[k].get((ctx, token), 0)
            p = max(c - d, 0.0) / total + d * types / total * p
        return p

    def bits(self, docs: list[list[int]]) -> tuple[float, int]:
        """Total -log2 P of every token after each document's first (its end-of-text opener), and their count."""
        total, count = 0.0, 0
        for doc in docs:
            s = "".join(map(chr, doc))
            for i in range(1, len(s)):
                total -= math.log2(self.prob(s[:i], s[i]))
                count += 1
        return total, count


def _discount(table: Counter) -> float:
    n1 = sum(1 for c in table.values() if c == 1)
    n2 = sum(1 for c in table.values() if c == 2)
    return n1 / (n1 + 2 * n2) if n1 + n2 else 0.5


def best_order(train: list[list[int]], val: list[list[int]], orders: list[int], vocab_size: int,
               ) -> tuple[KneserNey, dict[int, float]]:
    """One fit at the highest order; each order scored on the validation documents; the lowest bits per token wins
    and is left set on the returned model."""
    model = KneserNey(train, max(orders), vocab_size)
    scores: dict[int, float] = {}
    for n in orders:
        model.order = n
        total, count = model.bits(val)
        scores[n] = total / count
    model.order = min(scores, key=scores.__getitem__)
    return model, scores
