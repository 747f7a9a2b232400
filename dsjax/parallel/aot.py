"""Ahead-of-time compilation of the real training step for a TPU topology, on any machine.

`compile_report(tcfg, topology)` builds the topology's devices with libtpu's compiler
(`jax.experimental.topologies`), lays the mesh over them, describes the train state and batch as
sharded `jax.ShapeDtypeStruct`s (nothing is materialised: 671B parameters never exist here), lowers
and compiles `dsjax.train.step.make_train_step`, and reports per-chip memory from XLA's
`memory_analysis()` (reliable), FLOPs per step computed analytically (XLA's cost analysis counts a
scanned layer once, SPEC.md section 8), XLA's own time estimate, and the MFU that estimate implies.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from dsjax.config import ConfigError, ModelConfig

GB = 1e9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float  # per chip (SPEC.md section 8)
    peak_flops: float  # bf16 dense, per chip
    cores_per_chip: int  # how the v5p-N name counts


CHIPS = {
    "v5p": Chip("TPU v5p", 95 * GB, 459e12, 2),
    "v6e": Chip("TPU v6e", 32 * GB, 918e12, 1),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    kind: str  # v5p | v6e
    shape: tuple[int, ...]

    @property
    def name(self) -> str:  # what get_topology_desc takes
        return f"{self.kind}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

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

        return topologies.get_topology_desc(topology_name=topo.name, platform="tpu").devices
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

def training_step(model_cfg: ModelConfig, tcfg):
    """(init_state, train_step) of the trainer (dsjax.train.step)."""
    from dsjax.train.step import init_state, make_train_step

    return (lambda params: init_state(params, tcfg)), make_train_step(model_cfg, tcfg)


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
    state_bytes: float = 0.0
    flops: dict = dataclasses.field(default_factory=dict)
    xla_flops: float | None = None
    xla_seconds: float | None = None
    compile_seconds: float = 0.0
    compiled: bool = False
    oom: str | None = None  # XLA's out-of-memory message when compilation itself refused

    @property
    def fits(self) -> bool:
        return self.oom is None and self.total_bytes <= self.hbm

    @property
    def total_bytes(self) -> float:
        if not self.compiled:
            return self.state_bytes
        return self.args_bytes + self.out_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    @property
    def hbm(self) -> float:
        return self.topology.chip.hbm_bytes

    def text(self) -> str:
        t, chip = self.topology, self.topology.chip
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items() if v > 1) or "single device"
        f = self.flops
        lines = [
            f"topology: {t.name} ({t.chips} chips of {chip.name}, {chip.hbm_bytes / GB:.0f} GB HBM each)",
            f"mesh: {mesh}",
            f"batch: {self.batch} x {self.seq} tokens = {self.batch * self.seq} per step "
            f"({self.batch * self.seq / t.chips:.0f} per chip)",
        ]
        if self.compiled:
            lines += [
                f"per-chip memory (XLA memory_analysis): arguments {self.args_bytes / GiB:.2f} GiB "
                f"(params + optimizer state + batch), temporaries {self.temp_bytes / GiB:.2f} GiB, "
                f"outputs not aliased {(self.out_bytes - self.alias_bytes) / GiB:.2f} GiB, code {self.code_bytes / GiB:.2f} GiB",
                f"per-chip total: {self.total_bytes / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.2f} GiB "
                f"({100 * self.total_bytes / chip.hbm_bytes:.0f}%) -> {'FITS' if self.fits else 'DOES NOT FIT'}",
                f"compile time: {self.compile_seconds:.0f} s",
            ]
        elif self.oom is not None:
            lines += [f"per-chip train state: {self.state_bytes / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.2f} GiB",
                      f"XLA refused to compile (after {self.compile_seconds:.0f} s): {self.oom}",
                      "-> DOES NOT FIT"]
        else:
            lines += [f"per-chip train state alone: {self.state_bytes / GiB:.2f} GiB of {chip.hbm_bytes / GiB:.2f} GiB "
                      f"-> DOES NOT FIT (not compiled)"]
        lines += [
            f"FLOPs per step (analytic): {f['total']:.4g} = 6 x {f['active_params'] / 1e9:.2f}B active matmul params "
            f"x {f['tokens']} tokens ({f['matmul']:.4g}) + causal attention ({f['attention']:.4g})",
            f"compute-bound step time at peak: {f['total'] / (t.chips * chip.peak_flops) * 1e3:.1f} ms "
            f"({t.chips} x {chip.peak_flops / 1e12:.0f} TFLOP/s bf16)",
        ]
        if self.xla_seconds:
            mfu = f["total"] / (t.chips * chip.peak_flops * self.xla_seconds)
            lines.append(f"XLA estimated step time: {self.xla_seconds * 1e3:.1f} ms -> implied MFU {100 * mfu:.1f}% "
                         f"(XLA counts a scanned layer once: this estimate is optimistic)")
        else:
            lines.append("XLA estimated step time: not available")
        return "\n".join(lines)


def compile_report(tcfg, topology: str | Topology, *, devices=None) -> Report:
    """Lower and compile the training step of tcfg (a dsjax.train.config.TrainConfig) for the topology."""
    from dsjax.model.params import abstract_params
    from dsjax.parallel import mesh as pm

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topo) if devices is None else devices
    cfg = tcfg.model
    mesh = pm.make_mesh(tcfg.mesh, devices)
    sizes = dict(mesh.shape)
    b, s = tcfg.batch_size, tcfg.seq_len
    nb = math.prod(sizes[a] for a in pm.BATCH_AXES)
    if b % nb:
        raise ConfigError(f"train config field 'batch_size': {b} is not divisible by the mesh's batch axes "
                          f"(dcn x data x fsdp x expert = {nb})")
    rep = Report(topo, sizes, b, s, flops=step_flops(cfg, b, s, with_mtp=tcfg.mtp_lambda > 0))

    init, step = training_step(cfg, tcfg)
    abstract_state = jax.eval_shape(init, abstract_params(cfg))
    state_sh = pm.state_shardings(mesh, cfg, abstract_state)
    rep.state_bytes = state_bytes(abstract_state, state_sh)
    if rep.state_bytes > topo.chip.hbm_bytes:
        return rep  # the parameters and optimizer state alone exceed HBM: nothing to compile

    bsh = pm.batch_sharding(mesh, b)
    batch = {k: jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=bsh) for k in ("tokens", "segment_ids", "positions")}
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state, state_sh)
    jitted = jax.jit(step, in_shardings=(state_sh, bsh), out_shardings=(state_sh, None), donate_argnums=0)
    t0 = time.time()
    with jax.set_mesh(mesh):
        lowered = jitted.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            msg = str(e)
            if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
                raise
            rep.compile_seconds = time.time() - t0
            rep.oom = msg.strip().splitlines()[0][:400]
            return rep
    rep.compile_seconds = time.time() - t0
    rep.compiled = True
    ma = compiled.memory_analysis()
    rep.args_bytes = ma.argument_size_in_bytes
    rep.temp_bytes = ma.temp_size_in_bytes
    rep.out_bytes = ma.output_size_in_bytes
    rep.alias_bytes = ma.alias_size_in_bytes
    rep.code_bytes = ma.generated_code_size_in_bytes
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        rep.xla_flops = ca.get("flops")
        rep.xla_seconds = ca.get("optimal_seconds") or None
        if rep.xla_seconds is not None and rep.xla_seconds <= 0:
            rep.xla_seconds = None
    except Exception:  # cost analysis is optional
        pass
    return rep
