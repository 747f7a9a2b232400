"""What an optimised HLO module moves per chip: HBM bytes and collective bytes, with loop trip counts.

XLA's `cost_analysis()` counts the body of a while loop (a scanned layer stack) once. This reader
walks the scheduled, optimised module text (`compiled.as_text()`), gives every computation the
number of times it runs (a while body runs trip-count times its caller; trip counts come from the
while's `known_trip_count` backend config when present, else from its condition `i < N` with `i`
starting at a constant), and sums per chip:

- HBM traffic: for every top-level instruction (a fusion, a custom call, a copy, a dot, ...) the
  bytes of its operands plus its result, skipping arrays placed in on-chip memory (`S(1)` layouts
  on TPU) and instructions that move nothing (parameters, tuples, bitcasts, control flow).
- collective bytes: for every all-gather, reduce-scatter, all-reduce, all-to-all,
  ragged-all-to-all and collective-permute (synchronous, `-start` of an async pair, or inside a
  fusion / async wrapper) the bytes one chip puts on the wire for a ring algorithm over its replica
  group of n chips: all-gather (n-1) x input shard; reduce-scatter and all-to-all (n-1)/n x input;
  all-reduce 2 (n-1)/n x input; ragged-all-to-all (n-1)/n x its input buffer (an upper bound: the
  real rows sent depend on the routing); collective-permute its input.
A group whose members sit in different slices (`slice_of` maps a logical device id to its slice)
is counted as DCN traffic, otherwise as ICI traffic. TPU XLA lowers the cross-slice part of a
collective to host-transfer `send`s of the megascale runtime (`_xla_megascale_transfer_type`): each
send's operand counts as DCN bytes, under the kind of the collective it implements.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "token": 0,
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute")
# Instructions that read or write no HBM of their own.
NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
              "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
              "copy-done", "async-done", "iota"} | {c + "-done" for c in COLLECTIVES}

_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})?")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


def array_bytes(type_str: str, *, hbm_only: bool = False) -> float:
    """Bytes of every array in an HLO type (a tuple counts each element). Logical sizes: TPU tiling
    padding is not counted. hbm_only drops arrays in a non-default memory space (S(n), n > 0)."""
    total = 0.0
    for dtype, dims, layout in _ARRAY.findall(type_str):
        if dtype not in DTYPE_BYTES:
            continue
        if hbm_only and layout and re.search(r"S\([1-9]\d*\)", layout):
            continue
        total += math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES[dtype]
    return total


@dataclasses.dataclass
class Instr:
    name: str
    type: str  # the result type, e.g. "f32[256,256]{1,0:T(8,128)}" or a tuple
    opcode: str
    operands: list[str]
    attrs: str  # everything after the operand list
    const: int | None = None  # the literal of an integer scalar constant
    root: bool = False


def _balanced(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i]."""
    depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
    closing = set(pairs.values())
    for j in range(i, len(s)):
        c = s[j]
        if c in pairs:
            depth += 1
        elif c in closing:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        typ, rest = rest[:end], rest[end:].lstrip()
    else:
        typ, _, rest = rest.partition(" ")
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    end = _balanced(rest, om.end() - 1)
    inner = rest[om.end():end - 1]
    const = int(inner) if om.group(1) == "constant" and re.fullmatch(r"-?\d+", inner) else None
    return Instr(m.group(2), typ, om.group(1), re.findall(r"%([\w.\-]+)", inner), rest[end:], const, bool(m.group(1)))


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation name: its instructions} and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, cur = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            cur = comps.setdefault(h.group(2), [])
            if h.group(1):
                entry = h.group(2)
            continue
        if line.strip() == "}":
            cur = None
            continue
        if cur is not None:
            ins = parse_instr(line)
            if ins is not None:
                cur.append(ins)
    if not entry:
        raise ValueError("HLO text has no ENTRY computation")
    return comps, entry


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The replica groups of a collective: explicit `{{0,1},{2,3}}` or iota `[2,4]<=[4,2]T(1,0)`.
    Absent or empty groups mean one group of all devices."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(int(x) for x in m.group(2).split(","))).reshape(
            [int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", attrs)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        if groups and all(groups):
            return groups
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
    if m:  # collective-permute: each pair is its own two-chip "group"
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", m.group(0))]
    return [list(range(num_devices))]


def wire_bytes(opcode: str, in_bytes: float, n: int) -> float:
    """Bytes one chip sends for a ring collective over n chips whose per-chip input is in_bytes."""
    if n <= 1:
        return 0.0
    return {
        "all-gather": (n - 1) * in_bytes,
        "reduce-scatter": (n - 1) / n * in_bytes,
        "all-reduce": 2 * (n - 1) / n * in_bytes,
        "all-to-all": (n - 1) / n * in_bytes,
        "ragged-all-to-all": (n - 1) / n * in_bytes,
        "collective-permute": in_bytes,
    }[opcode]


@dataclasses.dataclass
class HloStats:
    hbm_bytes: float = 0.0  # per chip, loops unrolled
    ici_bytes: float = 0.0  # per chip, on the wire within a slice
    dcn_bytes: float = 0.0  # per chip, on the wire between slices
    collectives: dict = dataclasses.field(default_factory=dict)  # kind -> [count, wire bytes]
    trip_counts: dict = dataclasses.field(default_factory=dict)  # while name -> trips
    unknown_trips: list = dataclasses.field(default_factory=list)  # whiles counted once
    # (kind, operand type, group size, source op_name) -> [runs per step, wire bytes per step]: where the
    # collective bytes come from (sites()).
    by_site: dict = dataclasses.field(default_factory=dict)

    def sites(self, top: int) -> list[tuple[str, str, int, str, float, float]]:
        """The `top` collective sites by wire bytes per step: (kind, operand type, group size,
        op_name, runs per step, bytes per step)."""
        rows = [(*k, v[0], v[1]) for k, v in self.by_site.items()]
        return sorted(rows, key=lambda r: -r[5])[:top]


def _trip_count(w: Instr, comps, types, instrs) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', w.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(_attr(w.attrs, "condition") or "", [])
    root = next((i for i in cond if i.root), cond[-1]) if cond else None
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    local = {i.name: i for i in cond}
    a, b = (local.get(o) for o in root.operands)
    direction = _attr(root.attrs, "direction")
    if a is None or b is None:
        return None
    if a.opcode == "constant":  # N > i is i < N
        a, b = b, a
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    if a.opcode != "get-tuple-element" or b.opcode != "constant" or direction not in ("LT", "LE", "NE"):
        return None
    if b.const is None:
        return None
    bound = b.const
    index = int(_attr(a.attrs, "index"))
    start = _init_value(instrs.get(w.operands[0]), index, instrs)
    if start is None:
        return None
    return max(0, bound - start + (1 if direction == "LE" else 0))


def _init_value(tup: Instr | None, index: int, instrs) -> int | None:
    """The constant a while's loop counter starts from (tuple element, through copies)."""
    if tup is None or tup.opcode != "tuple" or index >= len(tup.operands):
        return None
    ins = instrs.get(tup.operands[index])
    while ins is not None and ins.opcode == "copy":
        ins = instrs.get(ins.operands[0])
    if ins is None or ins.opcode != "constant":
        return None
    return ins.const


def _moved(s: HloStats) -> float:
    return s.hbm_bytes + s.ici_bytes + s.dcn_bytes


def _restore(stats: HloStats, saved: HloStats):
    for f in dataclasses.fields(HloStats):
        setattr(stats, f.name, copy.deepcopy(getattr(saved, f.name)))


def _hbm_bytes(ins: Instr, comps, types) -> float:
    """HBM bytes one execution of a top-level instruction reads and writes. In-place and sliced
    accesses count what they touch: a dynamic-slice reads its result's bytes of its operand, a
    dynamic-update-slice writes its update into a buffer it does not otherwise read (the stacked
    per-layer arrays of a scan), also when they are the parameters / root of a fusion."""
    size = lambda name: array_bytes(types.get(name, ""), hbm_only=True)  # noqa: E731
    if ins.opcode == "dynamic-slice":
        return 2 * array_bytes(ins.type, hbm_only=True)
    if ins.opcode == "dynamic-update-slice":
        return 2 * size(ins.operands[1])
    body = comps.get(_attr(ins.attrs, "calls") or "") if ins.opcode == "fusion" else None
    if not body:
        return array_bytes(ins.type, hbm_only=True) + sum(size(o) for o in ins.operands)
    users: dict[str, list[tuple[Instr, int]]] = {}
    for i in body:
        for k, o in enumerate(i.operands):
            users.setdefault(o, []).append((i, k))
    read = 0.0
    for i in body:
        if i.opcode != "parameter":
            continue
        use = users.get(i.name, [])
        if use and all(u.opcode == "dynamic-slice" and k == 0 for u, k in use):
            read += sum(array_bytes(u.type) for u, _ in use)
        elif use and all(u.opcode == "dynamic-update-slice" and k == 0 for u, k in use):
            pass  # updated in place
        else:
            read += array_bytes(i.type, hbm_only=True)
    local = {i.name: i for i in body}
    root = next((i for i in body if i.root), body[-1])
    outs = [local.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    written = 0.0
    for o in outs:
        if o is None:
            continue
        written += array_bytes(types.get(o.operands[1], "")) if o.opcode == "dynamic-update-slice" \
            else array_bytes(o.type, hbm_only=True)  # (the update is computed in the fusion: write only)
    return read + written


def hlo_stats(text: str, *, num_devices: int, slice_of: list[int] | None = None) -> HloStats:
    """Per-chip HBM and collective bytes of one optimised HLO module (see the module docstring)."""
    comps, entry = parse_module(text)
    instrs = {i.name: i for c in comps.values() for i in c}
    types = {i.name: i.type for i in instrs.values()}
    stats = HloStats()

    def comm(ins: Instr, mult: float, opcode: str):
        in_bytes = sum(array_bytes(types.get(o, "")) for o in ins.operands[:1])
        groups = replica_groups(ins.attrs, num_devices)
        n = len(groups[0]) if opcode != "collective-permute" else 2
        wb = wire_bytes(opcode, in_bytes, n) * mult
        crosses = slice_of is not None and any(len({slice_of[d] for d in g if d < len(slice_of)}) > 1
                                               for g in groups)
        name = re.search(r'op_name="([^"]*)"', ins.attrs)
        tally(ins, mult, opcode, n, wb, crosses, name.group(1) if name else "")

    def megascale_send(ins: Instr, mult: float):
        """A collective across slices, which TPU XLA lowers to host-transfer sends over DCN (the megascale
        runtime): the bytes this chip sends, under the kind of the collective it implements."""
        wb = sum(array_bytes(types.get(o, "")) for o in ins.operands[:1]) * mult
        kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.attrs)
        src = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', ins.attrs)
        tally(ins, mult, kind.group(1).lower().replace("_", "-") if kind else "send", 2, wb, True,
              src.group(1) if src else "")

    def tally(ins: Instr, mult: float, opcode: str, n: int, wb: float, dcn: bool, source: str):
        """Add wb wire bytes of one collective (run mult times) to the totals, its kind and its site."""
        if dcn:
            stats.dcn_bytes += wb
        else:
            stats.ici_bytes += wb
        kind = opcode + (" (DCN)" if dcn else "")
        operand = re.sub(r"\{[^{}]*(\{[^{}]*\}[^{}]*)*\}", "", types.get(ins.operands[0], "") if ins.operands else "")
        for tot in (stats.collectives.setdefault(kind, [0, 0.0]),
                    stats.by_site.setdefault((kind, operand, n, source), [0, 0.0])):
            tot[0] += mult
            tot[1] += wb

    def scan_for_collectives(comp: str, mult: float, seen=()):
        for ins in comps.get(comp, []):
            op = ins.opcode.removesuffix("-start")
            if op in COLLECTIVES:
                comm(ins, mult, op)
            for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", ins.attrs):
                if callee not in seen and ins.opcode != "all-reduce" and ins.opcode != "reduce-scatter":
                    scan_for_collectives(callee, mult, seen + (comp,))

    def walk(comp: str, mult: float):
        for ins in comps.get(comp, []):
            op = ins.opcode.removesuffix("-start")
            if ins.opcode == "while":
                trips = _trip_count(ins, comps, types, instrs)
                if trips is None:
                    stats.unknown_trips.append(ins.name)
                    trips = 1
                stats.trip_counts[ins.name] = trips
                walk(_attr(ins.attrs, "body"), mult * trips)
                walk(_attr(ins.attrs, "condition"), mult * (trips + 1))
                continue
            if ins.opcode == "conditional":  # one branch runs: count the costliest
                m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                names = re.findall(r"%?([\w.\-]+)", m.group(1)) if m else [
                    _attr(ins.attrs, "true_computation"), _attr(ins.attrs, "false_computation")]
                before, best = copy.deepcopy(stats), None
                for b in filter(None, names):
                    _restore(stats, before)
                    walk(b, mult)
                    if best is None or _moved(stats) > _moved(best):
                        best = copy.deepcopy(stats)
                _restore(stats, best or before)
                continue
            if ins.opcode == "call":
                walk(_attr(ins.attrs, "to_apply"), mult)
                continue
            if op in COLLECTIVES:
                comm(ins, mult, op)
                continue
            if ins.opcode == "send" and "xla_megascale" in ins.attrs:
                megascale_send(ins, mult)
            if ins.opcode in ("fusion", "async-start"):
                scan_for_collectives(_attr(ins.attrs, "calls") or "", mult)
            if ins.opcode in NO_TRAFFIC:
                continue
            stats.hbm_bytes += mult * _hbm_bytes(ins, comps, types)

    walk(entry, 1.0)
    return stats
