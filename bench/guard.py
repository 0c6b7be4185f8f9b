"""Guard benchmark: our sensitive-word guard against the naive `set(jieba.cut(text)) & words`.

    .venv/bin/python bench/guard.py [--mb 5] [--entries 10000] [--items 1000] [--benign 5000]
                                    [--stream-chars 200000] [--batch-chars 16] [--seed 7]

Everything is generated here, seeded, from jieba's own dictionary (the only Chinese word list on
the machine; traditional and garbled entries dropped):

    lexicon   --entries words: 35% dictionary words of middling frequency, 55% two-word phrases
              (代开 + 发票 style, which jieba cuts apart), 10% pinyin-like Latin words; block 60%,
              mask 25%, flag 15%; plus 300 allow-list entries (a lexicon word + a common word).
    corpus    ~--mb MB (UTF-8) of paragraphs of frequency-weighted dictionary words with
              punctuation, some ASCII words and numbers; no sentence contains a lexicon or
              allow-list word by accident. --items paragraphs get one planted lexicon word and
              --items others one evasion variant (traditional, full width, case, spacing, 1-3
              inserted symbols or zero-width characters per gap, and combinations; all within the
              documented bound of 3 inserted characters between two letters).
    benign    --benign sentences, none flagged by a correct guard: 60% everyday sentences, 30%
              holding an allow-listed superstring of a lexicon word, 10% a Latin lexicon word glued
              inside a longer ASCII word (the Scunthorpe case).

Throughput: both sides check every corpus paragraph (one call each), in 10 alternating blocks
(the side going first swaps every block); `ratio_vs_jieba` = jieba's time ÷ ours. Then each side
checks the whole corpus as one text (a large ingested document): `ratio_vs_jieba_whole_text`.
`scan_only_s` times the compiled automaton's scan alone (`Matcher.finder`, daachorse's
character-wise double array, over the folded paragraphs as `Matcher.check` runs it), so `ratio_ceiling_scan_only` bounds what a
guard built on that automaton can reach here. Recall counts a planted item found when a hit for
that word overlaps it (jieba: the word is among the paragraph's tokens). The stream filter then
replays --stream-chars of the corpus in token-sized deltas (1-4 characters); `stream_ms_per_1k`
is the filter's own time per 1000 characters, and every replay is checked against
`Matcher.check` (no blocked word released, masks identical). The last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ahocorasick
import jieba
import opencc

from backend.guard import Hit, Lexicon, Matcher, Severity, StreamGuard, Verdict, jieba_segmenter
from backend.guard.lexicon import Entry
from backend.guard.normalize import fold

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench" / ".cache" / "guard"
CATEGORIES = ("广告引流", "赌博", "违禁品", "诈骗", "色情")
SYLLABLES = ["wei", "xin", "qq", "vx", "jia", "dai", "kai", "fa", "piao", "du", "bo", "liu", "he", "cai", "qiang", "zhi", "mi", "yao", "shua", "dan", "fan", "li", "yi", "ye", "qing", "luo", "liao", "yuan", "jiao", "bai", "le", "zu", "qiu", "hai", "luo", "ying", "bing", "tu", "zheng"]  # fmt: skip
ASCII_WORDS = ("App", "AI", "5G", "iPhone", "WiFi", "CEO", "GDP", "PDF", "USB", "NBA")
GAPS = ("*", "·", "-", "_", "|", "/", "~", "【】", "「」", "★", "♥", "😀", "👍", "…", "#", "@ ", " ", "  ", "\u3000", "-*-")  # fmt: skip
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\ufeff", "\u2060")


@dataclass(frozen=True)
class Item:
    paragraph: int
    span: tuple[int, int]
    word: str
    kind: str  # "plain" or the evasion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=5.0)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--benign", type=int, default=5000)
    parser.add_argument("--stream-chars", type=int, default=200_000)
    parser.add_argument("--batch-chars", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    logging.getLogger("jieba").setLevel(logging.WARNING)
    jieba.dt.tmp_dir = str(CACHE)
    jieba.initialize()
    rng = random.Random(args.seed)
    words, weights, ranked = _vocabulary()
    entries, allow = _lexicon(rng, ranked, args.entries)
    forbidden = _plain_automaton([e.word for e in entries] + allow)
    text = _Text(rng, words, weights, forbidden)
    s2t = opencc.OpenCC("s2t")
    paragraphs, items = _corpus(rng, text, entries, allow, s2t, mb=args.mb, items=args.items)
    benign, benign_kinds = _benign(rng, text, entries, allow, count=args.benign)

    started = time.perf_counter()
    matcher = Matcher(
        Lexicon(tuple(entries), tuple(allow)), segmenter=jieba_segmenter(cache_dir=CACHE)
    )
    build_s = time.perf_counter() - started
    lexicon_words = {entry.word for entry in entries}
    ours_s, jieba_s, verdicts, tokens = _throughput(matcher, lexicon_words, paragraphs)
    scan_s = _scan_only(matcher, paragraphs)
    whole = "\n".join(paragraphs)
    started = time.perf_counter()
    matcher.check(whole)
    ours_whole_s = time.perf_counter() - started
    started = time.perf_counter()
    _ = set(jieba.cut(whole)) & lexicon_words
    jieba_whole_s = time.perf_counter() - started

    found = [_found(verdicts[i.paragraph].hits, i) for i in items]
    naive = [i.word in tokens[i.paragraph] for i in items]
    by_kind: dict[str, list[bool]] = {}
    for item, hit in zip(items, found, strict=True):
        by_kind.setdefault(item.kind, []).append(hit)
    planted = by_kind.pop("plain")
    evasion = [hit for hits in by_kind.values() for hit in hits]
    naive_planted = [n for i, n in zip(items, naive, strict=True) if i.kind == "plain"]
    naive_evasion = [n for i, n in zip(items, naive, strict=True) if i.kind != "plain"]
    spans: dict[int, tuple[int, int]] = {i.paragraph: i.span for i in items}
    unexpected = sum(
        1
        for p, verdict in enumerate(verdicts)
        for hit in verdict.hits
        if p not in spans or not (hit.span[0] < spans[p][1] and spans[p][0] < hit.span[1])
    )

    flagged = [bool(matcher.check(s).hits) for s in benign]
    naive_flagged = [bool(set(jieba.cut(s)) & lexicon_words) for s in benign]
    flagged_by_kind = Counter(k for k, f in zip(benign_kinds, flagged, strict=True) if f)

    stream = _stream(matcher, paragraphs, rng, chars=args.stream_chars, batch=args.batch_chars)
    stream_batch1 = _stream(matcher, paragraphs, rng, chars=args.stream_chars // 4, batch=1)
    corpus_mb = sum(len(p.encode()) for p in paragraphs) / 1e6
    result = {
        "ratio_vs_jieba": round(jieba_s / ours_s, 1),
        "recall_planted": round(_rate(planted), 4),
        "recall_evasion": round(_rate(evasion), 4),
        "benign_flag_rate": round(_rate(flagged), 4),
        "stream_ms_per_1k": round(stream["ms_per_1k"], 3),
        "naive_recall_planted": round(_rate(naive_planted), 4),
        "naive_recall_evasion": round(_rate(naive_evasion), 4),
        "naive_benign_flag_rate": round(_rate(naive_flagged), 4),
        "ours_mb_per_s": round(corpus_mb / ours_s, 2),
        "jieba_mb_per_s": round(corpus_mb / jieba_s, 2),
        "ours_s": round(ours_s, 3),
        "jieba_s": round(jieba_s, 3),
        "scan_only_s": round(scan_s, 3),
        "ratio_ceiling_scan_only": round(jieba_s / scan_s, 1),
        "ratio_vs_jieba_whole_text": round(jieba_whole_s / ours_whole_s, 1),
        "ours_whole_text_s": round(ours_whole_s, 3),
        "jieba_whole_text_s": round(jieba_whole_s, 3),
        "recall_evasion_by_kind": {k: round(_rate(v), 4) for k, v in sorted(by_kind.items())},
        "benign_flagged_by_kind": dict(flagged_by_kind),
        "unexpected_hits": unexpected,
        "stream_ms_per_1k_batch1": round(stream_batch1["ms_per_1k"], 3),
        "stream_batch_chars": args.batch_chars,
        "stream_hold_chars": matcher.hold_chars,
        "stream_chars": stream["chars"],
        "stream_leaks": stream["leaks"] + stream_batch1["leaks"],
        "stream_mismatches": stream["mismatches"] + stream_batch1["mismatches"],
        "corpus_mb": round(corpus_mb, 2),
        "paragraphs": len(paragraphs),
        "lexicon_entries": len(entries),
        "allow_entries": len(allow),
        "build_s": round(build_s, 3),
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    result["targets_met"] = all(
        [
            result["ratio_vs_jieba"] >= 50,
            result["recall_planted"] == 1.0,
            result["recall_evasion"] >= 0.95,
            result["benign_flag_rate"] <= 0.01,
            result["stream_ms_per_1k"] < 1.0,
        ]
    )
    print(
        f"corpus {result['corpus_mb']} MB, {len(entries)} entries: ours {ours_s:.3f} s, "
        f"jieba {jieba_s:.3f} s ({result['ratio_vs_jieba']}x); recall planted "
        f"{result['recall_planted']:.2%} (jieba {result['naive_recall_planted']:.2%}), evasion "
        f"{result['recall_evasion']:.2%} (jieba {result['naive_recall_evasion']:.2%}); benign "
        f"flagged {result['benign_flag_rate']:.2%} (jieba {result['naive_benign_flag_rate']:.2%}); "
        f"stream {result['stream_ms_per_1k']} ms per 1k chars"
    )
    print(json.dumps(result, ensure_ascii=False))


def _vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Simplified all-CJK dictionary words, most frequent first, and their frequencies."""
    t2s = opencc.OpenCC("t2s")
    rows = []
    for line in (Path(jieba.__file__).parent / "dict.txt").read_text(encoding="utf-8").splitlines():
        word, freq, _ = line.split(" ")
        if len(word) <= 4 and all("\u4e00" <= c <= "\u9fff" for c in word):
            rows.append((int(freq), word))
    rows.sort(reverse=True)
    converted = t2s.convert("\n".join(w for _, w in rows)).split("\n")
    kept = [(f, w) for (f, w), s in zip(rows, converted, strict=True) if s == w]
    common = kept[:50_000]
    return [w for _, w in common], [f for f, _ in common], [w for _, w in kept]


