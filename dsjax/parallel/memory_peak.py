"""The buffers live at the peak of a compiled program's HBM use, read from XLA's own dumps.

A compile with `xla_dump_to` (and `xla_dump_hlo_as_text`) makes XLA write, next to the optimised
module, its buffer assignment (`*buffer-assignment.txt`: every logical value's allocation, offset and
size), the values' defining instructions (`*buffer-assignment-values.txt`) and the live range of every
value on the final schedule (`*live-range.txt`). The temporaries' heap is one "preallocated-temp"
allocation in the default memory space (color 0, HBM); a value occupies [offset, offset + size) of it
from the start to the end of its live range. The peak is the schedule step where the bytes of the
distinct (offset, size) slots in use are largest, and the buffers live there are what to shrink.
Sizes are as XLA allocates them (TPU tiling padding included), so they add up to memory_analysis's
temporaries, not to the logical array sizes.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re

_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*):$")
_VALUE = re.compile(r"^ value: <(\d+) ([^ >]+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")
_RANGE = re.compile(r"^\s+(\S+?\{[\d,]*\}):(\d+)-(\d+)$")
# Instructions that only name a buffer another instruction made: not the "op that made it".
_PASS_THROUGH = {"parameter", "get-tuple-element", "tuple", "while", "conditional", "call", "bitcast",
                 "copy-done", "opt-barrier"}


@dataclasses.dataclass
class LiveBuffer:
    bytes: int
    shape: str  # e.g. "bf16[8,4096,7168]"
    op: str  # the HLO instruction that defines the value, e.g. "fusion.123"
    opcode: str
    op_name: str  # metadata op_name, e.g. "jit(train_step)/jvp()/while/body/.../dot_general"
    source: str  # "path/to/file.py:123" or ""


@dataclasses.dataclass
class PeakReport:
    peak_bytes: int  # distinct temporaries live at the peak step
    temp_bytes: int  # size of the temporaries' heap (fragmentation included)
    step: int
    buffers: list[LiveBuffer]  # largest first


def find_dump(dump_dir: str, module: str = "") -> dict[str, str]:
    """Paths of the after-optimisation dump files of the (largest) module in dump_dir."""
    cands = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*after_optimizations-buffer-assignment.txt")),
                   key=os.path.getsize)
    if not cands:
        raise FileNotFoundError(f"{dump_dir}: no *after_optimizations-buffer-assignment.txt (compile with xla_dump_to)")
    base = cands[-1].removesuffix("-buffer-assignment.txt")
    return {"assignment": base + "-buffer-assignment.txt", "values": base + "-buffer-assignment-values.txt",
            "live_range": base + "-live-range.txt", "hlo": base + ".txt"}


def _source_table(hlo_text: str) -> dict[int, str]:
    """stack_frame_id -> "file:line" of that frame, from the module's FileNames/FileLocations/StackFrames."""
    sections: dict[str, dict[int, str]] = {}
    cur = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            cur = sections.setdefault(line, {})
            continue
        if not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
            cur = None if not line.strip() else cur
            if line.startswith(("%", "ENTRY")):
                break
            continue
        if cur is not None:
            k, _, v = line.strip().partition(" ")
            if k.isdigit():
                cur[int(k)] = v
    files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
    locs = {}
    for k, v in sections.get("FileLocations", {}).items():
        m = re.search(r"file_name_id=(\d+).*?line=(\d+)", v)
        if m:
            locs[k] = f"{_short(files.get(int(m.group(1)), '?'))}:{m.group(2)}"
    out = {}
    for k, v in sections.get("StackFrames", {}).items():
        m = re.search(r"file_location_id=(\d+)", v)
        if m and int(m.group(1)) in locs:
            out[k] = locs[int(m.group(1))]
    return out


def _short(path: str) -> str:
    i = path.rfind("/dsjax/")
    return path[i + 1:] if i >= 0 else os.path.basename(path)


def _values(values_text: str, sources: dict[int, str]) -> dict[int, tuple[str, str, str]]:
    """value id -> (opcode, op_name, source) of its defining instruction."""
    out, vid = {}, None
    for line in values_text.splitlines():
        if line.startswith("<"):
            vid = int(line[1:].split(" ", 1)[0])
        elif line.startswith(" from instruction:") and vid is not None:
            m = re.search(r"=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(", line)
            opcode = m.group(1) if m else "?"
            op_name = re.search(r'op_name="([^"]*)"', line)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            src = re.search(r'source_file="([^"]*)" source_line=(\d+)', line)
            where = f"{_short(src.group(1))}:{src.group(2)}" if src else sources.get(int(frame.group(1)), "") if frame else ""
            out[vid] = (opcode, op_name.group(1) if op_name else "", where)
    return out


