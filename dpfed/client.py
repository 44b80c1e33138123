"""One client's local update: K DP-SGD steps on the adapter, then the payload and the events it spent.

The client owns its shard, its noise generator, its ledger and its budget. It refuses a round
that would push it past its budget, and it appends the round's privacy events to its ledger
(fsynced) *before* it returns the payload: a crash can only over-count, never under-count.
The same object serves the in-process runner and a Flower ClientApp.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from accounting.events import PoissonGaussianEvent, PoissonSkellamEvent
from dpfed.adapters.lorasb import load_trainable_state, trainable_state
from dpfed.secure_encoding import SecureEncoding, encode_site_sum, flatten_per_example, noise_share, site_message
from dpfed.data import TokenizedShard
from dpfed.errors import BudgetError, PrivacyCheckError
from dpfed.release import write_site_local
from dpfed.privacy import (
    DPSGDParams,
    FixedGradientRecords,
    apply_gradients,
    clip_factors,
    clipped_sum,
    noised_mean,
    per_example_loss,
    per_sample_gradients,
    per_sample_weight_gradients,
    poisson_sample,
    sample_rate,
    zero_sums,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains locally in one round."""

    local_steps: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    microbatch: int = 128
    task: str = "classification"


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float


@dataclass(frozen=True)
class ClientResult:
    """What a site hands to the transport after a round: declared fields only (``dpfed.release``, channel
    ``site_reply``). The site's own loss and realised sample count are not here: they go to its
    site-local diagnostics file."""

    client_id: str
    round: int
    state: dict[str, torch.Tensor]
    num_examples: int
    events: tuple
    steps: int


@dataclass(frozen=True)
class SiteMessage:
    """What a site hands to secure aggregation in a round of ``privacy.aggregation: secure`` (``dpfed.release``,
    channel ``site_reply``): its masked-to-be integer message and public fields. Only secure aggregation
    reads ``message``; the server sees the sum of the messages (:class:`dpfed.session.SecureSum`)."""

    client_id: str
    round: int
    message: torch.Tensor  # (padded_dim,) int64 in [0, 2**bits)
    num_examples: int
    events: tuple