def _lexicon(rng: random.Random, ranked: list[str], count: int) -> tuple[list[Entry], list[str]]:
    dictionary = set(ranked)
    middling = [w for w in ranked[20_000:150_000] if 2 <= len(w) <= 4]
    pairs = [w for w in ranked[:20_000] if len(w) == 2]
    words: set[str] = set(rng.sample(middling, int(count * 0.35)))
    while len(words) < int(count * 0.9):
        phrase = rng.choice(pairs) + rng.choice(pairs)
        if phrase not in dictionary:
            words.add(phrase)
    while len(words) < count:
        latin = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
        words.add(latin + (str(rng.randint(1, 99)) if rng.random() < 0.2 else ""))
    severities = rng.choices([Severity.BLOCK, Severity.MASK, Severity.FLAG], [60, 25, 15], k=count)
    entries = [
        Entry(word, rng.choice(CATEGORIES), severity)
        for word, severity in zip(sorted(words), severities, strict=True)
    ]
    lexicon = _plain_automaton(sorted(words))
    allow: list[str] = []
    cjk = [w for w in sorted(words) if not w.isascii()]
    while len(allow) < 300:
        candidate = rng.choice(cjk) + rng.choice(pairs)
        if len(list(lexicon.iter(_latin(candidate)))) == 1 and candidate not in allow:
            allow.append(candidate)
    return entries, allow


