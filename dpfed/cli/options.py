"""The run options of ``train``, ``compare`` and ``flower-local``, declared once, and the one way they change a config.

Each alias carries its flag and help; a command declares ``model: options.Model = None``, and
passes what it was given to :func:`run_config`. ``None`` (``False`` for a flag) means "not given":
the config's value stands. :func:`run_config` applies the rules every command follows:

- A ``--dataset`` that replaces the config's source gets **no public slice**: the config's
  ``data.public_fraction`` was declared for its own dataset, not the user's. Unless
  ``--public-fraction`` is given it becomes 0, and when no public file is declared either
  (``--public-data`` / ``data.public_source``), an ``init.head`` and (unless ``--init`` is given)
  an ``init.strategy`` of ``public`` become ``random``.
- Local data paths become absolute, so a run can be resumed from anywhere; a missing one is an
  error, never a hub lookup.

Options that only one command has and that set no config field (``--resume``, ``--sites``,
``--methods``, ...) stay in that command's module.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Annotated, Optional

import typer

from dpfed import config as cfgmod
from dpfed.config import RunConfig

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

# -- run config, model and data -------------------------------------------------------------------
Config = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML run config (default: the built-in demo defaults)")]
Model = Annotated[Optional[str], typer.Option("--model", help="embedded:all-minilm-l6-v2, a local folder, or a hub id")]
Task = Annotated[Optional[str], typer.Option("--task", help="classification | causal-lm | instruct")]
Dataset = Annotated[Optional[str], typer.Option("--dataset", help="embedded:rotten_tomatoes, a csv/tsv/json/jsonl/parquet file, or a "
                                                "hub dataset; a user dataset gets no public slice unless one is declared")]
TextColumn = Annotated[Optional[str], typer.Option("--text-column", help="column holding the text (default: text)")]
LabelColumn = Annotated[Optional[str], typer.Option("--label-column", help="column holding the label (default: label)")]
PromptColumn = Annotated[Optional[str], typer.Option("--prompt-column", help="instruct: column holding the prompt "
                                                     "(or --template)")]
ResponseColumn = Annotated[Optional[str], typer.Option("--response-column", help="instruct: column holding the response")]
Template = Annotated[Optional[str], typer.Option("--template", help="instruct: the prompt as a template over named columns, "
                                                 "e.g. 'Question: {question}' (instead of --prompt-column)")]
Labels = Annotated[Optional[str], typer.Option("--labels", help="the label set, comma-separated, in head-index order "
                                               "(default: the labels of the test split and the public data)")]
PublicData = Annotated[Optional[str], typer.Option("--public-data", help="a file of records declared public (same columns): "
                                                   "fits the head/init without DP, outside ε")]
PublicFraction = Annotated[Optional[float], typer.Option("--public-fraction", help="declare this fraction of the dataset public "
                                                         "(fits the head/init without DP, outside ε; the count is printed)")]
DropInvalid = Annotated[bool, typer.Option("--drop-invalid", help="drop records with an empty/NaN label or a null/empty text "
                                           "(the count is printed) instead of refusing the file")]
Clients = Annotated[Optional[int], typer.Option("--clients", help="number of simulated sites")]
Partition = Annotated[Optional[str], typer.Option("--partition", help="iid | dirichlet")]
DirichletAlpha = Annotated[Optional[float], typer.Option("--dirichlet-alpha", help="α of the Dirichlet label partition")]
Canaries = Annotated[Optional[int], typer.Option("--canaries", help="plant M audit canaries (each with probability 1/2) for dpfed audit")]
CanaryKind = Annotated[Optional[str], typer.Option("--canary-kind", help="gradient (default; white-box: fixed per-sample gradients) | "
                                                   "random-words (input-space records)")]

# -- training and adapter -------------------------------------------------------------------------
Rounds = Annotated[Optional[int], typer.Option("--rounds", help="federated rounds")]
LocalSteps = Annotated[Optional[int], typer.Option("--local-steps", help="DP-SGD steps per client per round")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="expected Poisson batch size (q = b / n_client)")]
Lr = Annotated[Optional[float], typer.Option("--lr", help="client learning rate")]
Rank = Annotated[Optional[int], typer.Option("--rank", help="adapter rank r (LoRA-SB: R is r×r; LoRA baselines: A and B of rank r)")]
LoraAlpha = Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA baselines' alpha (scaling alpha/r)")]
TargetModules = Annotated[Optional[str], typer.Option("--target-modules", help="comma-separated Linear names to adapt")]
ClientFraction = Annotated[Optional[float], typer.Option("--client-fraction", help="fraction of clients per round")]
Method = Annotated[Optional[str], typer.Option("--method", help="federated method (fed-sb)")]
Init = Annotated[Optional[str], typer.Option("--init", help="public | dp (DP estimate from client data, in the ledger) | random")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="fix all randomness (noise included) for reproducibility")]

# -- privacy --------------------------------------------------------------------------------------
Epsilon = Annotated[Optional[float], typer.Option("--epsilon", help="per-client record-level ε budget (upper bound, PRV)")]
Delta = Annotated[Optional[float], typer.Option("--delta", help="δ per record; must be < 1/(smallest client size)")]
Clip = Annotated[Optional[float], typer.Option("--clip", help="per-sample clipping norm C")]
NoiseMultiplier = Annotated[Optional[float], typer.Option("--noise-multiplier", help="σ (default: calibrated from --epsilon)")]
NoDp = Annotated[bool, typer.Option("--no-dp", help="train without DP (comparison only: NO privacy guarantee)")]
PrivacyUnit = Annotated[Optional[str], typer.Option("--privacy-unit", help="record (local DP-SGD) | client (DP-FedAvg; trusted server "
                                                    "adds noise) | both")]
ClientClip = Annotated[Optional[float], typer.Option("--client-clip", help="client-level: L2 clip S of each client's update")]
ClientNoiseMultiplier = Annotated[Optional[float], typer.Option("--client-noise-multiplier", help="client-level σ_c (default: "
                                                                "calibrated from --client-epsilon)")]
ClientEpsilon = Annotated[Optional[float], typer.Option("--client-epsilon", help="client-level ε budget over all rounds (PRV upper bound)")]
Aggregation = Annotated[Optional[str], typer.Option("--aggregation", help="local (each site adds the full noise) | secure "
                                                    "(distributed DP: one DP-SGD step over all sites per round, Skellam "
                                                    "shares, only the secure sum is seen; needs --local-steps 1)")]
MinSites = Annotated[Optional[int], typer.Option("--secure-min-sites", help="secure: noise calibrated for at least this many "
                                                 "surviving sites; a round with fewer is discarded (default: sites per round)")]
ClientDelta = Annotated[Optional[float], typer.Option("--client-delta", help="client-level δ (default: --delta); must be < 1/clients")]

# -- output ---------------------------------------------------------------------------------------
Out = Annotated[Optional[Path], typer.Option("--out", help="run directory (must not exist or be empty)")]
Format = Annotated[str, typer.Option("--format", help="table | json")]


def base_config(path: Optional[Path], *, default: Path = DEMO_CONFIG) -> RunConfig:
    """The config a command starts from: ``--config`` (which must exist), else ``default`` if present, else the built-in defaults."""
    if path is not None:
        return cfgmod.load(path)
    return cfgmod.load(default) if default.is_file() else RunConfig()


def run_config(
    base: RunConfig,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    model: str | None = None,
    task: str | None = None,
    dataset: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    template: str | None = None,
    labels: str | None = None,
    public_data: str | None = None,
    public_fraction: float | None = None,
    drop_invalid: bool = False,
    clients: int | None = None,
    partition: str | None = None,
    dirichlet_alpha: float | None = None,
    canaries: int | None = None,
    canary_kind: str | None = None,
    rounds: int | None = None,
    local_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    rank: int | None = None,
    lora_alpha: float | None = None,
    target_modules: str | None = None,
    client_fraction: float | None = None,
    method: str | None = None,
    init: str | None = None,
    device: str | None = None,
    seed: int | None = None,
    clip: float | None = None,
    noise_multiplier: float | None = None,
    no_dp: bool = False,
    privacy_unit: str | None = None,
    client_clip: float | None = None,
    client_noise_multiplier: float | None = None,
    client_epsilon: float | None = None,
    client_delta: float | None = None,
    aggregation: str | None = None,
    min_sites: int | None = None,
) -> tuple[RunConfig, list[str]]:
    """``base`` with the given options applied; returns the config and the lines to show the user (what a rule changed)."""
    replaced = dataset is not None and dataset != base.data.source
    notes: list[str] = []
    if task == "instruct" and base.model.task != "instruct":  # before the task changes: the config must stay valid
        base, line = _instruct_defaults(base, init_given=init is not None)
        notes += [line] if line else []
    cfg = cfgmod.override(base, **{
        "privacy.epsilon": epsilon, "privacy.delta": delta, "privacy.clip": clip,
        "privacy.noise_multiplier": noise_multiplier, "privacy.enabled": False if no_dp else None,
        "privacy.unit": privacy_unit, "privacy.client_clip": client_clip,
        "privacy.client_noise_multiplier": client_noise_multiplier, "privacy.client_epsilon": client_epsilon,
        "privacy.client_delta": client_delta, "privacy.aggregation": aggregation, "privacy.min_sites": min_sites,
        "model.name": model, "model.task": task, "model.rank": rank, "model.lora_alpha": lora_alpha,
        "model.target_modules": _split(target_modules),
        "data.source": dataset, "data.text_column": text_column, "data.label_column": label_column,
        "data.prompt_column": prompt_column, "data.response_column": response_column, "data.template": template,
        "data.labels": _split(labels), "data.public_source": public_data, "data.public_fraction": public_fraction,
        "data.drop_invalid": True if drop_invalid else None, "data.num_clients": clients,
        "data.partition": partition, "data.dirichlet_alpha": dirichlet_alpha,
        "data.canaries": canaries, "data.canary_kind": canary_kind,
        "train.rounds": rounds, "train.local_steps": local_steps, "train.batch_size": batch_size, "train.lr": lr,
        "train.client_fraction": client_fraction, "train.method": method, "init.strategy": init,
        "device": device, "seed": seed,
    })
    if replaced and public_fraction is None:
        cfg, line = _no_public_slice(cfg, init_given=init is not None)
        notes += [line] if line else []
    return cfgmod.resolve_data_paths(cfg), notes


def given(ctx: typer.Context) -> list[str]:
    """The flags given on the command line (not left at their defaults), in the command's order."""
    flags = []
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        # by name: the enum belongs to whichever click typer runs on
        if source is not None and source.name == "COMMANDLINE":
            flags.append(next((o for o in param.opts if o.startswith("--")), param.opts[0]))
    return flags


