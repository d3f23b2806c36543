"""Reading a corpus: JSONL (`id`, `title`, `text`), a SQuAD-format JSON file
(each context becomes a document), or a folder of `.txt` / `.md` files.

Problems are never passed over in silence: with ``on_error="stop"`` the first
one raises :class:`~shardqa.errors.CorpusError` naming the file (and line);
with ``on_error="skip"`` the offending record is left out and the problem is
returned, so the caller can report every one of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shardqa.errors import SHAPE_ERRORS, CorpusError, not_squad_shape

OnError = Literal["skip", "stop"]
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    #: Documents of one group are placed on the same shard (a SQuAD article's
    #: paragraphs, say), so a question's best passages tend to share a shard.
    group: str


@dataclass
class CorpusReport:
    documents: list[Document]
    problems: list[str]
    source_kind: str


class _Collector:
    def __init__(self, on_error: OnError):
        if on_error not in ("skip", "stop"):
            raise CorpusError(f"--on-error must be skip or stop, not {on_error!r}")
        self.on_error = on_error
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        if self.on_error == "stop":
            raise CorpusError(message + " (use --on-error skip to leave such records out)")
        self.problems.append(message)


def _not_unicode(doc: Document) -> str | None:
    from shardqa.tokenization import not_unicode_at

    for name in ("doc_id", "title", "text"):
        at = not_unicode_at(getattr(doc, name))
        if at is not None:
            return f"a lone surrogate in its {name} at character {at}"
    return None


def squad_doc_id(title: str, paragraph_index: int) -> str:
    """The document id given to a SQuAD context; eval-route relies on it."""
    return f"{title}#{paragraph_index}"


def read_corpus(path: str | Path, on_error: OnError = "stop") -> CorpusReport:
    path = Path(path)
    col = _Collector(on_error)
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    if path.is_dir():
        docs, kind = _read_folder(path, col), "folder"
    else:
        raw = _read_text(path)
        if path.suffix.lower() in TEXT_SUFFIXES:
            docs, kind = _plain_document(path, raw, path.stem, col), "text"
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            docs, kind = _read_jsonl(path, raw, col), "jsonl"
        else:
            docs, kind = _read_json_or_jsonl(path, raw, col)
    # Ids are unique here: the JSONL and SQuAD readers refuse a repeated one
    # where they can name its place; a folder's file paths cannot repeat.
    unique: list[Document] = []
    for d in docs:
        bad = _not_unicode(d)
        if bad is not None:
            # JSON can escape lone surrogates (\ud800) that are not text.
            col.problem(f"{path}: document {d.doc_id!r} is not valid Unicode text ({bad})")
            continue
        unique.append(d)
    if not unique:
        more = f" ({len(col.problems)} records skipped)" if col.problems else ""
        raise CorpusError(f"{path}: empty corpus, no document with text{more}")
    return CorpusReport(unique, col.problems, kind)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _plain_document(path: Path, raw: str, doc_id: str, col: _Collector) -> list[Document]:
    if not raw.strip():
        col.problem(f"{path}: document has no text")
        return []
    title = path.stem
    for line in raw.splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
            break
    return [Document(doc_id, title, raw, doc_id)]


def _read_folder(root: Path, col: _Collector) -> list[Document]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(f"{root}: empty corpus, no .txt or .md files in this folder")
    docs: list[Document] = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            col.problem(f"{f}: cannot read ({getattr(exc, 'strerror', None) or exc})")
            continue
        docs += _plain_document(f, raw, f.relative_to(root).as_posix(), col)
    return docs


def _read_json_or_jsonl(path: Path, raw: str, col: _Collector) -> tuple[list[Document], str]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        if raw.lstrip().startswith("{") and "\n" in raw.strip():
            return _read_jsonl(path, raw, col), "jsonl"
        raise CorpusError(f"{path}: not valid JSON or JSONL") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return _read_squad(path, data, col), "squad"
    if isinstance(data, dict) and "text" in data:
        return _read_jsonl(path, raw.replace("\n", " ") + "\n", col), "jsonl"
    raise CorpusError(f"{path}: JSON but neither SQuAD format (top-level 'data' list) nor JSONL documents")


def _read_squad(path: Path, data: dict, col: _Collector) -> list[Document]:
    docs: list[Document] = []
    first_article: dict[str, int] = {}
    for ai, article in enumerate(data["data"]):
        if not isinstance(article, dict):
            col.problem(f"{path}: data[{ai}] is not an object")
            continue
        title = str(article.get("title") or f"article-{ai}")
        for pi, para in enumerate(article.get("paragraphs") or []):
            ctx = para.get("context") if isinstance(para, dict) else None
            if not isinstance(ctx, str) or not ctx.strip():
                col.problem(f"{path}: data[{ai}].paragraphs[{pi}] ({title}) has no context text")
                continue
            doc_id = squad_doc_id(title, pi)
            if doc_id in first_article:
                # Two articles of one title: their paragraphs' ids collide.
                col.problem(f"{path}: data[{ai}].paragraphs[{pi}] has the id {doc_id!r} of data[{first_article[doc_id]}] "
                            f"(two articles titled {title!r})")
                continue
            first_article[doc_id] = ai
            docs.append(Document(doc_id, title.replace("_", " "), ctx, title))
    return docs


def _read_jsonl(path: Path, raw: str, col: _Collector) -> list[Document]:
    docs: list[Document] = []
    first_line: dict[str, int] = {}
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            col.problem(f"{path}:{n}: invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            col.problem(f"{path}:{n}: expected a JSON object with 'text'")
            continue
        doc_id = str(obj.get("id", "") or f"line-{n}")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            col.problem(f"{path}:{n}: document {doc_id!r} has no text")
            continue
        if doc_id in first_line:
            col.problem(f"{path}:{n}: duplicate document id {doc_id!r} (first on line {first_line[doc_id]})")
            continue
        first_line[doc_id] = n
        docs.append(Document(doc_id, str(obj.get("title") or ""), text, str(obj.get("group") or doc_id)))
    return docs


@dataclass(frozen=True)
class SquadQuestion:
    qid: str
    doc_id: str
    question: str
    answers: tuple[tuple[int, int], ...]  # (start, end) character spans in the context


def read_squad_questions(path: str | Path) -> list[SquadQuestion]:
    """The questions of a SQuAD-format file with their gold spans, keyed by the
    document ids :func:`read_corpus` gives that file's contexts."""
    path = Path(path)
    raw = _read_text(path) if path.exists() else None
    if raw is None:
        raise CorpusError(f"{path}: no such file")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise CorpusError(f"{path}: not a SQuAD file (no top-level 'data' list)")
    out: list[SquadQuestion] = []
    for ai, article in enumerate(data["data"]):
        where = f"{path}: data[{ai}]"
        try:
            title = str(article.get("title") or f"article-{ai}")
            for pi, para in enumerate(article.get("paragraphs") or []):
                where = f"{path}: data[{ai}].paragraphs[{pi}]"
                doc_id = squad_doc_id(title, pi)
                for qa in para.get("qas") or []:
                    spans = tuple(
                        (int(a["answer_start"]), int(a["answer_start"]) + len(a["text"])) for a in qa.get("answers") or []
                    )
                    if not isinstance(qa.get("question", ""), str):
                        raise TypeError("a question must be a string")
                    if spans and qa.get("question", "").strip():
                        out.append(SquadQuestion(str(qa.get("id", "")), doc_id, qa["question"], spans))
        except SHAPE_ERRORS as exc:
            raise CorpusError(not_squad_shape(where, exc)) from None
    if not out:
        raise CorpusError(f"{path}: no answerable questions")
    return out