class _Text:
    """Sentences of frequency-weighted words that contain no lexicon or allow-list word."""

    def __init__(
        self,
        rng: random.Random,
        words: list[str],
        weights: list[int],
        forbidden: ahocorasick.Automaton,
    ) -> None:
        self._rng, self._words, self._forbidden = rng, words, forbidden
        self._cumulative = list(_accumulate(weights))

    def tokens(self) -> list[str]:
        while True:
            rng = self._rng
            tokens = rng.choices(self._words, cum_weights=self._cumulative, k=rng.randint(6, 20))
            if rng.random() < 0.15:
                tokens.insert(rng.randrange(len(tokens)), rng.choice(ASCII_WORDS))
            if rng.random() < 0.2:
                tokens.insert(rng.randrange(len(tokens)), f"{rng.randint(2, 2025)}年")
            for _ in range(rng.randint(0, 2)):
                tokens.insert(rng.randrange(1, len(tokens)), "，")
            tokens.append(rng.choice("。。。！？"))
            if next(self._forbidden.iter(_latin("".join(tokens).lower())), None) is None:
                return tokens


def _corpus(
    rng: random.Random,
    text: _Text,
    entries: list[Entry],
    allow: list[str],
    s2t: opencc.OpenCC,
    *,
    mb: float,
    items: int,
) -> tuple[list[str], list[Item]]:
    paragraphs: list[list[str]] = []
    size = 0
    while size < mb * 1e6:
        tokens = [t for _ in range(rng.randint(2, 6)) for t in text.tokens()]
        paragraphs.append(tokens)
        size += len("".join(tokens).encode())
    allowed = _plain_automaton(allow)
    chosen = rng.sample(range(len(paragraphs)), 2 * items)
    planted: list[Item] = []
    for n, index in enumerate(chosen):
        word = rng.choice(entries).word
        kind, variant = ("plain", word) if n < items else _evasion(rng, word, s2t)
        paragraphs[index], span = _insert(rng, paragraphs[index], variant, allowed)
        planted.append(Item(index, span, word, kind))
    return ["".join(tokens) for tokens in paragraphs], planted


