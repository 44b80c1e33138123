"""``dpfed comm``: communication cost per round of Fed-SB and the federated LoRA baselines."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from dpfed import comm as C
from dpfed.errors import ConfigError

FORMATS = ("table", "json")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _report(shape: C.ModelShape, rows: tuple[C.MethodComm, ...], *, clients: int, dtype: str) -> dict[str, Any]:
    ratios = C.ratios_vs_fed_sb(rows)
    methods = []
    for row in rows:
        entry = row.as_dict()
        entry["vs_fed_sb"] = ratios[(row.method, row.rank)]
        methods.append(entry)
    return {
        "model": shape.name,
        "source": shape.source,
        "model_type": shape.model_type,
        "num_layers": shape.num_layers,
        "target_modules": [{"name": m.name, "d_in": m.d_in, "d_out": m.d_out} for m in shape.modules],
        "clients": clients,
        "dtype": dtype,
        "bytes_per_param": C.dtype_bytes(dtype),
        "methods": methods,
        "notes": [
            "per_client_per_round: what one client uploads and downloads in one round",
            "all_clients_per_round: the sum over the round's clients, up plus down",
            "paper_params: the Fed-SB paper's count (dpfed.comm.paper_communication), not traffic",
            "fedex-lora down includes the dense d_out x d_in residual; setup is a one-off download",
        ],
    }


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    refs = [m["rank"] for m in report["methods"] if m["method"] == "fed-sb"]
    modules = ", ".join(f"{m['name']} {m['d_in']}→{m['d_out']}" for m in report["target_modules"])
    title = (
        f"{report['model']} ({report['model_type']}, {report['num_layers']} layers), "
        f"{report['clients']} clients, {report['dtype']}"
    )
    caption = (f"modules per layer: {modules}\nbytes: sent and received by all clients in one round (up + down); "
               f"paper count: parameters of one adapter message as the Fed-SB paper counts them (not traffic)")
    table = Table(title=title, caption=caption)
    for header in ("method", "rank", "up / client", "down / client", "round total (all clients)",
                   "setup / client", "paper count"):
        table.add_column(header, justify="left" if header == "method" else "right")
    for r in refs:  # two different counts: label each (README "Command line" quotes both)
        table.add_column(f"bytes × fed-sb r={r} (round total)", justify="right")
        table.add_column(f"paper count × fed-sb r={r}", justify="right")
    b = report["bytes_per_param"]
    for m in report["methods"]:
        pc, ac = m["per_client_per_round"], m["all_clients_per_round"]
        cells = [
            m["method"],
            str(m["rank"]),
            f"{_si(pc['params_up'])} ({_bytes(pc['bytes_up'])})",
            f"{_si(pc['params_down'])} ({_bytes(pc['bytes_down'])})",
            f"{_si(ac['params_total'])} ({_bytes(ac['bytes_total'])})",
            _bytes(m["setup_per_client"]["params_down"] * b),
            _si(m["paper_params"]),
        ]
        for v in m["vs_fed_sb"]:
            cells += [f"{v['total_bytes_ratio']:.1f}×", f"{v['paper_params_ratio']:.1f}×"]
        table.add_row(*cells)
    Console().print(table)


def comm(
    model: Annotated[str, typer.Option(
        "--model", help="Bundled shape name (e.g. gemma-2-9b, llama-3.2-1b, bert-base) or a path to a config.json.")],
    rank: Annotated[str, typer.Option(
        "--rank", help="Rank for all methods ('32'), several ('16,32'), or per method "
        "('fed-sb=200,fedit=32'); unnamed values apply to methods not named.")] = "32",
    clients: Annotated[int, typer.Option("--clients", help="Clients taking part in each round.")] = 25,
    target_modules: Annotated[str | None, typer.Option(
        "--target-modules", help="Comma list of adapted modules (default: all of the model family's).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Number format on the wire: fp32, bf16 or fp16.")] = "fp32",
    methods: Annotated[str | None, typer.Option(
        "--methods", help=f"Comma list among {', '.join(C.METHODS)} (default: all, or those named in --rank).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Output: table or json.")] = "table",
) -> None:
    """Parameters and bytes sent per round by Fed-SB and the federated LoRA baselines."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    dtype = dtype.strip().lower()
    C.dtype_bytes(dtype)
    targets = C.parse_name_list(target_modules, "target_modules") if target_modules is not None else None
    method_list = [m.lower() for m in C.parse_name_list(methods, "methods")] if methods is not None else None
    shape = C.model_shape(model, target_modules=targets)
    ranks = C.resolve_ranks(rank, method_list)
    rows = C.compare_methods(shape, ranks, clients=clients, dtype=dtype)
    report = _report(shape, rows, clients=clients, dtype=dtype)
    if fmt == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_table(report)
