"""Tool namespaces and JSON-schema parameters as the TypeScript-like text harmony puts in system/developer messages.

The layout (indentation, where comments go, how defaults and `oneOf` variants print) reproduces openai-harmony 0.0.8
byte for byte; tests/harmony compares it on many schemas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


def text_lines(text: str) -> list[str]:
    """Split like Rust's `str::lines`: on "\\n", dropping one "\\r" before it; no trailing empty line."""
    pieces = text.split("\n")
    lines = [p[:-1] if p.endswith("\r") else p for p in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


def format_float(x: float) -> str:
    """Shortest round-trip decimal in the style of Rust's `ryu` (``1.0``, ``1e20``, ``0.0001``, ``1.5e-7``)."""
    if math.isnan(x) or math.isinf(x):
        return "null"  # not representable in JSON
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    sign = "-" if x < 0 else ""
    mant, _, exp = repr(abs(x)).partition("e")
    int_part, _, frac = mant.partition(".")
    digits = int_part + frac
    point = len(int_part) + int(exp or 0)  # value = 0.<digits> * 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    n = len(digits)
    if n <= point <= 16:
        body = digits + "0" * (point - n) + ".0"
    elif 0 < point <= 16:
        body = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        body = "0." + "0" * (-point) + digits
    elif n == 1:
        body = f"{digits}e{point - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + body


def _serde_number(text: str) -> float:
    """The f64 that serde_json (default features) reads from a JSON number: the digits that fit a u64 as an integer
    significand, then one multiplication or division by a power of ten; not always the nearest double."""
    negative = text.startswith("-")
    mant, _, exp = text.lstrip("-").lower().partition("e")
    int_part, _, frac = mant.partition(".")
    significand, exponent = 0, int(exp or 0)
    for k, ch in enumerate(int_part + frac):
        if significand * 10 + int(ch) > _U64_MAX:  # further digits are dropped; integer ones still scale
            exponent += max(len(int_part) - k, 0)
            break
        significand = significand * 10 + int(ch)
        if k >= len(int_part):
            exponent -= 1
    value = float(significand)
    while True:
        if abs(exponent) <= 308:
            value = value * float(f"1e{exponent}") if exponent >= 0 else value / float(f"1e{-exponent}")
            break
        if value == 0.0 or exponent > 0:
            value = value if value == 0.0 else math.inf
            break
        value /= 1e308
        exponent += 308
    return -value if negative else value


def json_display(value: Any) -> str:
    """Compact JSON as openai-harmony prints a value after its Python-to-Rust JSON round trip (serde_json: no spaces,
    non-ASCII kept, numbers re-read as u64/i64/f64 and floats printed the `ryu` way)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value) if _I64_MIN <= value <= _U64_MAX else format_float(_serde_number(str(value)))
    if isinstance(value, float):
        return format_float(_serde_number(repr(value))) if math.isfinite(value) else "null"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k), ensure_ascii=False)}:{json_display(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(json_display(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def _is_enum(schema: Mapping[str, Any]) -> bool:
    values = schema.get("enum")
    return isinstance(values, list) and len(values) > 0


def _default_text(schema: Mapping[str, Any], *, bare_enum: bool = True) -> str:
    """Harmony quotes string defaults, except an enum property's (`x?: "a" | "b", // default: a`); inside `oneOf`
    variants it always quotes."""
    value = schema["default"]
    if isinstance(value, str):
        return value if bare_enum and _is_enum(schema) else f'"{value}"'
    return json_display(value)


def _with_null(schema: Any, ts: str) -> str:
    if isinstance(schema, Mapping) and schema.get("nullable") is True and "null" not in ts:
        return ts + " | null"
    return ts


def _variants(variants: list[Any], indent: str, property_description: str | None = None) -> str:
    """`` | type // description default: x`` lines. Under a property that has its own description (printed above it),
    harmony leaves out the first variant's description and any that repeats the property's."""
    out = []
    for k, variant in enumerate(variants):
        out.append(f"\n{indent} | ")
        out.append(_with_null(variant, schema_to_typescript(variant, indent + "   ")))
        if isinstance(variant, Mapping):
            comments = []
            desc = variant.get("description")
            hidden = property_description is not None and (k == 0 or desc == property_description)
            if isinstance(desc, str) and not hidden:
                comments.append(desc)
            if "default" in variant:
                comments.append("default: " + _default_text(variant, bare_enum=False))
            if comments:
                out.append(" // " + " ".join(comments))
    return "".join(out)


def _property(key: str, schema: Any, required: bool, indent: str) -> str:
    prop: Mapping[str, Any] = schema if isinstance(schema, Mapping) else {}
    out = []
    title = prop.get("title")
    if isinstance(title, str):
        out.append(f"{indent}// {title}\n{indent}//\n")
    desc = prop.get("description")
    has_desc = isinstance(desc, str)
    if has_desc and "oneOf" not in prop:
        out.append(f"{indent}// {desc}\n")
    examples = prop.get("examples")
    if isinstance(examples, list) and examples:
        out.append(f"{indent}// Examples:\n")
        out.extend(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
    mark = "" if required else "?"
    one_of = prop.get("oneOf")
    if isinstance(one_of, list):
        first = one_of[0] if one_of and isinstance(one_of[0], Mapping) else {}
        if has_desc and desc != first.get("description"):  # not printed when the first variant repeats it
            out.append(f"{indent}// {desc}\n")
        if "default" in prop:
            out.append(f"{indent}// default: {_default_text(prop)}\n")
        out.append(f"{indent}{key}{mark}:")
        out.append(_variants(one_of, indent, desc if has_desc else None))
        out.append(f"\n{indent},\n")
        return "".join(out)
    out.append(f"{indent}{key}{mark}: ")
    out.append(_with_null(prop, schema_to_typescript(schema, indent + "    ")))
    if "default" in prop and "oneOf" not in prop:
        out.append(f", // default: {_default_text(prop)}\n")
    else:
        out.append(",\n")
    return "".join(out)


def _object(schema: Mapping[str, Any], indent: str) -> str:
    out = []
    desc = schema.get("description")
    if isinstance(desc, str):
        out.append(f"{indent}// {desc}\n")
    out.append("{\n")
    props = schema.get("properties")
    if isinstance(props, Mapping):
        req = schema.get("required")
        required = {r for r in req if isinstance(r, str)} if isinstance(req, list) else set()
        for key, value in props.items():
            out.append(_property(str(key), value, key in required, indent))
    out.append(f"{indent}}}")
    return "".join(out)


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as harmony's TypeScript-like type text."""
    if not isinstance(schema, Mapping):
        return "any"
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        return _variants(one_of, indent)
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        return " | ".join(names) if names else "any"
    if kind == "object":
        return _object(schema, indent)
    if kind == "string":
        values = schema.get("enum")
        quoted = [f'"{v}"' for v in values if isinstance(v, str)] if isinstance(values, list) else []
        return " | ".join(quoted) if quoted else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _tool_lines(tool: Mapping[str, Any]) -> list[str]:
    lines = [f"// {line}" for line in text_lines(tool.get("description") or "")]
    params = tool.get("parameters")
    if params is None:
        lines.append(f"type {tool['name']} = () => any;\n")
    else:
        lines.append(f"type {tool['name']} = (_: {schema_to_typescript(params)}) => any;\n")
    return lines


def render_tools_section(namespaces: Mapping[str, Mapping[str, Any]]) -> str:
    """``# Tools`` and one ``## name`` block per namespace, sorted by key (harmony keeps them in a BTreeMap)."""
    blocks = ["# Tools"]
    for key in sorted(namespaces):
        ns = namespaces[key]
        name = ns.get("name", key)
        tools = ns.get("tools") or []
        lines = [f"## {name}\n"]
        desc = ns.get("description")
        if isinstance(desc, str):
            lines.extend(f"// {line}" if tools else line for line in text_lines(desc))
        if tools:
            lines.append(f"namespace {name} {{\n")
            for tool in tools:
                lines.extend(_tool_lines(tool))
            lines.append(f"}} // namespace {name}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