class Client:
    """A site holding one private shard. ``dp=None`` means no privacy (comparison runs only)."""

    def __init__(self, *, client_id: str, shard: TokenizedShard, training: LocalTraining,
                 dp: DPSGDParams | None, sample_generator: torch.Generator,
                 noise_generator: torch.Generator | None, ledger=None, budget: Budget | None = None,
                 device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                 noise_enabled: bool = True, fixed: FixedGradientRecords | None = None,
                 diagnostics: Path | None = None, secure: SecureEncoding | None = None) -> None:
        if len(shard) == 0:
            from dpfed.errors import DataError

            raise DataError(f"client {client_id} must hold at least one record, got an empty shard")
        self.client_id = client_id
        self.shard = shard
        self.training = training
        self.dp = dp
        self.sample_generator = sample_generator
        self.noise_generator = noise_generator
        self.ledger = ledger
        self.budget = budget
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.noise_enabled = noise_enabled  # False only for the noise-amplification twin run
        # white-box audit canaries: records n_shard .. n-1 of this client, with fixed gradients
        self.fixed = fixed if fixed is not None and len(fixed) else None
        self._checked_change = False
        # the site's own, un-noised diagnostics (loss, sample count): a mode-0600 file, never released
        self.diagnostics = diagnostics
        # distributed DP (privacy.aggregation secure): the public encoding; rounds go through secure_message
        self.secure = secure

    @property
    def num_examples(self) -> int:
        """The client's population n: its records, and the fixed-gradient audit records it holds."""
        return len(self.shard) + (len(self.fixed) if self.fixed is not None else 0)

    @property
    def sample_rate(self) -> float:
        return sample_rate(self.training.batch_size, self.num_examples)

    def round_events(self) -> tuple:
        """The privacy events one round of local training spends (empty without DP)."""
        if self.dp is None:
            return ()
        if self.secure is not None:  # one Skellam release per round, against everyone who sees only the sum
            sens = self.secure.sensitivity
            return (PoissonSkellamEvent(mu=self.secure.mu_total, l2_sensitivity=sens.l2, l1_sensitivity=sens.l1,
                                        sample_rate=self.sample_rate, count=1),)
        return (PoissonGaussianEvent(noise_multiplier=self.dp.noise_multiplier, sample_rate=self.sample_rate,
                                     count=self.training.local_steps),)

    def spent_events(self) -> list:
        return [] if self.ledger is None else list(self.ledger.events(self.client_id))

    def check_budget(self, *, extra_rounds: int = 1) -> None:
        """Refuse if ``extra_rounds`` more rounds would push this client past its budget."""
        if self.dp is None or self.budget is None:
            return
        from accounting.prv import epsilon

        events = self.spent_events() + list(self.round_events()) * extra_rounds
        eps = epsilon(events, delta=self.budget.delta).upper
        if eps > self.budget.epsilon:
            raise BudgetError(
                f"client {self.client_id} would reach epsilon {eps:.4f} > budget {self.budget.epsilon:g} "
                f"(over by {eps - self.budget.epsilon:.4f}) if it trained another round; refusing"
            )

    def init_event(self, params: DPSGDParams) -> PoissonGaussianEvent:
        """The DP initialisation's mechanism for this client: one Poisson-subsampled Gaussian release."""
        q = sample_rate(params.expected_batch_size, self.num_examples)
        return PoissonGaussianEvent(noise_multiplier=params.noise_multiplier, sample_rate=q, count=1)

    def init_contribution(self, model: nn.Module, adapters: dict, *, params: DPSGDParams,
                          sample_generator: torch.Generator, noise_generator: torch.Generator) -> dict[str, torch.Tensor]:
        """This client's share of a DP initialisation (``init: dp``); recorded in the ledger before it leaves.

        Poisson sample at q = b / n (n counts fixed-gradient audit records), per-example gradients of the adapted base weights (taken at
        the model as given: the caller zeroes the adapters), joint clipping to C over all
        layers, N(0, σ²C²) on the sum, divided by b. Refused if the event alone would exceed
        the budget. The event is appended (fsynced) at round 0 before the sums are returned.
        """
        if params.noise_multiplier <= 0:
            raise PrivacyCheckError(f"init: dp needs a noise multiplier > 0, got {params.noise_multiplier!r}")
        event = self.init_event(params)
        if self.budget is not None:
            from accounting.prv import epsilon

            eps = epsilon(self.spent_events() + [event], delta=self.budget.delta).upper
            if eps > self.budget.epsilon:
                raise BudgetError(f"client {self.client_id} would reach epsilon {eps:.4f} > budget "
                                  f"{self.budget.epsilon:g} (over by {eps - self.budget.epsilon:.4f}) with the DP "
                                  "initialisation alone; raise init.dp_noise_multiplier")
        # fixed-gradient audit records are sampled too; their gradient w.r.t. W0 is zero
        idx, _ = self._split(poisson_sample(self.num_examples, event.sample_rate, generator=sample_generator))
        sums = {n: torch.zeros(a.out_features, a.in_features, device=self.device) for n, a in adapters.items()}
        for batch in self._batches(idx, microbatch=min(self.training.microbatch, 32)):
            grads = per_sample_weight_gradients(model, adapters, batch, task=self.training.task,
                                                autocast_dtype=self.autocast_dtype)
            part, _ = clipped_sum(grads, clip=params.clip)
            for n in sums:
                sums[n] += part[n]
        out = noised_mean(sums, params=params, generator=noise_generator)
        if self.ledger is not None:  # write-ahead
            self.ledger.append(client=self.client_id, round=0, event=event)
        return out

    def fit(self, model: nn.Module, global_state: dict[str, torch.Tensor], *, round: int,
            on_step: Callable[[], None] | None = None) -> ClientResult:
        """Run K local steps from ``global_state``; record the spent events; return the new state."""
        self.check_budget()
        load_trainable_state(model, global_state)
        params = [p for p in model.parameters() if p.requires_grad]
        t = self.training
        if t.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=t.lr)
        else:
            opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum)
        losses, sampled = [], 0
        q = self.sample_rate
        for step in range(t.local_steps):
            idx = poisson_sample(self.num_examples, q, generator=self.sample_generator)
            sampled += len(idx)
            before = trainable_state(model) if not self._checked_change else None
            if self.dp is None:
                self._plain_step(model, idx, losses)
            else:
                self._dp_step(model, idx, losses)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if before is not None:
                self._check_changed(model, before)
            if on_step is not None:
                on_step()
        events = self.round_events()
        if self.ledger is not None:
            for ev in events:  # write-ahead: fsynced before the payload leaves this method
                self.ledger.append(client=self.client_id, round=round, event=ev)
        if self.diagnostics is not None:
            mean_loss = float(torch.cat(losses).mean()) if losses else None
            write_site_local(self.diagnostics, {"round": round, "client": self.client_id, "mean_loss": mean_loss,
                                                "sampled": sampled, "steps": t.local_steps})
        return ClientResult(self.client_id, round, trainable_state(model), self.num_examples, events, t.local_steps)

    def secure_message(self, model: nn.Module, global_state: dict[str, torch.Tensor], *, round: int,
                       rounding_generator: torch.Generator, noise_generator: torch.Generator) -> SiteMessage:
        """One FedSGD step's share for secure aggregation: the only value this site releases in the round.

        Poisson sample at q = b / n; each sampled record's gradient of every trainable parameter
        (R and head, jointly) clipped to C; each record rotated, scaled and conditionally rounded
        on its own (:mod:`dpfed.secure_encoding`); the integer vectors summed; this site's
        Skellam share ``Sk(mu_total / min_sites)`` added; reduced modulo ``2**bits``. The event
        (``mu_total``: what everyone who sees only the sum faces) is fsynced to the ledger before
        the message is returned. Without ``noise_enabled`` (the noise-free twin) no share is added.
        """
        enc = self.secure
        if enc is None or self.dp is None:
            raise PrivacyCheckError(f"client {self.client_id}: secure_message needs a secure encoding and DP")
        if self.fixed is not None:
            raise PrivacyCheckError("fixed-gradient audit records are not implemented with secure aggregation")
        self.check_budget()
        load_trainable_state(model, global_state)
        idx = poisson_sample(self.num_examples, self.sample_rate, generator=self.sample_generator)
        rows, losses = [], []
        for batch in self._batches(idx):
            grads, loss = per_sample_gradients(model, batch, task=self.training.task, autocast_dtype=self.autocast_dtype)
            flat = flatten_per_example(grads)  # (B, dim) float64, names sorted
            rows.append(flat * clip_factors(flat.norm(dim=1), clip=self.dp.clip).unsqueeze(1))  # each row norm <= C
            losses.append(loss.float().cpu())
        per_example = torch.cat(rows) if rows else torch.zeros((0, enc.dim), dtype=torch.float64)
        int_sum = encode_site_sum(per_example, encoding=enc, generator=rounding_generator)  # (d,) int64
        noise = (noise_share(encoding=enc, generator=noise_generator) if self.noise_enabled
                 else torch.zeros(enc.padded_dim, dtype=torch.int64))
        message = site_message(int_sum, noise, encoding=enc)
        events = self.round_events()
        if self.ledger is not None:
            for ev in events:  # write-ahead: fsynced before the message leaves this method
                self.ledger.append(client=self.client_id, round=round, event=ev)
        if self.diagnostics is not None:
            write_site_local(self.diagnostics, {"round": round, "client": self.client_id,
                                                "mean_loss": float(torch.cat(losses).mean()) if losses else None,
                                                "sampled": len(idx), "steps": 1})
        return SiteMessage(self.client_id, round, message, self.num_examples, events)

    def _batches(self, idx: torch.Tensor, microbatch: int | None = None):
        mb = microbatch or self.training.microbatch
        for start in range(0, len(idx), mb):
            yield self.shard.batch(idx[start:start + mb].tolist(), self.device)

    def _split(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Sampled indices → (records of the shard, rows of the fixed-gradient records)."""
        n = len(self.shard)
        return idx[idx < n], [int(i) - n for i in idx[idx >= n]]

    def _fixed_sum(self, model: nn.Module, rows: list[int], *, clip: float | None) -> dict[str, torch.Tensor]:
        shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
        return self.fixed.summed(rows, shapes, clip=clip, device=self.device)  # type: ignore[union-attr]

    def _dp_step(self, model: nn.Module, idx: torch.Tensor, losses: list) -> None:
        sums = zero_sums(model)
        idx, fixed_rows = self._split(idx)
        if fixed_rows:  # clipped and summed exactly like the records' gradients
            part = self._fixed_sum(model, fixed_rows, clip=self.dp.clip)
            for n in sums:
                sums[n] += part[n]
        for batch in self._batches(idx):
            grads, loss = per_sample_gradients(model, batch, task=self.training.task, autocast_dtype=self.autocast_dtype)
            part, _ = clipped_sum(grads, clip=self.dp.clip)
            for n in sums:
                sums[n] += part[n]
            losses.append(loss.float().cpu())
        gen = self.noise_generator if self.noise_enabled else None
        dp = self.dp if self.noise_enabled else DPSGDParams(noise_multiplier=0.0, clip=self.dp.clip,
                                                              expected_batch_size=self.dp.expected_batch_size)
        apply_gradients(model, noised_mean(sums, params=dp, generator=gen))

    def _plain_step(self, model: nn.Module, idx: torch.Tensor, losses: list) -> None:
        n = max(1, len(idx))
        idx, fixed_rows = self._split(idx)
        for batch in self._batches(idx):
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = per_example_loss(model, batch, task=self.training.task)
            (loss.sum() / n).backward()
            losses.append(loss.detach().float().cpu())
        if fixed_rows:  # no clipping without DP: the records' gradients enter the mean as they are
            g = self._fixed_sum(model, fixed_rows, clip=None)
            for name, p in model.named_parameters():
                if p.requires_grad:
                    extra = (g[name] / n).to(p.dtype)
                    p.grad = extra if p.grad is None else p.grad + extra

    def _check_changed(self, model: nn.Module, before: dict[str, torch.Tensor]) -> None:
        after = trainable_state(model)
        frozen = [n for n in after if torch.equal(after[n], before[n])]
        # an empty non-DP batch legitimately changes nothing; under DP the noise moves every trained parameter
        if self.dp is not None and self.noise_enabled and frozen:
            raise PrivacyCheckError(f"client {self.client_id}: trainable parameters did not change after a DP step "
                                    f"({frozen[:3]})")
        self._checked_change = True
