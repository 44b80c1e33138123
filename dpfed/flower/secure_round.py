"""One round of ``privacy.aggregation: secure`` over Flower's SecAgg+ (flwr 1.42), server and site side.

Flower's ``SecAggPlusWorkflow`` runs the protocol (key agreement, Shamir shares of the mask
seeds, masked vectors, unmasking with dropout recovery); dpfed adds no cryptography. The
workflow speaks the legacy strategy interface (``LegacyContext``, ``configure_fit`` /
``aggregate_fit``); :class:`_OneRound` is that interface for one round and the sites dpfed's
round loop chose, and :class:`_Workflow` (a subclass, no patching) also notes which sites
handed in a masked vector: they spent the round whatever happens after. The integer
messages pass through SecAgg+'s quantizer exactly with the parameters of
:func:`dpfed.flower.secure_codec.secaggplus_params` (its module docstring has the argument).

What the server sees: the unmasked sum of the sites' messages, which sites are in it, and each
site's public report (site id, round, its ledger events, its ε so far) — never one site's
message. A site's reply carries its message only as the input of ``secaggplus_mod``, which
masks it before it leaves (Flower clears the plain arrays from the reply).

The site side: :func:`secure_only_mod` hands the messages of a secure round to Flower's
``secaggplus_mod`` and passes every other message through untouched, so one ClientApp serves
local and secure runs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from dpfed.flower.secure_codec import SECAGG_NUM_EXAMPLES, SecAggPlusParams, from_secagg

log = logging.getLogger(__name__)

#: where a secure round's run record and global state arrive on the site (Flower's legacy FitIns layout)
FIT_CONFIG, FIT_ARRAYS = "fitins.config", "fitins.parameters"
SECURE_ENCODING, STATE_NAMES = "secure-encoding", "state-names"


# -- server ----------------------------------------------------------------------------------
@dataclass
class SecAggRound:
    """What one SecAgg+ round gave the server.

    ``total``: the sum of the messages modulo ``2**bits`` ((padded_dim,) int64), None when the
    protocol halted; ``sent``: the nodes that handed in a masked vector (they spent the round);
    ``summed``: the nodes whose vectors are in ``total``; ``reports``: each sender's public report.
    """

    total: np.ndarray | None
    sent: list[int] = field(default_factory=list)
    summed: list[int] = field(default_factory=list)
    reports: dict[int, dict] = field(default_factory=dict)
    reason: str | None = None


class _OneRound(Strategy):
    """The legacy strategy interface for one secure round: the sites are chosen, the sum is only kept."""

    def __init__(self, fit: list[tuple[GridClientProxy, FitIns]]) -> None:
        self.fit = fit
        self.results: list | None = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return list(self.fit)

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}  # dpfed's round loop applies the step (dpfed.session.secure_step)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Workflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that also notes who handed in a masked vector, with their public reports."""

    sent: list[int]
    reports: dict[int, dict]

    def collect_masked_vectors_stage(self, grid, context, state) -> bool:
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self.sent = [proxy.node_id for proxy, _ in state.legacy_results]
        self.reports = {proxy.node_id: dict(res.metrics) for proxy, res in state.legacy_results}
        return ok


def run_secaggplus(grid, *, nodes: list[int], arrays: list[np.ndarray], config: dict, params: SecAggPlusParams,
                   threshold: int, server_round: int, timeout: float | None) -> SecAggRound:
    """One SecAgg+ round: ``FitIns(arrays, config)`` to ``nodes``, the unmasked modular sum back.

    ``threshold``: SecAgg+'s reconstruction threshold, also the fewest live sites at every stage
    (below it the workflow halts and there is no sum); at most ``len(nodes)``. Every node is every
    other's SecAgg+ neighbour.
    """
    run_id = grid.run.run_id
    fit = [(GridClientProxy(n, grid, run_id), FitIns(ndarrays_to_parameters(arrays), dict(config))) for n in nodes]
    strategy = _OneRound(fit)
    base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(base, strategy=strategy)
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: int(server_round)})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    # as fractions of the sites: every site is every other's neighbour (1.0), and the workflow turns the
    # threshold back into round(threshold / K * K) = threshold (its integer form must be < num_shares)
    k = len(nodes)
    workflow = _Workflow(num_shares=1.0, reconstruction_threshold=min(threshold, k) / k, timeout=timeout,
                         **params.workflow_kwargs())
    workflow.sent, workflow.reports = [], {}
    workflow(grid, ctx)
    out = SecAggRound(None, sent=list(workflow.sent), reports=workflow.reports)
    if strategy.results is None:
        out.reason = (f"SecAgg+ halted: fewer than {threshold} of the {len(nodes)} sites stayed through the protocol "
                      f"({len(out.sent)} handed in a masked vector)")
        return out
    out.summed = [proxy.node_id for proxy, _ in strategy.results]
    aggregated = parameters_to_ndarrays(strategy.results[0][1].parameters)
    out.total = from_secagg(aggregated, params=params, num_sites=len(out.summed))
    return out


# -- site ------------------------------------------------------------------------------------
def is_secure_round(msg: Message) -> bool:
    """A train message of a secure round (the server's run record arrives in the FitIns layout)."""
    return FIT_CONFIG in msg.content.config_records


def secure_only_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round; every other message passes untouched."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def global_state_of(content: RecordDict) -> dict:
    """The global state a secure round's FitIns carries: its arrays in the order of the names it lists."""
    import torch

    from dpfed.errors import DpfedError

    names = json.loads(str(content.config_records[FIT_CONFIG][STATE_NAMES]))
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(content.array_records[FIT_ARRAYS],
                                                                     keep_input=True))
    if len(names) != len(arrays):
        raise DpfedError(f"the secure round's state must list one name per array, got {len(names)} names "
                         f"for {len(arrays)} arrays")
    return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in zip(names, arrays)}


def secure_reply(payload: list[np.ndarray], *, site_id: str, server_round: int, events: list[dict],
                 epsilon_spent: float | None) -> RecordDict:
    """The FitRes ``secaggplus_mod`` masks: the message's SecAgg+ arrays and the site's public report.

    ``num_examples`` is :data:`SECAGG_NUM_EXAMPLES` (the codec's exact weight); the report goes
    in the clear (site id, round, the ledger events of the round, ε so far: all public or
    post-processing, ``dpfed.release`` channel ``site_reply``).
    """
    metrics = {"site-id": site_id, "round": int(server_round), "events": json.dumps(events)}
    if epsilon_spent is not None:
        metrics["epsilon-spent"] = float(epsilon_spent)
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(payload), SECAGG_NUM_EXAMPLES, metrics)
    return compat.fitres_to_recorddict(res, keep_input=False)
