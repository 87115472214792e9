"""JSON schemas that structured-output tests and benchmarks decode against.

Every construct the shard promises to support appears at least once: nested objects, arrays with
minItems/maxItems, enum, const, integers and numbers with bounds, strings with maxLength and simple
patterns, required and optional properties, anyOf, $ref into $defs, additionalProperties false.
Documents are kept short (strings and arrays bounded, numbers with a multipleOf that bounds their
digits), so that even a random model emitting tokens under the constraint finishes them within a few
hundred tokens: greedy decoding of a random model can otherwise append fraction digits forever.

`SCHEMAS` maps a name to the schema (a dict); `distinct_schemas(n)` gives n different schemas (the
same shapes with renamed properties) for benchmarks that want one schema per row.
"""

from __future__ import annotations

import json
from typing import Any

Schema = dict[str, Any]


def _s(max_len: int = 8, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_len, **extra}


def _obj(props: Schema, required: list[str] | None = None, closed: bool = True) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    if required is not None:
        out["required"] = required
    if closed:
        out["additionalProperties"] = False
    return out


SCHEMAS: dict[str, Schema] = {
    # ---- scalars at the top level
    "bool": {"type": "boolean"},
    "null": {"type": "null"},
    "int_range": {"type": "integer", "minimum": -50, "maximum": 50},
    "int_exclusive": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
    "number_unit": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125},
    "string_short": _s(5),
    "string_min_max": {"type": "string", "minLength": 2, "maxLength": 4},
    "enum_str": {"enum": ["red", "green", "blue"]},
    "enum_mixed": {"enum": ["a", 1, True, None]},
    "const_str": {"const": "fixed"},
    "pattern_digits": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{2}$"},
    "pattern_word": {"type": "string", "pattern": "^[a-z]{1,6}$"},
    "pattern_alt": {"type": "string", "pattern": "^(yes|no|maybe)$"},
    "date_like": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])$"},
    # ---- objects
    "person": _obj(
        {"name": _s(8), "age": {"type": "integer", "minimum": 0, "maximum": 120}}, ["name", "age"]
    ),
    "person_optional": _obj(
        {
            "name": _s(6),
            "email": {"type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.com$"},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
        },
        ["name"],
    ),
    "all_optional": _obj({"a": {"type": "boolean"}, "b": {"type": "null"}}, []),
    "empty_object": {"type": "object", "additionalProperties": False},
    "const_field": _obj({"version": {"const": 2}, "kind": {"const": "event"}}, ["version", "kind"]),
    "enum_field": _obj(
        {"status": {"enum": ["open", "closed", "pending"]}, "priority": {"enum": [1, 2, 3]}},
        ["status", "priority"],
    ),
    "nested_2": _obj(
        {"user": _obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "nick": _s(6)}, ["id"])},
        ["user"],
    ),
    "nested_3": _obj(
        {
            "a": _obj(
                {"b": _obj({"c": {"type": "integer", "minimum": 0, "maximum": 9}}, ["c"])},
                ["b"],
            )
        },
        ["a"],
    ),
    "bounds_mixed": _obj(
        {
            "lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.25},
            "lon": {"type": "number", "minimum": -180, "maximum": 180, "multipleOf": 0.25},
            "alt": {"type": "integer", "minimum": -400, "maximum": 9000},
        },
        ["lat", "lon"],
    ),
    "flags": _obj({k: {"type": "boolean"} for k in ("x", "y", "z")}, ["x", "y", "z"]),
    "nullable": _obj({"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 5}}, ["v"]),
    "pattern_properties": {
        "type": "object",
        "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 3}},
        "patternProperties": {"^x[0-9]$": {"type": "boolean"}},
        "required": ["k"],
        "additionalProperties": False,
        "maxProperties": 3,
    },
    # ---- arrays
    "int_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": 1,
        "maxItems": 4,
    },
    "string_array_exact": {"type": "array", "items": _s(3), "minItems": 2, "maxItems": 2},
    "enum_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
    "bool_array_min": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 6},
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, _s(4), {"type": "boolean"}],
        "items": False,
        "minItems": 3,
    },
    "array_of_objects": {
        "type": "array",
        "items": _obj({"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
                      ["id", "ok"]),
        "minItems": 1,
        "maxItems": 3,
    },
    "matrix": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                  "minItems": 2, "maxItems": 2},
        "minItems": 2,
        "maxItems": 2,
    },
    "object_with_array": _obj(
        {"tags": {"type": "array", "items": _s(4), "maxItems": 3}, "count": {"type": "integer",
                                                                              "minimum": 0, "maximum": 3}},
        ["tags", "count"],
    ),
    # ---- anyOf / $ref / $defs
    "anyof_scalar": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "boolean"}]},
    "anyof_objects": {
        "anyOf": [
            _obj({"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 9}},
                 ["kind", "r"]),
            _obj({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 9}},
                 ["kind", "side"]),
        ]
    },
    "anyof_in_field": _obj(
        {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, _s(5)]}}, ["id"]
    ),
    "ref_defs": {
        "$defs": {"point": _obj({"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                 "y": {"type": "integer", "minimum": -9, "maximum": 9}}, ["x", "y"])},
        **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}, ["start", "end"]),
    },
    "ref_in_array": {
        "$defs": {"tag": {"enum": ["x", "y", "z"]}},
        "type": "array",
        "items": {"$ref": "#/$defs/tag"},
        "minItems": 1,
        "maxItems": 3,
    },
    "ref_chain": {
        "$defs": {
            "inner": _obj({"v": {"type": "boolean"}}, ["v"]),
            "outer": _obj({"inner": {"$ref": "#/$defs/inner"}}, ["inner"]),
        },
        "$ref": "#/$defs/outer",
    },
    "ref_anyof": {
        "$defs": {"small": {"type": "integer", "minimum": 0, "maximum": 9}, "word": _s(3)},
        "anyOf": [{"$ref": "#/$defs/small"}, {"$ref": "#/$defs/word"}],
    },
    # ---- shapes of real extraction / function-calling outputs
    "tool_call": _obj(
        {
            "name": {"enum": ["get_weather", "get_time"]},
            "arguments": _obj({"city": _s(8), "unit": {"enum": ["c", "f"]}}, ["city"]),
        },
        ["name", "arguments"],
    ),
    "invoice": _obj(
        {
            "number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
            "total": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.25},
            "paid": {"type": "boolean"},
            "lines": {
                "type": "array",
                "items": _obj({"sku": _s(4), "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                              ["sku", "qty"]),
                "minItems": 1,
                "maxItems": 2,
            },
        },
        ["number", "total", "lines"],
    ),
    "sentiment": _obj(
        {"label": {"enum": ["positive", "negative", "neutral"]},
         "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}},
        ["label", "score"],
    ),
    "entities": {
        "type": "array",
        "items": _obj(
            {"text": _s(6), "type": {"enum": ["PER", "ORG", "LOC"]},
             "start": {"type": "integer", "minimum": 0, "maximum": 500}},
            ["text", "type", "start"],
        ),
        "maxItems": 2,
    },
    "address": _obj(
        {
            "street": _s(8),
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["US", "DE", "FR"]},
            "unit": {"type": "integer", "minimum": 1, "maximum": 99},
        },
        ["street", "zip", "country"],
    ),
    "event": {
        "$defs": {"when": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
        **_obj(
            {
                "title": _s(8),
                "at": {"$ref": "#/$defs/when"},
                "attendees": {"type": "array", "items": _s(4), "minItems": 1, "maxItems": 2},
                "private": {"type": "boolean"},
            },
            ["title", "at"],
        ),
    },
}


def schema_text(schema: Schema) -> str:
    """The wire form: a JSON string."""
    return json.dumps(schema)


def _rename(schema: Any, suffix: str) -> Any:
    """The same schema with every property name (and required entry) suffixed."""
    if isinstance(schema, list):
        return [_rename(s, suffix) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "properties":
            out[k] = {name + suffix: _rename(sub, suffix) for name, sub in v.items()}
        elif k == "required":
            out[k] = [name + suffix for name in v]
        else:
            out[k] = _rename(v, suffix)
    return out


def distinct_schemas(n: int) -> list[Schema]:
    """n pairwise different schemas: the object schemas of SCHEMAS, renamed per round as needed."""
    objects = [s for s in SCHEMAS.values() if "properties" in json.dumps(s)]
    out: list[Schema] = []
    for i in range(n):
        base = objects[i % len(objects)]
        out.append(base if i < len(objects) else _rename(base, f"_{i // len(objects)}"))
    return out
