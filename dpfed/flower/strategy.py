"""Fed-SB as a Flower strategy: FedAvg's message flow, dpfed's client selection, reply check and aggregation.

``configure_train`` picks the round's sites exactly as the in-process runner picks clients
(``numpy.random.default_rng(child_seed(seed, 5, round))`` over the sites sorted by id) and sends
each the global state. ``aggregate_train`` sorts the replies into accepted (passed
:func:`~dpfed.flower.records.check_reply`), rejected (failed it: dropped, logged, counted, never
averaged), refused (the site declined, e.g. its budget) and failed (an error or no reply in
time); with at least ``min_sites`` accepted it aggregates with the method's own
:meth:`~dpfed.methods.FedSBMethod.aggregate` (Fed-SB: the exact weighted mean of R and head,
arXiv 2502.15436, Sec. 4), in the same site order as the in-process runner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from dpfed.flower import records as rec
from dpfed.payload import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteInfo:
    """A site as the handshake announced it."""

    node_id: int
    site_id: str
    num_examples: int


@dataclass
class RoundOutcome:
    """What happened to each site chosen for one round."""

    server_round: int
    chosen: list[SiteInfo]
    accepted: list[rec.Accepted] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    aggregate: object | None = None  # dpfed.aggregation.Aggregate when the round completed
    sent: list[Message] = field(default_factory=list)  # the grid sets their message ids when it pushes them

    def problems(self) -> str:
        parts = [f"{p['site']} {kind}: {p['reason']}" for kind, items in
                 (("rejected", self.rejected), ("refused", self.refused), ("failed", self.failed)) for p in items]
        return "; ".join(parts) or "none"


def reply_node(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for: by the id of the message it replies to, else by its sender.

    Errors the SuperLink generates itself (a node that stopped sending heartbeats) come from the
    SuperLink's own id; only the message they reply to says which site failed.
    """
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


class FedSBStrategy(FedAvg):
    """FedAvg's configure/aggregate interface around Fed-SB's method object (wraps, never patches).

    ``method`` is the server's :class:`~dpfed.methods.FedSBMethod`; ``manifest`` the global
    state's names and shapes; ``seed`` the run seed (site selection only); ``roster`` maps node
    ids to the sites the handshake announced.
    """

    def __init__(self, *, method, manifest: Manifest, seed: int, client_fraction: float, min_sites: int,
                 dp: bool) -> None:
        super().__init__(fraction_train=client_fraction, fraction_evaluate=0.0, min_train_nodes=min_sites,
                         min_available_nodes=min_sites, weighted_by_key="num-examples")
        self.method = method
        self.manifest = manifest
        self.seed = seed
        self.client_fraction = client_fraction
        self.min_sites = min_sites
        self.dp = dp
        self.roster: dict[int, SiteInfo] = {}
        self.last: RoundOutcome | None = None
        self.totals = {"rejected": 0, "refused": 0, "failed": 0}

    def summary(self) -> None:
        log.info("FedSBStrategy: fraction %.2f, min sites %d, %d sites", self.client_fraction, self.min_sites,
                 len(self.roster))

    # -- selection -----------------------------------------------------------------------
    def sites(self) -> list[SiteInfo]:
        return sorted(self.roster.values(), key=lambda s: s.site_id)

    def select(self, server_round: int) -> list[SiteInfo]:
        """The in-process runner's draw: ``ceil(q·N)`` of the N sites (sorted by id), seeded per round."""
        from dpfed.seeds import RunStream, child_seed

        sites = self.sites()
        per_round = max(1, int(math.ceil(self.client_fraction * len(sites))))
        gen = np.random.default_rng(child_seed(self.seed, RunStream.SELECT, server_round))
        return [sites[i] for i in sorted(gen.choice(len(sites), size=per_round, replace=False).tolist())]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.configure_sites(server_round, self.select(server_round), arrays, config)

    def configure_sites(self, server_round: int, chosen: list[SiteInfo], arrays: ArrayRecord,
                        config: ConfigRecord, frozen: ArrayRecord | None = None) -> list[Message]:
        """The train messages for ``chosen`` (the round loop of :mod:`dpfed.session` chose them).

        ``frozen``: the method's frozen tensors, for methods that change them every round (folds into W0).
        """
        self.last = RoundOutcome(server_round, chosen)
        content = RecordDict({rec.ARRAYS: arrays, rec.CONFIG: config, **({rec.FROZEN: frozen} if frozen else {})})
        self.last.sent = [Message(content=content, dst_node_id=s.node_id, message_type=MessageType.TRAIN,
                                  group_id=str(server_round)) for s in chosen]
        return list(self.last.sent)

    # -- aggregation ---------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = self.collect(server_round, replies)
        metrics = MetricRecord({"sites-accepted": len(out.accepted), "replies-rejected": len(out.rejected),
                                "sites-refused": len(out.refused), "sites-failed": len(out.failed)})
        if len(out.accepted) < self.min_sites:
            return None, metrics
        agg = self.method.aggregate([a.state for a in out.accepted], [a.num_examples for a in out.accepted],
                                    round=server_round)
        out.aggregate = agg
        return rec.to_record(agg.state), metrics

    def collect(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Check every reply of the round: accepted (in the order the sites were chosen), rejected, refused, failed."""
        out = self.last if self.last is not None and self.last.server_round == server_round else RoundOutcome(server_round, [])
        self.last = out
        expected = {s.node_id: s for s in out.chosen}
        answered = set()
        for msg in replies:
            node = reply_node(msg, out.sent)
            info = expected.get(node)
            if info is None or node in answered or (not msg.has_error() and msg.metadata.src_node_id != node):
                out.rejected.append({"site": f"node {node}", "node": node,
                                     "reason": "reply from a site that was not asked (or a second reply)"})
                continue
            answered.add(node)
            if msg.has_error():
                out.failed.append({"site": info.site_id, "node": node, "reason": msg.error.reason})
                continue
            if rec.REFUSAL in msg.content:
                reason = str(msg.content.config_records[rec.REFUSAL].get("reason", "?"))
                out.refused.append({"site": info.site_id, "node": node, "reason": reason})
                continue
            try:
                out.accepted.append(rec.check_reply(msg.content, manifest=self.manifest, site_id=info.site_id,
                                                    server_round=server_round, num_examples=info.num_examples,
                                                    dp=self.dp))
            except rec.ReplyError as exc:
                out.rejected.append({"site": info.site_id, "node": node, "reason": str(exc)})
        for node, info in expected.items():
            if node not in answered:
                out.failed.append({"site": info.site_id, "node": node, "reason": "no reply before the round timeout"})
        for kind in ("rejected", "refused", "failed"):
            self.totals[kind] += len(getattr(out, kind))
            for p in getattr(out, kind):
                log.warning("round %d: %s %s: %s", server_round, p["site"], kind, p["reason"])
        order = {s.site_id: i for i, s in enumerate(out.chosen)}
        out.accepted.sort(key=lambda a: order[a.site_id])
        return out

    # -- no federated evaluation: the server evaluates the global state on its test split -----
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
