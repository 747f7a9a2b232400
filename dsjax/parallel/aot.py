"""Ahead-of-time compilation of the real training step for a TPU topology, on any machine.

`compile_report(tcfg, topology)` builds the topology's devices with libtpu's compiler
(`jax.experimental.topologies`), lays the mesh over them, describes the train state and batch as
sharded `jax.ShapeDtypeStruct`s (nothing is materialised: 671B parameters never exist here), lowers
and compiles `dsjax.train.step.make_train_step`, and reports per-chip memory from XLA's
`memory_analysis()` (reliable), the largest buffers live at the peak (dsjax.parallel.memory_peak,
from XLA's buffer-assignment dump), FLOPs per step computed analytically (XLA's cost analysis counts
a scanned layer once), and a roofline step time from the optimised program's HBM and collective
bytes (dsjax.parallel.hlo_stats, dsjax.parallel.step_time). `max_batch` searches the batch size.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp

from dsjax.config import ConfigError, ModelConfig

GB = 1e9
GiB = 2**30


def human_bytes(x: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float  # what a program may use per chip: the limit XLA's compiler applies (below)
    peak_flops: float  # bf16 dense, per chip
    cores_per_chip: int  # how the v5p-N name counts
    hbm_bw: float  # bytes/s per chip
    ici_bw: float  # bytes/s one chip sends into the ICI (half the published bidirectional figure)
    dcn_bw: float  # bytes/s per chip between slices


# hbm_bytes: the largest program libtpu 0.0.42.1 compiles for one chip, found by bisecting the size of
# a donated f32 array (`x * 2 + 1`, arguments + code = total) until XLA refuses with "Ran out of memory
# on HBM ... exceeds available HBM (95.74G)" (v5p) / "(31.25G)" (v6e): 102,803,437,056 bytes fit on
# v5p and 4 KiB more do not (95.74 GiB of the 95 GiB-marketed, 96 GiB physical HBM); 33,550,222,848
# bytes on v6e (31.25 GiB of its 32 GB). The same check refuses MaxText's 8 x 4096
# per-chip batch with "116 GiB > 95.73 GiB available".
# Bandwidths: Cloud TPU system-architecture pages (v5p: 2,765 GB/s HBM, 1,200 GB/s bidirectional ICI
# per chip, 50 Gbps DCN per chip; v6e: 1,638 GB/s HBM, 800 GB/s bidirectional ICI per chip). v6e's
# DCN per chip is not in that table: 100 Gbps assumed (4 x 200 Gbps NICs per 8-chip host).
CHIPS = {
    "v5p": Chip("TPU v5p", 102_803_437_056, 459e12, 2, 2765e9, 600e9, 50e9 / 8),
    "v6e": Chip("TPU v6e", 33_550_222_848, 918e12, 1, 1638e9, 400e9, 100e9 / 8),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    kind: str  # v5p | v6e
    shape: tuple[int, ...]  # of one slice
    slices: int = 1  # slices joined over DCN (mesh.dcn)

    @property
    def name(self) -> str:  # what get_topology_desc takes
        return f"{self.kind}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.slices

    @property
    def chip(self) -> Chip:
        return CHIPS[self.kind]


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The standard slice shape for a power-of-two chip count: 3D for v5p (2x2x1, 2x2x2, 2x2x4,
    2x4x4, 4x4x4, 4x4x8, 4x8x8, ...), 2D for v6e (1x1, 2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16)."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"topology: {chips} chips is not a power of two; give the shape, e.g. v5p:4x4x8")
    if dims == 3:
        if chips < 4:
            return {1: (1, 1, 1), 2: (1, 2, 1)}[chips]
        shape = [2, 2, 1]
    else:
        shape = [1, 1]
    while math.prod(shape) < chips:
        if dims == 3 and shape[2] == 1:
            shape[2] = 2
            continue
        lo = min(shape)
        i = max(j for j, s in enumerate(shape) if s == lo)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(s: str) -> Topology:
    """`v5p-512` (TensorCores: 256 chips), `v6e-256` (chips), or raw `v5p:4x8x8` / `v6e:16x16`."""
    s = s.strip().lower()
    m = re.fullmatch(r"(v5p|v6e):(\d+(?:x\d+)+)", s)
    if m:
        shape = tuple(int(x) for x in m.group(2).split("x"))
        want = 3 if m.group(1) == "v5p" else 2
        if len(shape) != want:
            raise ConfigError(f"topology {s!r}: {m.group(1)} shapes have {want} dimensions")
        return Topology(m.group(1), shape)
    m = re.fullmatch(r"(v5p|v6e)-(\d+)", s)
    if not m:
        raise ConfigError(f"topology {s!r}: expected v5p-N (N TensorCores), v6e-N (N chips) or a shape like v5p:4x8x8")
    kind, n = m.group(1), int(m.group(2))
    per = CHIPS[kind].cores_per_chip
    if n % per:
        raise ConfigError(f"topology {s!r}: {kind}-N counts TensorCores, {per} per chip; {n} is not a multiple")
    return Topology(kind, _torus_shape(n // per, 3 if kind == "v5p" else 2))


def topology_devices(topo: Topology):
    # Compiling needs no TPU: let several processes on this host load libtpu (no device lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        kw = {"num_slices": topo.slices} if topo.slices > 1 else {}
        return topologies.get_topology_desc(topology_name=topo.name, platform="tpu", **kw).devices
    except Exception as e:  # libtpu missing or the shape unknown to it
        raise ConfigError(f"topology {topo.name}: cannot build the TPU topology ({type(e).__name__}: {e}); "
                          f"AOT compilation needs libtpu (pip install 'jax[tpu]')") from None


# ----------------------------------------------------------------------------- analytic model

def step_flops(cfg: ModelConfig, batch: int, seq: int, with_mtp: bool = True) -> dict:
    """Training FLOPs per step: 6 x (active matmul parameters) x tokens + attention scores.

    Matmul parameters exclude the embedding lookup and include the head (again for each MTP depth).
    Attention (QK^T and PV) is causal: per token per layer h*(qk_head_dim+v_head_dim)*seq multiply-adds
    on average, x 2 FLOPs x 3 (forward + backward)."""
    from dsjax.model.params import count_params

    c = count_params(cfg)
    emb = cfg.vocab_size * cfg.hidden_size
    active = c["active"] - emb
    layers = cfg.num_hidden_layers
    if with_mtp and cfg.num_nextn_predict_layers:
        active += c["mtp_active"] + cfg.num_nextn_predict_layers * emb  # the shared head runs again
        layers += cfg.num_nextn_predict_layers
    tokens = batch * seq
    dense = 6 * active * tokens
    attn = 6 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2 * tokens
    return {"active_params": active, "tokens": tokens, "matmul": dense, "attention": attn, "total": dense + attn}


def state_bytes(abstract_state, shardings) -> float:
    """Bytes per device of a sharded abstract pytree."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
        shard = s.shard_shape(a.shape)
        total += math.prod(shard) * jnp.dtype(a.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- the step

def training_step(model_cfg: ModelConfig, tcfg, mesh=None):
    """(init_state, train_step) of the trainer (dsjax.train.step) run under mesh."""
    from dsjax.train.step import init_state, make_train_step

    return (lambda params: init_state(params, tcfg)), make_train_step(model_cfg, tcfg, mesh)


@dataclasses.dataclass
class Report:
    topology: Topology
    mesh: dict
    batch: int
    seq: int
    args_bytes: float = 0.0
    temp_bytes: float = 0.0
    out_bytes: float = 0.0
    alias_bytes: float = 0.0
    code_bytes: float = 0.0
    host_temp_bytes: float = 0.0  # temporaries in host memory (remat_policy=offload_inputs), not in HBM
    state_bytes: float = 0.0
    flops: dict = dataclasses.field(default_factory=dict)
    compile_seconds: float = 0.0
    compiled: bool = False
    oom: str | None = None  # XLA's out-of-memory message when compilation itself refused
    hbm_limit: float | None = None  # judge against this many bytes instead of XLA's limit
    peak: object = None  # memory_peak.PeakReport, when asked for
    hlo: object = None  # hlo_stats.HloStats
    estimate: object = None  # step_time.StepEstimate
    collective_sites: int = 0  # how many of the largest collective sites text() lists

    @property
    def fits(self) -> bool:
        return self.oom is None and self.compiled and self.total_bytes <= self.hbm

    @property
    def total_bytes(self) -> float:
        if not self.compiled:
            return self.state_bytes
        return self.args_bytes + self.out_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def hbm(self) -> float:
        return self.hbm_limit or self.topology.chip.hbm_bytes

    def text(self) -> str:
        t, chip = self.topology, self.topology.chip
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "single device"
        f = self.flops
        slices = f" in {t.slices} slices over DCN" if t.slices > 1 else ""
        lines = [
            f"topology: {t.name} ({t.chips} chips of {chip.name}{slices}, {chip.hbm_bytes / GiB:.2f} GiB HBM "
            f"each usable, the limit XLA applies)",
            f"mesh: {mesh}",
            f"batch: {self.batch} x {self.seq} tokens = {self.batch * self.seq} per step "
            f"({self.batch * self.seq / t.chips:.0f} per chip)",
        ]
        if self.compiled:
            lines += [
                f"per-chip memory (XLA memory_analysis): arguments {self.args_bytes / GiB:.2f} GiB "
                f"(params + optimizer state + batch), temporaries {self.temp_bytes / GiB:.2f} GiB, "
                f"outputs not aliased {(self.out_bytes - self.alias_bytes) / GiB:.2f} GiB, code {self.code_bytes / GiB:.2f} GiB",
                f"per-chip total: {self.total_bytes / GiB:.2f} GiB of {self.hbm / GiB:.2f} GiB "
                f"({100 * self.total_bytes / self.hbm:.0f}%) -> {'FITS' if self.fits else 'DOES NOT FIT'}",
                f"compile time: {self.compile_seconds:.0f} s",
            ]
            if self.host_temp_bytes:
                lines.insert(-1, f"per-chip host memory (offloaded temporaries, not in HBM): "
                                 f"{self.host_temp_bytes / GiB:.2f} GiB")
        elif self.oom is not None:
            lines += [f"per-chip train state: {self.state_bytes / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.2f} GiB",
                      f"XLA refused to compile (after {self.compile_seconds:.0f} s): {self.oom}",
                      "-> DOES NOT FIT"]
        else:
            lines += [f"per-chip train state alone: {self.state_bytes / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.2f} GiB "
                      f"-> DOES NOT FIT (not compiled)"]
        if self.peak is not None:
            p = self.peak
            lines.append(f"largest live buffers at peak (temporaries live at schedule step {p.step}: "
                         f"{human_bytes(p.peak_bytes)} of a {human_bytes(p.temp_bytes)} heap; XLA buffer assignment):")
            for b in p.buffers:
                where = f" at {b.source}" if b.source else ""
                lines.append(f"  {human_bytes(b.bytes):>10}  {b.shape:<28} {b.op} ({b.opcode}){where}  {b.op_name[-110:]}")
        lines += [
            f"FLOPs per step (analytic): {f['total']:.4g} = 6 x {f['active_params'] / 1e9:.2f}B active matmul params "
            f"x {f['tokens']} tokens ({f['matmul']:.4g}) + causal attention ({f['attention']:.4g})",
            f"compute-bound step time at peak: {f['total'] / (t.chips * chip.peak_flops) * 1e3:.1f} ms "
            f"({t.chips} x {chip.peak_flops / 1e12:.0f} TFLOP/s bf16)",
        ]
        if self.hlo is not None:
            h = self.hlo
            kinds = ", ".join(f"{k} {human_bytes(v[1])}" for k, v in sorted(h.collectives.items(), key=lambda kv: -kv[1][1]))
            lines.append(f"per-chip traffic per step (optimised HLO, loops x trip counts): HBM {human_bytes(h.hbm_bytes)}, "
                         f"ICI {human_bytes(h.ici_bytes)}, DCN {human_bytes(h.dcn_bytes)} ({kinds or 'no collectives'})")
            if h.unknown_trips:
                lines.append(f"warning: {len(h.unknown_trips)} while loop(s) with an unknown trip count counted once")
            sites = h.sites(self.collective_sites)
            if sites:
                lines.append("largest collectives per step (wire bytes per chip, runs per step, operand, group size, source):")
                for kind, operand, n, name, runs, wb in sites:
                    lines.append(f"  {human_bytes(wb):>10}  {kind:<18} x{runs:<6g} {operand:<28} n={n:<4} {name[-100:]}")
        if self.estimate is not None:
            lines += self.estimate.lines()
        return "\n".join(lines)


def comparison_text(reports: dict) -> str:
    """Side by side, per chip: memory, each collective's bytes, HBM traffic and the estimated step of
    several compiles of one config ({name: Report}, e.g. {"bf16": ..., "fp8": ...}); the last column is
    the last report relative to the first."""
    names = list(reports)
    reps = [reports[n] for n in names]
    first = reps[0]

    def row(label, vals, show=human_bytes):
        cells = ["-" if v is None else show(v) for v in vals]
        a, b = vals[0], vals[-1]
        rel = f"{100 * (b - a) / a:+.1f}%" if a and b is not None else ""
        return f"  {label:<30}" + "".join(f"{c:>13}" for c in cells) + f"{rel:>10}"

    ms = lambda x: f"{x * 1e3:.1f} ms"
    ok = all(r.compiled for r in reps)
    lines = [f"per chip, {' vs '.join(names)} (same config, topology and batch; last column {names[-1]} vs {names[0]}):",
             f"  {'':<30}" + "".join(f"{n:>13}" for n in names) + f"{'change':>10}"]
    lines.append(row("arguments", [r.args_bytes if r.compiled else None for r in reps]))
    lines.append(row("temporaries", [r.temp_bytes if r.compiled else None for r in reps]))
    lines.append(row("total", [r.total_bytes if r.compiled else None for r in reps]))
    lines.append(f"  {'fits':<30}" + "".join(f"{'yes' if r.fits else 'no':>13}" for r in reps))
    if ok and all(r.hlo is not None for r in reps):
        kinds = sorted({k for r in reps for k in r.hlo.collectives}, key=lambda k: -first.hlo.collectives.get(k, [0, 0])[1])
        for k in kinds:
            lines.append(row(k, [r.hlo.collectives.get(k, [0, 0])[1] for r in reps]))
        lines.append(row("HBM traffic", [r.hlo.hbm_bytes for r in reps]))
    if ok and all(r.estimate is not None for r in reps):
        lines.append(row("est. step, overlapped", [r.estimate.overlapped_s for r in reps], ms))
        lines.append(row("est. step, not overlapped", [r.estimate.serial_s for r in reps], ms))
        lines.append("  (the step estimate's compute term is the analytic FLOPs at the chip's bf16 peak for every "
                     "column: it does not model FP8 units, nor the float32 dots of FP8 emulated where there are none)")
    return "\n".join(lines)


def _oom_message(e: Exception) -> str | None:
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
        return None
    return msg.strip().splitlines()[0][:400]


def compile_report(tcfg, topology: str | Topology, *, devices=None, buffers: int = 0,
                   hbm_limit: float | None = None, hlo_out: str | None = None) -> Report:
    """Lower and compile the training step of tcfg (a dsjax.train.config.TrainConfig) for the topology.
    buffers > 0 also lists that many of the largest buffers live at the memory peak (XLA dumps its
    buffer assignment to a temporary folder: slower, more disk). hbm_limit (bytes) judges "fits"
    against a smaller budget than XLA's limit, e.g. to keep headroom. hlo_out: a path to write the
    optimised HLO text to (for reading it again without recompiling)."""
    from dsjax.model.params import abstract_params
    from dsjax.parallel import hlo_stats, memory_peak, step_time
    from dsjax.parallel import mesh as pm

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if tcfg.mesh.dcn > 1 and topo.slices != tcfg.mesh.dcn:
        topo = dataclasses.replace(topo, slices=tcfg.mesh.dcn)  # mesh.dcn=N: N slices of the topology
    devices = topology_devices(topo) if devices is None else devices
    if tcfg.model.fp8 and tcfg.model.fp8_impl == "auto":  # the target's FP8 units decide, not this host's
        from dsjax.model import fp8 as fp8_lib

        impl = fp8_lib.resolve_impl("auto", list(devices)[0])
        tcfg = dataclasses.replace(tcfg, model=dataclasses.replace(tcfg.model, fp8_impl=impl))
    cfg = tcfg.model
    mesh = pm.make_mesh(tcfg.mesh, devices)
    sizes = dict(mesh.shape)
    b, s = tcfg.batch_size, tcfg.seq_len
    nb = math.prod(sizes[a] for a in pm.BATCH_AXES)
    if b % nb:
        raise ConfigError(f"train config field 'batch_size': {b} is not divisible by the mesh's batch axes "
                          f"(dcn x data x fsdp x expert = {nb})")
    rep = Report(topo, sizes, b, s, flops=step_flops(cfg, b, s, with_mtp=tcfg.mtp_lambda > 0), hbm_limit=hbm_limit,
                 collective_sites=buffers)

    init, step = training_step(cfg, tcfg, mesh)
    abstract_state = jax.eval_shape(init, abstract_params(cfg))
    state_sh = pm.state_shardings(mesh, cfg, abstract_state, pm.rules_for(tcfg.mesh))
    rep.state_bytes = state_bytes(abstract_state, state_sh)
    if rep.state_bytes > rep.hbm:
        return rep  # the parameters and optimizer state alone exceed HBM: nothing to compile

    bsh = pm.batch_sharding(mesh, b)
    batch = {k: jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=bsh) for k in ("tokens", "segment_ids", "positions")}
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state, state_sh)
    jitted = jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None), donate_argnums=0)
    dump = tempfile.mkdtemp(prefix="dsjax_compile_") if buffers else None
    options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True} if dump else None
    t0 = time.time()
    try:
        with jax.set_mesh(mesh):
            lowered = jitted.lower(state, batch)
            try:
                compiled = lowered.compile(compiler_options=options)
            except jax.errors.JaxRuntimeError as e:
                rep.oom = _oom_message(e)
                if rep.oom is None:
                    raise
                rep.compile_seconds = time.time() - t0
                return rep
        rep.compile_seconds = time.time() - t0
        rep.compiled = True
        if dump:
            try:
                rep.peak = memory_peak.peak_buffers(memory_peak.find_dump(dump, "train_step"), top=buffers)
            except (OSError, ValueError) as e:  # a libtpu that dumps differently: say so, keep the rest
                print(f"largest live buffers at peak: not available ({type(e).__name__}: {e})")
    finally:
        if dump:
            shutil.rmtree(dump, ignore_errors=True)
    ma = compiled.memory_analysis()
    rep.args_bytes = ma.argument_size_in_bytes
    rep.temp_bytes = ma.temp_size_in_bytes
    rep.out_bytes = ma.output_size_in_bytes
    rep.alias_bytes = ma.alias_size_in_bytes
    rep.code_bytes = ma.generated_code_size_in_bytes
    rep.host_temp_bytes = getattr(ma, "host_temp_size_in_bytes", 0) or 0
    slice_of = [getattr(d, "slice_index", 0) for d in mesh.devices.flat]
    text = compiled.as_text()
    if hlo_out:
        with open(hlo_out, "w") as fh:
            fh.write(text)
    rep.hlo = hlo_stats.hlo_stats(text, num_devices=len(slice_of), slice_of=slice_of)
    rep.estimate = step_time.estimate(rep.flops["total"], b * s, topo.chips, topo.chip,
                                      rep.hlo.hbm_bytes, rep.hlo.ici_bytes, rep.hlo.dcn_bytes)
    return rep