def _split(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(x.strip() for x in value.split(",") if x.strip())


def _instruct_defaults(cfg: RunConfig, *, init_given: bool) -> tuple[RunConfig, str]:
    """``--task instruct`` over a classification config: no head, no public slice, no label set (one line says so)."""
    changes: dict[str, object] = {}
    if cfg.init.head == "public":
        changes["init.head"] = "random"
    if cfg.init.strategy == "public" and not init_given:
        changes["init.strategy"] = "random"
    if cfg.data.public_fraction:
        changes["data.public_fraction"] = 0.0
    if cfg.data.labels is not None:
        changes["data.labels"] = None
    if not changes:
        return cfg, ""
    out = cfgmod.override(cfg, **changes)
    if "data.labels" in changes:
        out = dataclasses.replace(out, data=dataclasses.replace(out.data, labels=None))
    return (out, "--task instruct: " + ", ".join(f"{k} {'unset' if v is None else v}" for k, v in changes.items())
            + " (an instruct run has no classification head and no public slice)")


def _no_public_slice(cfg: RunConfig, *, init_given: bool) -> tuple[RunConfig, str]:
    """A user dataset that replaced the config's: no slice of it is public; without a public file, init/head leave 'public'."""
    changes: dict[str, object] = {"data.public_fraction": 0.0}
    switched = []
    if cfg.data.public_source is None:
        if cfg.init.head == "public":
            changes["init.head"] = "random"
            switched.append("init.head")
        if cfg.init.strategy == "public" and not init_given:
            changes["init.strategy"] = "random"
            switched.append("init.strategy")
    cfg = cfgmod.override(cfg, **changes)
    if not switched:
        return cfg, ""
    return cfg, (f"--dataset {cfg.data.source}: no public data declared, so no public slice; {' and '.join(switched)} "
                 f"'public' -> 'random' (declare public records with --public-data FILE or --public-fraction F)")
