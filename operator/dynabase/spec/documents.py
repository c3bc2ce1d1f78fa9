"""Read multi-document YAML manifests into models, keeping file:line for errors.

PyYAML's composer gives every node its position; we build plain Python values
while remembering the line of each path, then map a pydantic error location
back to the closest line. Every error in every document is reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .resources import KINDS, Resource, TierPolicy

YAML_SUFFIXES = (".yaml", ".yml")
Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class ManifestError:
    file: str
    line: int
    kind: str
    name: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.kind}/{self.name}" if self.kind else "document"
        field = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}: {where}: {field}{self.message}"


@dataclass(frozen=True)
class Document:
    file: str
    line: int
    resource: Resource


@dataclass
class LoadResult:
    documents: list[Document] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)
    # Names of documents that failed, by (kind, namespace/name): headless mode keeps
    # their last good declaration instead of treating them as deleted.
    invalid_keys: set[tuple[str, str]] = field(default_factory=set)

    def extend(self, other: LoadResult) -> None:
        self.documents.extend(other.documents)
        self.errors.extend(other.errors)
        self.invalid_keys |= other.invalid_keys


def _to_python(node: yaml.Node, path: Loc, lines: dict[Loc, int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            out[key] = _to_python(value_node, (*path, key), lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int:
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1


def _field_name(loc: Loc) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item.startswith("function-") or item in {"dict[str,Tier]"}:
            continue
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


# What to write instead, for fields whose pattern alone would not tell a person.
_PATTERN_HINTS = {
    "tier": "tier names are upper case letters, digits and _, for example FREE or PRO",
    "databaseName": "use lower case letters, digits and _ (at most 63), starting with a letter "
    "or _, for example acme_prod",
    "orgId": "use letters, digits and _ . : - (at most 63), for example org-acme",
    "name": "use lower case letters, digits, - and . as Kubernetes names do",
}


def _message(error: Any) -> str:
    text = str(error["msg"])
    if error["type"] == "string_pattern_mismatch":
        field = next((p for p in reversed(error["loc"]) if isinstance(p, str)), "")
        hint = _PATTERN_HINTS.get(field, f"it must match {error['ctx']['pattern']}")
        return f"{error.get('input')!r} is not allowed: {hint}"
    if error["type"] in {"rule", "duration_format", "size_format", "duration_type", "size_type",
                         "database_name"}:
        return text
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"unknown field (remove it or check the spelling); {text.lower()}"
    if error["type"] == "missing":
        return "required field is missing; add it"
    if isinstance(value, (str, int, float, bool)) and not isinstance(value, dict):
        return f"{text} (got {value!r})"
    return text


def located_errors(exc: ValidationError) -> list[tuple[Loc, str]]:
    """Each error of a model validation: where (the path from the document's root) and what to do."""
    out: list[tuple[Loc, str]] = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        ctx_field = (error.get("ctx") or {}).get("field")
        if ctx_field:
            loc = (*loc, *ctx_field.split("."))
        out.append((loc, _message(error)))
    return out


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """(field, message) of each error, as ``dynabase validate`` words them (for status, where there is no line)."""
    return [(_field_name(loc), message) for loc, message in located_errors(exc)]


def parse_documents(text: str, filename: str) -> LoadResult:
    """Parse one file's YAML text. Errors never raise; they are collected."""
    result = LoadResult()
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        result.errors.append(ManifestError(filename, line, "", "", "", f"invalid YAML: {problem}"))
        return result
    for node in nodes:
        if node is None:
            continue
        lines: dict[Loc, int] = {}
        raw = _to_python(node, (), lines)
        doc_line = node.start_mark.line + 1
        if not isinstance(raw, dict):
            result.errors.append(
                ManifestError(filename, doc_line, "", "", "", "a manifest must be a mapping")
            )
            continue
        kind = raw.get("kind")
        name = str((raw.get("metadata") or {}).get("name", "?")) if isinstance(raw.get("metadata"), dict) else "?"
        model = KINDS.get(kind) if isinstance(kind, str) else None
        if model is None or not isinstance(kind, str):
            result.errors.append(
                ManifestError(
                    filename, lines.get(("kind",), doc_line), str(kind or ""), name, "kind",
                    f"unknown kind {kind!r}; expected one of {', '.join(sorted(KINDS))}",
                )
            )
            continue
        try:
            resource = model.model_validate(raw)
        except ValidationError as exc:
            namespace = (raw.get("metadata") or {}).get("namespace") or "default"
            key = name if kind == "TierPolicy" else f"{namespace}/{name}"
            result.invalid_keys.add((kind, key))
            for loc, message in located_errors(exc):
                result.errors.append(
                    ManifestError(filename, _line_for(loc, lines), kind, name, _field_name(loc), message)
                )
            continue
        result.documents.append(Document(filename, doc_line, resource))
    return result


def iter_manifest_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.suffix in YAML_SUFFIXES and child.is_file() and not any(
                    part.startswith(".") for part in child.relative_to(path).parts
                ):
                    yield child
        else:
            yield path


def load_paths(paths: Iterable[str | Path]) -> LoadResult:
    result = LoadResult()
    for path in iter_manifest_files(paths):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            result.errors.append(ManifestError(str(path), 1, "", "", "", f"cannot read: {exc.strerror}"))
            continue
        result.extend(parse_documents(text, str(path)))
    return reject_duplicates(result)


def reject_duplicates(result: LoadResult) -> LoadResult:
    """A resource declared twice is an error on the second: which one wins must not be a guess."""
    seen: dict[tuple[str, str], Document] = {}
    kept: list[Document] = []
    for doc in result.documents:
        resource = doc.resource
        key = (resource.kind, resource.name if isinstance(resource, TierPolicy) else resource.key)
        first = seen.get(key)
        if first is not None:
            result.errors.append(ManifestError(
                doc.file, doc.line, resource.kind, resource.metadata.name, "metadata.name",
                f"declared twice (first at {first.file}:{first.line}); remove one of them",
            ))
            result.invalid_keys.add(key)
            continue
        seen[key] = doc
        kept.append(doc)
    result.documents = kept
    return result
