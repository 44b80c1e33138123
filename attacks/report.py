"""Write an audit result as ``audit.json``, ``audit.md`` and a self-contained ``audit.html``.

The HTML page needs nothing else: its figures are PNGs embedded as base64 ``data:`` URIs, its style
is inline, it has no script and no external URL. Figures are drawn on ``matplotlib.figure.Figure``
objects (no pyplot, no global backend or style change).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_reports", "to_jsonable", "render_markdown", "render_html", "figures"]

JSON_NAME, MD_NAME, HTML_NAME = "audit.json", "audit.md", "audit.html"

_VERDICT_COLOUR = {"consistent": "#1a7f37", "violation": "#cf222e", "no-claim": "#6e7781"}
_ATTACK_TITLES = {
    "reference": "reference attack (loss reduction vs. the model before fine-tuning), real records",
    "loss": "loss attack (final loss), real records",
    "canary_loss_reduction": "canaries (loss reduction), descriptive",
    "canary_gradient": "gradient canaries (coordinate moved along the canary), descriptive",
}


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays converted, non-finite floats as None, paths as strings."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "—"
        return f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figures(result: dict[str, Any]) -> dict[str, str]:
    """Name → base64 PNG: ROC curves on log axes, canary score histogram, epsilon comparison."""
    from matplotlib.figure import Figure

    out: dict[str, str] = {}
    attacks = result.get("attacks") or {}
    if attacks:
        fig = Figure(figsize=(5.2, 4.4))
        ax = fig.add_subplot()
        floor = 1.0
        for name, a in attacks.items():
            fpr, tpr = np.asarray(a["roc"]["fpr"]), np.asarray(a["roc"]["tpr"])
            lo = 0.5 / max(a["n_non_members"], 1)  # zero rates drawn at half the smallest resolvable rate
            floor = min(floor, lo, 0.5 / max(a["n_members"], 1))
            ax.step(np.maximum(fpr, lo), np.maximum(tpr, lo), where="post", label=f"{name} (AUC {a['auc']:.3f})")
        grid = np.logspace(math.log10(floor), 0, 50)
        ax.plot(grid, grid, "k:", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(floor, 1.05)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC curves (log axes)")
        ax.legend(loc="lower right", fontsize=8)
        out["roc"] = _png(fig)
    cs = result.get("canary_scores")
    if cs and cs.get("score"):
        s = np.asarray(cs["score"], dtype=float)
        inc = np.asarray(cs["included"], dtype=bool)
        fig = Figure(figsize=(5.2, 3.6))
        ax = fig.add_subplot()
        bins = np.histogram_bin_edges(s, bins=min(40, max(5, s.size // 5))) if np.ptp(s) > 0 else 5
        ax.hist(s[inc], bins=bins, alpha=0.6, label=f"included ({int(inc.sum())})")
        ax.hist(s[~inc], bins=bins, alpha=0.6, label=f"excluded ({int((~inc).sum())})")
        ax.set_xlabel("coordinate moved along the canary (−sign × Δθ)"
                      if (result.get("one_run") or {}).get("canary_kind") == "gradient" else "loss reduction (initial − final)")
        ax.set_ylabel("canaries")
        ax.set_title("canary scores by (secret) inclusion")
        ax.legend(fontsize=8)
        out["canaries"] = _png(fig)
    bars = [("ε lower bound\n(one-run audit)", result.get("epsilon_lower_bound")),
            ("audit ceiling\n(all guesses right)", result.get("epsilon_lower_bound_ceiling")),
            ("μ-GDP estimate → ε\n(not a bound)", result.get("gdp_epsilon")),
            ("claimed ε\n(accountant)", result.get("epsilon_claimed"))]
    bars = [(k, v) for k, v in bars if v is not None and math.isfinite(v)]
    if bars:
        fig = Figure(figsize=(5.6, 3.2))
        ax = fig.add_subplot()
        colours = ["#0969da", "#8c959f", "#bf8700", "#1a7f37"][: len(bars)]
        ax.bar(range(len(bars)), [v for _, v in bars], color=colours)
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([k for k, _ in bars], fontsize=8)
        for i, (_, v) in enumerate(bars):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(f"ε at δ = {result.get('delta', 0):g}")
        ax.set_title("empirical ε vs. the claim")
        out["epsilon"] = _png(fig)
    return out


# --------------------------------------------------------------------------------------------
# Tables shared by Markdown and HTML
# --------------------------------------------------------------------------------------------


def _identity_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    ad = r.get("adapter") or {}
    fp = r.get("data_fingerprints") or {}
    pk = r.get("packages") or {}
    return [
        ("run directory", r.get("run_dir", "—")),
        ("model", f"{r.get('model')} ({r.get('task')})"),
        ("base model sha256", _fmt(r.get("base_model_sha256"))),
        ("adapter", f"{ad.get('method')} LoRA-SB rank {ad.get('rank')} on {ad.get('adapted_modules')} modules, init {ad.get('init')}"),
        ("adapter sha256", _fmt(ad.get("sha256"))),
        ("data", f"{fp.get('source')}; test {fp.get('test', '—')}, public {fp.get('public', '—')}, canaries {fp.get('canaries')}"),
        ("packages", ", ".join(f"{k} {v}" for k, v in pk.items() if v)),
        ("git commit", f"{_fmt(r.get('git_commit'))}" + (" (uncommitted changes)" if r.get("git_dirty") else "")),
        ("date (UTC)", r.get("date", "—")),
    ]


def _claim_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    c = r.get("claim") or {}
    if not c.get("dp"):
        return [("claim", "none: trained without differential privacy (--no-dp)")]
    rates = c.get("sample_rates") or {}
    q = f"{min(rates.values()):.4g} – {max(rates.values()):.4g}" if rates else "—"
    return [
        ("statement", _fmt(c.get("statement"))),
        ("ε claimed (audited)", f"{_fmt(c.get('epsilon'), 4)} from {c.get('epsilon_source')}"),
        ("ε target", _fmt(c.get("epsilon_target"))),
        ("δ", f"{c.get('delta'):g}"),
        ("noise multiplier σ / clip C", f"{_fmt(c.get('noise_multiplier'), 4)} / {_fmt(c.get('clip'), 4)}"),
        ("rounds completed / planned", f"{c.get('rounds_completed')} / {c.get('rounds_planned')}"),
        ("local steps per round, batch b", f"{c.get('local_steps')}, {c.get('batch_size')}"),
        ("clients (per round)", f"{c.get('clients')} ({c.get('clients_per_round')})"),
        ("sampling", f"{c.get('sampling')}; q_i in {q}"),
        ("privacy unit", _fmt(c.get("privacy_unit"))),
        ("accountant", _fmt(c.get("accountant"))),
        ("trust model", _fmt(c.get("trust_model"))),
        ("accounted", "; ".join(c.get("accounted") or [])),
        ("not accounted", "; ".join(c.get("not_accounted") or [])),
    ]


def _result_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    o = r.get("one_run") or {}
    rows = [
        ("canaries (included)", f"{r.get('canaries')} ({r.get('canaries_included')})"),
        ("guesses k₊ / k₋ (fixed before scoring)", f"{r.get('k_plus')} / {r.get('k_minus')}"),
        ("guesses made / correct", f"{r.get('guesses')} / {r.get('correct')}"),
        (f"ε lower bound ({_pct(r.get('confidence'))} confidence)", _fmt(r.get("epsilon_lower_bound"), 3)),
        ("ceiling of this audit", _fmt(r.get("epsilon_lower_bound_ceiling"), 3)),
        ("ε claimed", _fmt(r.get("epsilon_claimed"), 3)),
        ("tie abstentions", str(o.get("n_abstained_ties", 0))),
    ]
    if r.get("headline_attack"):
        rows += [
            (f"AUC ({r['headline_attack']})", f"{_fmt(r.get('auc'))} [{_fmt((r.get('auc_ci') or [None])[0])}, "
                                              f"{_fmt((r.get('auc_ci') or [None, None])[1])}]"),
            ("TPR at 1% FPR", _pct(r.get("tpr_at_1pct_fpr"))),
            ("TPR at 0.1% FPR", _pct(r.get("tpr_at_0_1pct_fpr"))),
            ("μ-GDP estimate (→ ε at δ)", f"{_fmt(r.get('gdp_mu'))} (→ {_fmt(r.get('gdp_epsilon'))})"),
            ("μ of a GDP mechanism exactly at the claim", _fmt(r.get("gdp_mu_of_claim"))),
        ]
    return rows


def _attack_rows(name: str, a: dict[str, Any]) -> list[str]:
    def tpr(key: str) -> str:
        t = a[key]
        note = "" if t["resolvable"] else " (not resolved)"
        return f"{_pct(t['tpr'])} [{_pct(t['tpr_low'])}, {_pct(t['tpr_high'])}] at FPR {_pct(t['fpr_achieved'])}{note}"

    return [name, f"{a['n_members']} / {a['n_non_members']}", f"{a['auc']:.3f} [{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}]",
            tpr("tpr_at_1pct_fpr"), tpr("tpr_at_0_1pct_fpr"), f"{a['gdp']['mu']:.3f} (ε {a['gdp']['epsilon']:.2f})"]


_ATTACK_HEADER = ["attack", "members / non-members", "AUC [95% CI]", "TPR at 1% FPR [CI]", "TPR at 0.1% FPR [CI]", "μ-GDP (→ ε)"]


def _method_text(r: dict[str, Any]) -> list[str]:
    o = r.get("one_run") or {}
    if o.get("canary_kind") == "gradient":
        what = (f"Canaries: {r.get('canaries')} white-box gradient (Dirac) canaries (kind gradient): records whose "
                "per-sample gradient is ±C on one distinct trainable coordinate")
    else:
        what = (f"Canaries: {r.get('canaries')} texts of {o.get('canary_length')} random vocabulary words (kind "
                f"{o.get('canary_kind')})" + (" with random labels" if r.get("task") == "classification" else ""))
    return [
        what + ", each included in a client's population independently with probability 1/2 before training, and "
        "trained on with the same sampling, clipping and noise as every other record.",
        f"Score: {o.get('score')}. The auditor guesses 'in' for the {r.get('k_plus')} highest and 'out' for the "
        f"{r.get('k_minus')} lowest scores ({o.get('k_rule')}) and abstains on the rest.",
        "Bound: one-run audit of Steinke, Nasr & Jagielski (arXiv 2305.08846, Theorem 3.1): the largest ε whose "
        f"p-value for 'at least v of r guesses right' stays below {1 - r.get('confidence', 0.95):.2g}, at the run's δ.",
        "Real-record attacks: members drawn from the client shards, non-members from a held-out pool carved out "
        "before training. Loss attack: −loss(final). Reference attack: loss(before fine-tuning) − loss(final), the "
        "log-likelihood ratio against the model before fine-tuning, which saw no private record.",
        "μ-GDP (Dong, Roth & Su, arXiv 1905.02383): the μ whose Gaussian trade-off curve has the attack's AUC, "
        "μ = √2·Φ⁻¹(AUC), converted to ε at the run's δ and shown next to the accountant's ε; audit.json also "
        "holds the larger, optimistic μ = Φ⁻¹(1−FPR) − Φ⁻¹(FNR) at the best ROC point.",
    ]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _md_table(rows: list[tuple[str, str]] | list[list[str]], header: list[str]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _client_level_rows(c: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("claim (client level)", f"epsilon {_fmt(c['epsilon_claimed'])}, delta {c['delta']:g}"),
        ("canary clients (included)", f"{c['canary_clients']} ({c['included']})"),
        ("guesses / correct", f"{c['guesses']} / {c['correct']}"),
        ("epsilon lower bound (ceiling)", f"{_fmt(c['epsilon_lower_bound'])} ({_fmt(c['epsilon_lower_bound_ceiling'])})"),
        ("mean cos included / excluded (null std)",
         f"{_fmt(c['mean_cos_included'])} / {_fmt(c['mean_cos_excluded'])} ({_fmt(c['null_std'])})"),
        ("Gaussian estimate: mu, epsilon (an estimate, not a bound)",
         f"{_fmt(c['gaussian_mu_estimate'])}, {_fmt(c['epsilon_estimate'])}"),
        ("excluded canaries vs exact null (KS p-value)", _fmt(c["null_ks_p_value"])),
        ("verdict (client level)", f"{c['verdict']}: {c['verdict_reason']}"),
    ]


def _client_level_md(c: dict[str, Any] | None) -> list[str]:
    if not c:
        return []
    return ["## Client-level audit (canary clients)", c["method"], "",
            _md_table(_client_level_rows(c), ["quantity", "value"]), ""]


def render_markdown(r: dict[str, Any]) -> str:
    parts = [
        f"# dpfed audit: **{r['verdict']}**",
        "",
        r.get("verdict_reason", ""),
        "",
        "## Identity",
        _md_table(_identity_rows(r), ["", ""]),
        "",
        "## Claim",
        _md_table(_claim_rows(r), ["", ""]),
        "",
        "## Method",
        *[f"- {t}" for t in _method_text(r)],
        "",
        "## Results",
        _md_table(_result_rows(r), ["quantity", "value"]),
        "",
    ]
    attacks = r.get("attacks") or {}
    if attacks:
        parts += ["### Attacks", _md_table([_attack_rows(n, a) for n, a in attacks.items()], _ATTACK_HEADER), ""]
    parts += _client_level_md(r.get("client_level_audit"))
    parts += ["## Verdict", f"**{r['verdict']}**: {r.get('verdict_reason', '')}", "",
              "## Limitations", *[f"- {t}" for t in r.get("limitations", [])], ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#1f2328;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;width:100%}td,th{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#f6f8fa}td.k{width:32%;color:#57606a}.verdict{display:inline-block;padding:.15em .6em;border-radius:.4em;color:#fff;font-weight:600}
figure{display:inline-block;margin:.5em 1em .5em 0}figcaption{font-size:.85em;color:#57606a}img{max-width:100%}
code{background:#f6f8fa;padding:0 .2em}
"""


