"""The static facts of each federated LoRA method: pure data and arithmetic, no torch.

``dpfed.config`` validates ``train.method`` against :data:`METHOD_NAMES`, ``dpfed.comm`` counts
traffic with :meth:`MethodSpec.traffic`, and each method class in ``dpfed.methods`` carries its
spec (``FedIT.spec is SPECS["fedit"]``); ``dpfed.methods`` checks that both registries name the
same methods.

Per adapted linear layer ``W0`` of shape ``(d_out, d_in)``, rank ``r``, ``c`` clients of a round,
the factors are ``R`` (r×r), ``A`` (r×d_in) and ``B`` (d_out×r):

===========  =======  ============================================  =====================
method       up       down                                          paper (arXiv 2502.15436)
===========  =======  ============================================  =====================
fed-sb       R        R                                             R
fedit        B, A     B, A                                          B, A
ffa-lora     B        B                                             B
fedex-lora   B, A     B, A + the dense d_out×d_in residual          c · (B, A)
flora        B, A     c · (B, A): every client's factors, stacked   c · (B, A)
===========  =======  ============================================  =====================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from dpfed.errors import ConfigError


@dataclass(frozen=True)
class Traffic:
    """Parameters one client sends (``up``) and receives (``down``) in one round."""

    up: int
    down: int


def factor_params(factor: str, *, rank: int, d_in: int, d_out: int) -> int:
    """Numbers in one factor of one layer: ``R`` r², ``A`` r·d_in, ``B`` d_out·r."""
    sizes = {"R": rank * rank, "A": rank * d_in, "B": d_out * rank}
    if factor not in sizes:
        raise ValueError(f"factor must be one of R, A, B, got {factor!r}")
    return sizes[factor]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, independent of any model instance.

    ``trained``: the factors of each adapted layer a client trains and uploads (the classifier
    head, when there is one, always comes on top). ``folds``: the server adds a dense update
    into ``W0`` every round (clients apply it too). ``exact``: the aggregated adapter equals
    the weighted mean of the clients' adapters. ``down_stacks``: the server sends every
    client's factors (``c`` copies) instead of their mean. ``down_residual``: the server sends
    a dense ``d_out×d_in`` residual next to the means. ``setup``: factors each client
    downloads once before round 1. ``paper_stacks``: the Fed-SB paper counts ``c`` clients'
    factors for this method. ``server_init``: the server initialises shared frozen factors
    (``init.strategy`` random, public or dp applies); otherwise PEFT's seeded init.
    ``client_level_dp``: DP-FedAvg (``privacy.unit`` client or both) is implemented.
    ``auditable``: ``dpfed audit`` reads its runs (canaries allowed).
    """

    name: str
    title: str
    reference: str
    trained: tuple[str, ...]
    folds: bool = False
    exact: bool = True
    down_stacks: bool = False
    down_residual: bool = False
    setup: tuple[str, ...] = ()
    paper_stacks: bool = False
    server_init: bool = False
    client_level_dp: bool = False
    auditable: bool = False

    @property
    def trains_a(self) -> bool:
        """Whether clients train ``A`` (False: A is frozen and shared, or there is none)."""
        return "A" in self.trained

    def up_params(self, *, rank: int, d_in: int, d_out: int) -> int:
        """Parameters one client uploads per round for one layer."""
        return sum(factor_params(f, rank=rank, d_in=d_in, d_out=d_out) for f in self.trained)

    def traffic(self, *, rank: int, clients: int, d_in: int, d_out: int) -> Traffic:
        """Per-round parameters of one adapted layer for one client (REFERENCE.md, "Baselines")."""
        up = self.up_params(rank=rank, d_in=d_in, d_out=d_out)
        down = (clients if self.down_stacks else 1) * up + (d_in * d_out if self.down_residual else 0)
        return Traffic(up, down)

    def setup_params(self, *, rank: int, d_in: int, d_out: int) -> int:
        """One-off parameters a client downloads before round 1 for one layer."""
        return sum(factor_params(f, rank=rank, d_in=d_in, d_out=d_out) for f in self.setup)

    def paper_params(self, *, rank: int, clients: int, d_in: int, d_out: int) -> int:
        """One layer's share of the Fed-SB paper's "communication cost" (see ``dpfed.comm.paper_communication``)."""
        return (clients if self.paper_stacks else 1) * self.up_params(rank=rank, d_in=d_in, d_out=d_out)


SPECS: Mapping[str, MethodSpec] = MappingProxyType({
    "fed-sb": MethodSpec(
        name="fed-sb", title="Fed-SB", reference="Singhal et al. 2025, arXiv 2502.15436",
        trained=("R",), setup=("B", "A"), server_init=True, client_level_dp=True, auditable=True),
    "fedit": MethodSpec(
        name="fedit", title="FedIT", reference="Zhang et al. 2024, arXiv 2310.15080",
        trained=("B", "A"), exact=False),
    "ffa-lora": MethodSpec(
        name="ffa-lora", title="FFA-LoRA", reference="Sun et al. 2024, arXiv 2403.12313",
        trained=("B",)),
    "fedex-lora": MethodSpec(
        name="fedex-lora", title="FedEx-LoRA", reference="Singhal et al. 2024, arXiv 2410.09432",
        trained=("B", "A"), folds=True, down_residual=True, paper_stacks=True),
    "flora": MethodSpec(
        name="flora", title="FLoRA", reference="Wang et al. 2024, arXiv 2409.05976",
        trained=("B", "A"), folds=True, down_stacks=True, paper_stacks=True),
})
"""Every method's spec, in display order (Fed-SB first: ratios are relative to it)."""

METHOD_NAMES: tuple[str, ...] = tuple(SPECS)
"""The method names ``train.method`` accepts, in display order."""


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; ``ConfigError`` naming the known methods otherwise."""
    spec = SPECS.get(name)
    if spec is None:
        raise ConfigError(f"method must be one of {', '.join(METHOD_NAMES)}, got {name!r}")
    return spec


def names_with(flag: str) -> tuple[str, ...]:
    """Names of the methods whose spec has ``flag`` set (e.g. ``"client_level_dp"``)."""
    return tuple(n for n, s in SPECS.items() if getattr(s, flag))