def search_batch(fits, start: int = 1) -> int:
    """The largest k >= 1 with fits(k), for a monotone fits (true up to some k, false above): double
    from start until fits fails, then bisect. 0 when fits(1) fails. Calls fits O(log k) times."""
    lo, hi = 0, max(1, start)
    while fits(hi):
        lo, hi = hi, hi * 2
    if lo == 0 and hi > 1:  # start itself did not fit: search below it
        hi2 = hi
        while hi2 > 1 and not fits(hi2 // 2):
            hi2 //= 2
        lo, hi = (hi2 // 2, hi2) if hi2 > 1 else (0, 1)
    while hi - lo > 1:  # lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_batch(tcfg, topology: str | Topology, *, progress=print, start: int | None = None,
              hbm_limit: float | None = None):
    """The largest batch_size (a multiple of the mesh's batch axes) whose step fits (search_batch over
    multiples of that unit, from start or one row per batch shard). Returns (batch, the Report of the
    largest that fits), or (0, the Report of the smallest tried) when none fits."""
    from dsjax.parallel import mesh as pm

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if tcfg.mesh.dcn > 1:
        topo = dataclasses.replace(topo, slices=tcfg.mesh.dcn)
    devices = topology_devices(topo)
    sizes = tcfg.mesh.resolve(len(devices))
    unit = math.prod(sizes[a] for a in pm.BATCH_AXES)
    reports: dict[int, Report] = {}

    def fits(k: int) -> bool:
        rep = compile_report(dataclasses.replace(tcfg, batch_size=k * unit), topo, devices=devices,
                             hbm_limit=hbm_limit)
        reports[k] = rep
        progress(f"max batch: batch_size={k * unit} ({k * unit * tcfg.seq_len / topo.chips:.0f} tokens per chip): "
                 f"{rep.total_bytes / GiB:.2f} GiB of {rep.hbm / GiB:.2f} GiB -> {'fits' if rep.fits else 'does not fit'}")
        return rep.fits

    best = search_batch(fits, max(1, (start or unit) // unit))
    return best * unit, reports[best] if best else reports[min(reports)]
