#!/usr/bin/env python3
"""Compacts Apple's configuration-profile schemas into what the policy loader checks.

Reads apple/device-management's mdm/profiles/*.yaml (a copy sits in ../shared/apple-schemas)
and writes src/policy/apple_payloads.json: for every PayloadType, its keys with type, presence,
allowed values (rangelist), bounds (range) and nested keys; no titles or descriptions. It also
puts the list of payload types into policies/policy.schema.json ($defs.payloadType.enum) so
editors can complete them.

    python3 tools/apple-payload-keys.py [SCHEMA_DIR]     # default ../shared/apple-schemas

Format of the output (read by src/policy/apple_schema.rs):
    {"source": str, "top": N, "common": N, "payloads": {PayloadType: N},
     "shapes": [{KeyName: {"t": type, "r": 1?, "v": [allowed]?, "min": x?, "max": x?,
                           "s": N?}}]}
A shape is a list of keys; N is an index into "shapes". A dictionary key's "s" is the shape of
its contents; an array key's "s" is a shape with one key (named "") for its items. The key
"ANY" stands for every key a shape does not name. Shapes are shared when equal, and refer to
each other by index because a few schemas are recursive (home screen folders).

When several files describe one PayloadType (com.apple.MCX), their keys are merged; where they
disagree, the file named after the payload type wins (com.apple.extensiblesso.yaml over its
Kerberos variant).
"""

import json
import os
import re
import sys

import yaml

TYPES = {
    "<string>": "string",
    "<integer>": "integer",
    "<real>": "real",
    "<boolean>": "boolean",
    "<data>": "data",
    "<date>": "date",
    "<array>": "array",
    "<dictionary>": "dictionary",
    "<any>": "any",
}
# Files that describe parts every payload shares, not payload types of their own.
SPECIAL = {"TopLevel", "CommonPayloadKeys"}


class Shapes:
    def __init__(self):
        self.shapes = []  # index -> dict (or None while being built)
        self.by_content = {}  # canonical JSON -> index
        self.by_identity = {}  # (id(list), is_array) -> index
        self.building = {}  # (id(list), is_array) -> reserved index or None
        self.alive = []  # every list seen: keeps its id() from being reused

    def add(self, subkeys, is_array, where):
        self.alive.append(subkeys)
        ident = (id(subkeys), is_array)
        if ident in self.by_identity:
            return self.by_identity[ident]
        if ident in self.building:
            # A recursive schema: reserve the index now, fill it when the outer call finishes.
            if self.building[ident] is None:
                self.building[ident] = len(self.shapes)
                self.shapes.append(None)
            return self.building[ident]
        self.building[ident] = None
        if is_array:
            if len(subkeys) != 1:
                sys.exit(f"{where}: an array needs exactly one subkey, found {len(subkeys)}")
            shape = {"": self.key(subkeys[0], where)}
        else:
            shape = {}
            for item in subkeys:
                name = item["key"]
                if name in shape:
                    sys.exit(f"{where}: key {name} twice")
                shape[name] = self.key(item, f"{where}.{name}")
        reserved = self.building.pop(ident)
        if reserved is not None:
            self.shapes[reserved] = shape
            index = reserved
        else:
            canonical = json.dumps(shape, sort_keys=True)
            index = self.by_content.get(canonical)
            if index is None:
                index = len(self.shapes)
                self.shapes.append(shape)
                self.by_content[canonical] = index
        self.by_identity[ident] = index
        return index

    def key(self, item, where):
        kind = TYPES.get(item.get("type"))
        if kind is None:
            sys.exit(f"{where}: unknown type {item.get('type')!r}")
        spec = {"t": kind}
        if item.get("presence") == "required":
            spec["r"] = 1
        if "rangelist" in item and kind in ("string", "integer", "real"):
            spec["v"] = item["rangelist"]
        bounds = item.get("range") or {}
        if kind in ("integer", "real"):
            for edge in ("min", "max"):
                if isinstance(bounds.get(edge), (int, float)) and not isinstance(
                    bounds.get(edge), bool
                ):
                    spec[edge] = bounds[edge]
        if kind in ("array", "dictionary") and item.get("subkeys"):
            spec["s"] = self.add(item["subkeys"], kind == "array", where)
        return spec


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join("..", "shared", "apple-schemas")
    profiles = os.path.join(root, "mdm", "profiles")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = "apple/device-management mdm/profiles (MIT licence)"
    source_md = os.path.join(root, "SOURCE.md")
    if os.path.exists(source_md):
        with open(source_md, encoding="utf-8") as f:
            found = re.search(r"commit ([0-9a-f]{40})(?: \(([^)]*)\))?", f.read())
        if found:
            source += f", commit {found.group(1)}"
            if found.group(2):
                source += f" ({found.group(2)})"

    files = {}
    for name in sorted(os.listdir(profiles)):
        if name.endswith(".yaml"):
            with open(os.path.join(profiles, name), encoding="utf-8") as f:
                files[name] = yaml.safe_load(f)

    # Merge the key lists per payload type; the file named after the type goes first (it wins).
    merged = {}
    for name, doc in files.items():
        payload_type = doc["payload"]["payloadtype"]
        keys = doc.get("payloadkeys") or []
        entry = merged.setdefault(payload_type, [])
        if name == payload_type + ".yaml":
            entry.insert(0, (name, keys))
        else:
            entry.append((name, keys))

    shapes = Shapes()
    out = {"source": source, "payloads": {}}
    for payload_type in sorted(merged):
        combined, seen = [], set()
        for name, keys in merged[payload_type]:
            for item in keys:
                if item["key"] not in seen:
                    seen.add(item["key"])
                    combined.append(item)
        index = shapes.add(combined, False, payload_type)
        if payload_type == "TopLevel":
            out["top"] = index
        elif payload_type == "CommonPayloadKeys":
            out["common"] = index
        else:
            out["payloads"][payload_type] = index
    out["shapes"] = shapes.shapes

    target = os.path.join(here, "src", "policy", "apple_payloads.json")
    with open(target, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"), sort_keys=False)
        f.write("\n")
    print(f"{target}: {len(out['payloads'])} payload types, {len(shapes.shapes)} shapes, "
          f"{os.path.getsize(target)} bytes")

    schema_path = os.path.join(here, "policies", "policy.schema.json")
    if os.path.exists(schema_path):
        with open(schema_path, encoding="utf-8") as f:
            schema = json.load(f)
        # com.apple.mdm belongs to the enrollment profile only: the loader refuses it.
        schema.setdefault("$defs", {}).setdefault("payloadType", {})["enum"] = sorted(
            t for t in out["payloads"] if t != "com.apple.mdm"
        )
        with open(schema_path, "w", encoding="utf-8") as f:
            json.dump(schema, f, indent=2, ensure_ascii=False)
            f.write("\n")
        print(f"{schema_path}: payload types updated")


if __name__ == "__main__":
    main()