def _loop_origins(hlo_text: str, sources: dict[int, str]):
    """name{i} of a while body's parameter or a while's result -> (opcode, op_name, source) of the
    instruction the body's ROOT tuple puts at index i (e.g. the dynamic-update-slice that stacks a
    scanned layer's saved activations)."""
    from dsjax.parallel.hlo_stats import parse_module

    try:
        comps, _ = parse_module(hlo_text)
    except ValueError:
        return lambda name: None
    instrs = {i.name: i for c in comps.values() for i in c}
    param_of = {i.name: cname for cname, c in comps.items() for i in c if i.opcode == "parameter"}
    body_of = {i.name: re.search(r"body=%?([\w.\-]+)", i.attrs).group(1) for i in instrs.values() if i.opcode == "while"}

    def describe(ins):
        op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
        frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
        return (ins.opcode, op_name.group(1) if op_name else "", sources.get(int(frame.group(1)), "") if frame else "")

    while_of_body = {b: w for w, b in body_of.items()}
    root_of = {cname: next((i for i in c if i.root), c[-1]) for cname, c in comps.items() if c}

    def origin(name: str):
        m = re.fullmatch(r"(.+)\{(\d+)\}", name)
        if not m:
            return None
        ins, idx = instrs.get(m.group(1)), int(m.group(2))
        for _ in range(32):  # follow the tuple element to the op that computes it
            if ins is None:
                return None
            if ins.opcode == "tuple" and idx < len(ins.operands):
                ins, idx = instrs.get(ins.operands[idx]), None
            elif ins.opcode == "get-tuple-element":
                ins, idx = instrs.get(ins.operands[0]), int(re.search(r"index=(\d+)", ins.attrs).group(1))
            elif ins.opcode == "while" and idx is not None:
                ins = root_of.get(body_of[ins.name])
            elif ins.opcode == "parameter" and idx is not None and param_of.get(ins.name) in while_of_body:
                ins = instrs.get(instrs[while_of_body[param_of[ins.name]]].operands[0])  # the loop's init
            elif ins.opcode in ("copy", "bitcast", "opt-barrier") and ins.operands:
                ins = instrs.get(ins.operands[0])
            else:
                break
        return describe(ins) if ins is not None and ins.opcode not in _PASS_THROUGH else None

    return origin


def peak_buffers(files: dict[str, str], top: int = 15) -> PeakReport:
    """The largest temporaries live at the peak, from a dump found by find_dump."""
    read = lambda k: open(files[k]).read() if os.path.exists(files[k]) else ""  # noqa: E731
    # Temporaries in HBM: preallocated-temp allocations of the default memory space (no "color N").
    slots: dict[str, tuple[int, int, int, str]] = {}  # value name -> (id, offset, size, shape)
    temp_bytes, in_temp = 0, False
    for line in read("assignment").splitlines():
        m = _ALLOC.match(line)
        if m:
            in_temp = "preallocated-temp" in m.group(3) and "color" not in m.group(3)
            temp_bytes += int(m.group(2)) if in_temp else 0
            continue
        if in_temp:
            v = _VALUE.match(line)
            if v:
                name = v.group(2) if "{" in v.group(2) else v.group(2) + "{}"
                shape = re.sub(r"\{[^{}]*(\{[^{}]*\}[^{}]*)*\}", "", v.group(5)).strip()
                slots[name] = (int(v.group(1)), int(v.group(4)), int(v.group(3)), shape)
    ranges = {}
    for line in read("live_range").splitlines():
        m = _RANGE.match(line)
        if m and m.group(1) in slots:
            ranges[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    # Sweep the schedule: bytes in use = sum over distinct (offset, size) slots with a live value.
    events = []
    for name, (s, e) in ranges.items():
        _, off, size, _ = slots[name]
        events += [(s, 0, (off, size)), (e + 1, -1, (off, size))]
    events.sort(key=lambda x: (x[0], x[1]))
    live: dict[tuple[int, int], int] = {}
    cur = best = 0
    best_t = 0
    for t, kind, key in events:
        if kind == 0:
            live[key] = live.get(key, 0) + 1
            cur += key[1] if live[key] == 1 else 0
        else:
            live[key] -= 1
            cur -= key[1] if live[key] == 0 else 0
        if cur > best:
            best, best_t = cur, t
    hlo = read("hlo")
    sources = _source_table(hlo)
    meta = _values(hlo and read("values"), sources)
    origin = _loop_origins(hlo, sources)
    # The values live at the peak, one per slot: prefer the instruction that computed it.
    at_peak: dict[tuple[int, int], LiveBuffer] = {}
    for name, (s, e) in ranges.items():
        if not s <= best_t <= e:
            continue
        vid, off, size, shape = slots[name]
        opcode, op_name, where = meta.get(vid, ("?", "", ""))
        if opcode in _PASS_THROUGH or opcode == "?":  # a loop-carried value: who writes it each trip
            opcode, op_name, where = origin(name) or (opcode, op_name, where)
        buf = LiveBuffer(size, shape, name.removesuffix("{}"), opcode, op_name, where)
        old = at_peak.get((off, size))
        if old is None or (old.opcode in _PASS_THROUGH and opcode not in _PASS_THROUGH):
            at_peak[(off, size)] = buf
    bufs = sorted(at_peak.values(), key=lambda b: -b.bytes)[:top]
    return PeakReport(best, temp_bytes, best_t, bufs)