def _insert(
    rng: random.Random, tokens: list[str], variant: str, allowed: ahocorasick.Automaton
) -> tuple[list[str], tuple[int, int]]:
    """Insert `variant` between two tokens, spaced from ASCII neighbours, not inside an
    allow-listed superstring."""
    while True:
        at = rng.randrange(len(tokens))
        before, after = "".join(tokens[:at]), "".join(tokens[at:])
        if variant.isascii() or (before and before[-1].isascii()) or (after and after[0].isascii()):
            variant_text = f" {variant} "
            span = (len(before) + 1, len(before) + 1 + len(variant))
        else:
            variant_text, span = variant, (len(before), len(before) + len(variant))
        joined = before + variant_text + after
        ends = [end for end, _ in allowed.iter(_latin(joined))]
        if not ends:
            return [before, variant_text, after], span


def _evasion(rng: random.Random, word: str, s2t: opencc.OpenCC) -> tuple[str, str]:
    kinds = ["spaced", "symbols", "zero_width", "traditional_symbols", "symbols_zero_width"]
    if word.isascii():
        kinds += ["full_width", "case", "full_width_spaced", "case_symbols"]
    elif s2t.convert(word) != word:
        kinds += ["traditional", "traditional"]
    kind = rng.choice(kinds)
    traditional = s2t.convert(word)
    gap = lambda: rng.choice(GAPS)  # noqa: E731
    joins = {
        "traditional": lambda: traditional,
        "spaced": lambda: " ".join(word),
        "symbols": lambda: "".join(c + gap() for c in word[:-1]) + word[-1],
        "zero_width": lambda: rng.choice(ZERO_WIDTH).join(word),
        "traditional_symbols": lambda: "".join(c + gap() for c in traditional[:-1]) + traditional[-1],
        "symbols_zero_width": lambda: "".join(c + rng.choice(ZERO_WIDTH) + gap()[:2] for c in word[:-1]) + word[-1],
        "full_width": lambda: _full_width(word),
        "case": lambda: "".join(c.upper() if rng.random() < 0.5 else c for c in word),
        "full_width_spaced": lambda: " ".join(_full_width(word)),
        "case_symbols": lambda: "".join(c.upper() + gap() for c in word[:-1]) + word[-1].upper(),
    }  # fmt: skip
    return kind, joins[kind]()


def _benign(
    rng: random.Random, text: _Text, entries: list[Entry], allow: list[str], *, count: int
) -> tuple[list[str], list[str]]:
    latin = [e.word for e in entries if e.word.isascii()]
    lexicon = ahocorasick.Automaton()  # per character: these sentences are short
    for entry in entries:
        lexicon.add_word(entry.word, entry.word)
    lexicon.make_automaton()
    sentences, kinds = [], []
    for n in range(count):
        kind = (
            "everyday" if n < count * 0.6 else "allow_listed" if n < count * 0.9 else "glued_latin"
        )
        while True:
            tokens = text.tokens()
            at = rng.randrange(len(tokens))
            if kind == "allow_listed":
                inserted = rng.choice(allow)
            elif kind == "glued_latin":
                inserted = f" {_glue(rng)}{rng.choice(latin)}{_glue(rng)} "
            else:
                inserted = ""
            start = len("".join(tokens[:at]))
            tokens.insert(at, inserted)
            sentence = "".join(tokens)
            # No lexicon word may appear outside the inserted superstring (the insertion must
            # not form one with its neighbours, 学院 + 方面 → 院方): that would be a true hit.
            found = [(end + 1 - len(w), end + 1) for end, w in lexicon.iter(sentence.lower())]
            if all(start <= a and b <= start + len(inserted) for a, b in found):
                break
        sentences.append(sentence)
        kinds.append(kind)
    return sentences, kinds