def _html_kv(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><td class=k>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def render_html(r: dict[str, Any], figs: dict[str, str] | None = None) -> str:
    figs = figures(r) if figs is None else figs
    e = html.escape
    colour = _VERDICT_COLOUR.get(r["verdict"], "#6e7781")
    out = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>dpfed audit: {e(r['verdict'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>dpfed audit <span class=verdict style=\"background:{colour}\">{e(r['verdict'])}</span></h1>",
        f"<p>{e(r.get('verdict_reason', ''))}</p>",
        "<h2>Identity</h2>", _html_kv(_identity_rows(r)),
        "<h2>Claim</h2>", _html_kv(_claim_rows(r)),
        "<h2>Method</h2><ul>", *[f"<li>{e(t)}</li>" for t in _method_text(r)], "</ul>",
        "<h2>Results</h2>", _html_kv(_result_rows(r)),
    ]
    attacks = r.get("attacks") or {}
    if attacks:
        head = "".join(f"<th>{e(h)}</th>" for h in _ATTACK_HEADER)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _attack_rows(n, a)) + "</tr>" for n, a in attacks.items())
        out.append(f"<table><tr>{head}</tr>{body}</table>")
        out.append("<p>" + "<br>".join(e(f"{n}: {_ATTACK_TITLES.get(n, n)}") for n in attacks) + "</p>")
    captions = {"epsilon": "The one-run lower bound, the most this audit could show, the μ-GDP estimate and the claim.",
                "roc": "ROC curves on log axes; rates of zero are drawn at half the smallest resolvable rate.",
                "canaries": "Canary scores, split by the secret inclusion bit (shown after the guesses were made)."}
    for name in ("epsilon", "roc", "canaries"):
        if name in figs:
            out.append(f"<figure><img alt=\"{e(name)}\" src=\"data:image/png;base64,{figs[name]}\">"
                       f"<figcaption>{e(captions[name])}</figcaption></figure>")
    if r.get("client_level_audit"):
        c = r["client_level_audit"]
        out += ["<h2>Client-level audit (canary clients)</h2>", f"<p>{e(c['method'])}</p>", _html_kv(_client_level_rows(c))]
    out += [
        "<h2>Verdict</h2>",
        f"<p><span class=verdict style=\"background:{colour}\">{e(r['verdict'])}</span> {e(r.get('verdict_reason', ''))}</p>",
        "<h2>Limitations</h2><ul>", *[f"<li>{e(t)}</li>" for t in r.get("limitations", [])], "</ul>",
        "<p style=\"color:#57606a;font-size:.85em\">Machine-readable results: <code>audit.json</code>.</p>",
        "</body></html>",
    ]
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``audit.json``, ``audit.md`` and ``audit.html`` into ``out_dir`` (created if needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(result)
    paths = {"json": out_dir / JSON_NAME, "md": out_dir / MD_NAME, "html": out_dir / HTML_NAME}
    _write(paths["json"], json.dumps(clean, indent=2, allow_nan=False) + "\n")
    _write(paths["md"], render_markdown(clean))
    _write(paths["html"], render_html(clean))
    return paths
