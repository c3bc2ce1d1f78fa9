"""Change one TenantDatabase's tier in YAML text, touching nothing but that value.

A GitOps repository is written by people: comments, key order and quoting must
survive. PyYAML's node marks locate the scalar to replace, so the rest of the
text is copied byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

KIND = "TenantDatabase"


@dataclass(frozen=True)
class TierEdit:
    text: str
    documents: int  # TenantDatabase documents of the org in this text
    old_tiers: tuple[str, ...]


class EditError(ValueError):
    pass


def plain_scalar(value: str) -> str:
    """The value as YAML would write it: quoted only when it would otherwise read as another type (ON, 123)."""
    return yaml.safe_dump([value], default_flow_style=True, width=1000).strip()[1:-1]


def _entries(node: yaml.Node) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}


def _scalar(entries: dict[str, tuple[yaml.Node, yaml.Node]], key: str) -> str | None:
    found = entries.get(key)
    return str(found[1].value) if found and isinstance(found[1], yaml.ScalarNode) else None


def set_tier(text: str, org_id: str, tier: str, tier_policy_ref: str | None = None) -> TierEdit:
    """Every TenantDatabase document of `org_id` gets `tier` (and `tierPolicyRef`, when given)."""
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise EditError(f"invalid YAML: {exc}") from exc
    # (offset of the first replaced character, offset after it, replacement)
    splices: list[tuple[int, int, str]] = []
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(mark: yaml.Mark) -> int:
        return line_starts[mark.line] + mark.column

    found, old_tiers = 0, []
    for document in documents:
        top = _entries(document)
        if _scalar(top, "kind") != KIND or "spec" not in top:
            continue
        spec_node = top["spec"][1]
        spec = _entries(spec_node)
        if _scalar(spec, "orgId") != org_id:
            continue
        found += 1
        if "tier" not in spec or not isinstance(spec["tier"][1], yaml.ScalarNode):
            raise EditError(f"TenantDatabase of {org_id} has no scalar spec.tier")
        tier_key, tier_node = spec["tier"]
        old_tiers.append(str(tier_node.value))
        if tier_node.value != tier:
            splices.append((offset(tier_node.start_mark), offset(tier_node.end_mark), plain_scalar(tier)))
        if tier_policy_ref is None:
            continue
        if "tierPolicyRef" in spec:
            ref_node = spec["tierPolicyRef"][1]
            if ref_node.value != tier_policy_ref:
                splices.append((offset(ref_node.start_mark), offset(ref_node.end_mark), plain_scalar(tier_policy_ref)))
        elif isinstance(spec_node, yaml.MappingNode) and not spec_node.flow_style:
            # A new line under tier, indented like it.
            after_tier_line = line_starts[min(tier_node.end_mark.line + 1, len(line_starts) - 1)]
            indent = " " * tier_key.start_mark.column
            newline = "" if text[:after_tier_line].endswith("\n") else "\n"
            splices.append((after_tier_line, after_tier_line,
                            f"{newline}{indent}tierPolicyRef: {plain_scalar(tier_policy_ref)}\n"))
        else:
            raise EditError(f"cannot add tierPolicyRef to the flow-style spec of {org_id}")
    for start, end, replacement in sorted(splices, reverse=True):
        text = text[:start] + replacement + text[end:]
    return TierEdit(text, found, tuple(old_tiers))