def _throughput(
    matcher: Matcher, words: set[str], paragraphs: list[str]
) -> tuple[float, float, list[Verdict], list[set[str]]]:
    blocks = 10
    size = -(-len(paragraphs) // blocks)
    ours_s = jieba_s = 0.0
    verdicts: list[Verdict] = []
    tokens: list[set[str]] = []
    for block in range(blocks):
        chunk = paragraphs[block * size : (block + 1) * size]
        for side in ("ours", "jieba") if block % 2 == 0 else ("jieba", "ours"):
            started = time.perf_counter()
            if side == "ours":
                verdicts += [matcher.check(p) for p in chunk]
                ours_s += time.perf_counter() - started
            else:
                found = [set(jieba.cut(p)) for p in chunk]
                _ = [f & words for f in found]
                jieba_s += time.perf_counter() - started
                tokens += found
    return ours_s, jieba_s, verdicts, tokens


def _scan_only(matcher: Matcher, paragraphs: list[str]) -> float:
    """The Aho-Corasick scan alone (`Matcher.finder` over the folded paragraphs, as
    `Matcher.check` runs it): the floor of our time."""
    folded = [fold(p) for p in paragraphs]
    find = matcher.finder.find_overlapping
    started = time.perf_counter()
    for text in folded:
        find(text)
    return time.perf_counter() - started


def _stream(
    matcher: Matcher, paragraphs: list[str], rng: random.Random, *, chars: int, batch: int
) -> dict[str, float]:
    replays, total = [], 0
    for paragraph in paragraphs:
        if total >= chars:
            break
        cuts, i = [], 0
        while i < len(paragraph):
            step = rng.choice((1, 1, 2, 2, 3, 4))
            cuts.append(paragraph[i : i + step])
            i += step
        replays.append((paragraph, cuts))
        total += len(paragraph)
    outputs = []
    started = time.perf_counter()
    for _, deltas in replays:
        guard = StreamGuard(matcher, batch_chars=batch)
        shown, blocked = [], None
        for delta in deltas:
            release = guard.feed(delta)
            shown.append(release.text)
            if release.blocked:
                blocked = release.blocked
                break
        if blocked is None:
            release = guard.finish()
            shown.append(release.text)
            blocked = release.blocked
        outputs.append(("".join(shown), blocked))
    elapsed = time.perf_counter() - started
    leaks = mismatches = 0
    for (paragraph, _), (shown, blocked) in zip(replays, outputs, strict=True):
        verdict = matcher.check(paragraph)
        if verdict.blocked:
            first = min(h.span[0] for h in verdict.hits if h.severity is Severity.BLOCK)
            leaks += len(shown) > first
            mismatches += blocked is None
        else:
            mismatches += blocked is not None or shown != matcher.mask(paragraph)
    return {
        "ms_per_1k": elapsed * 1000 / (total / 1000),
        "chars": total,
        "leaks": leaks,
        "mismatches": mismatches,
    }


def _found(hits: tuple[Hit, ...], item: Item) -> bool:
    start, end = item.span
    return any(h.word == item.word and h.span[0] < end and start < h.span[1] for h in hits)


def _plain_automaton(words: list[str]) -> ahocorasick.Automaton:
    automaton = ahocorasick.Automaton()
    for word in words:
        automaton.add_word(_latin(word.lower()), word)
    automaton.make_automaton()
    return automaton


def _latin(text: str) -> str:
    return text.encode().decode("latin-1")


def _glue(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfgkmnprstz") for _ in range(rng.randint(2, 4)))


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def _accumulate(values: list[int]) -> list[int]:
    total, out = 0, []
    for value in values:
        total += value
        out.append(total)
    return out


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


if __name__ == "__main__":
    main()
