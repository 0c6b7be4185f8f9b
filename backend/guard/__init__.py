"""The Chinese sensitive-word guard and personal-data masking.

    store = LexiconStore(path, segmenter=jieba_segmenter(cache_dir=...))   # at startup
    verdict = store.current().check(text)        # user input, retrieved chunks, documents
    stream = StreamGuard(store.current())        # one per streamed answer
    release = stream.feed(delta) ... stream.finish()
    mask_pii(text)                               # audit records and logs

Modules: `normalize` (text → letters, with a map back), `charmap` (each character's form),
`lexicon` (files), `matcher` (compiled lexicon, whole-text check), `stream` (hold-back filter),
`store` (reload), `pii`, `report` (JSON verdicts for the CLI), `verdict`, `segment` (jieba, only
for `word` entries).
"""

from backend.guard.lexicon import Entry, Lexicon, Severity, builtin_lexicon_dir
from backend.guard.matcher import MAX_GAP, Matcher
from backend.guard.pii import PiiKind, PiiMatch, find_pii, mask_pii
from backend.guard.report import check_lines, verdict_json
from backend.guard.segment import Segmenter, jieba_segmenter
from backend.guard.store import LexiconStore
from backend.guard.stream import Release, StreamGuard
from backend.guard.verdict import Action, Hit, Verdict

__all__ = [
    "MAX_GAP",
    "Action",
    "Entry",
    "Hit",
    "Lexicon",
    "LexiconStore",
    "Matcher",
    "PiiKind",
    "PiiMatch",
    "Release",
    "Segmenter",
    "Severity",
    "StreamGuard",
    "Verdict",
    "builtin_lexicon_dir",
    "check_lines",
    "find_pii",
    "jieba_segmenter",
    "mask_pii",
    "verdict_json",
]
