"""Run configuration: frozen dataclasses, validated on construction, loaded from ``configs/*.yaml``.

Every rule violation raises :class:`dpfed.errors.ConfigError` naming the parameter, the rule and
the value, before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from accounting.planning import epsilon_range_problem
from dpfed.errors import ConfigError
from dpfed.method_specs import METHOD_NAMES, method_spec, names_with

METHODS = METHOD_NAMES  # the registry's names (dpfed.method_specs; dpfed.methods holds the classes)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _finite_pos(name: str, v: float) -> None:
    _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
           f"{name} must be a finite number > 0, got {v!r}")


def _epsilon(name: str, v: float) -> None:
    """A finite epsilon > 0 within the range the accountants are measured on (accounting.planning.MAX_EPSILON)."""
    _finite_pos(name, v)
    problem = epsilon_range_problem(float(v))
    _check(problem is None, f"{name} {problem}, got {v!r}")


def _pos_int(name: str, v: int, minimum: int = 1) -> None:
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, f"{name} must be an integer >= {minimum}, got {v!r}")


def _label_tuple(raw: Any) -> tuple[str, ...]:
    """``data.labels`` as distinct label names (integers as their decimal form, the way data files' labels are read)."""
    _check(isinstance(raw, (list, tuple)), f"data.labels must be a list of at least 2 labels, got {raw!r}")
    names = []
    for v in raw:
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)
        _check((isinstance(v, str) and bool(v.strip())) or (isinstance(v, int) and not isinstance(v, bool)),
               f"data.labels must hold non-empty strings or integers, got {v!r}")
        names.append(str(v).strip())
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"data.labels must be distinct, got {dup[:1]} more than once")
    _check(len(names) >= 2, f"data.labels must name at least 2 labels, got {names}")
    return tuple(names)


DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt", ".parquet")


def is_local_path(source: str) -> bool:
    """Whether ``source`` looks like a file path rather than a hub dataset name.

    Local-looking: starts with ``/``, ``.`` or ``~``, contains a backslash or two or more ``/``,
    ends with a data-file suffix, or exists. A hub name is ``name`` or ``owner/name`` (one ``/``).
    Such a path is never looked up on the hub: a missing one is an error.
    """
    s = source.strip()
    return (s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") >= 2
            or s.lower().endswith(DATA_SUFFIXES) or Path(s).exists())


def resolve_data_paths(cfg: RunConfig) -> RunConfig:
    """``data.source`` and ``data.public_source`` as absolute paths when they are local files (before the config is written).

    A local-looking path that does not exist is a :class:`ConfigError`, never a hub lookup.
    """
    changes = {}
    for key in ("source", "public_source"):
        value = getattr(cfg.data, key)
        if value is None or value.startswith("embedded:") or not is_local_path(value):
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            where = "" if path.is_absolute() else f" (resolved from {Path.cwd()})"
            raise ConfigError(f"data.{key} must be an existing file (a path is never looked up on the Hugging Face hub), "
                              f"got '{value}'{where}")
        changes[key] = str(path.resolve())
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes)) if changes else cfg


TASKS = ("classification", "causal-lm", "instruct")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="embedded:all-minilm-l6-v2", metadata={"help": "embedded name, local folder or hub id"})
    task: str = field(default="classification", metadata={"help": "classification | causal-lm | instruct (prompt → response, "
                                                                  "loss on the response only, scored by generation)"})
    rank: int = field(default=8, metadata={"help": "adapter rank r (Fed-SB: R is r×r per layer; LoRA baselines: A r×d_in, B d_out×r)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA baselines: PEFT's lora_alpha, scaling alpha/r (default: alpha = r)"})
    target_modules: tuple[str, ...] | None = field(default=None, metadata={"help": "Linear layer names; default per family"})
    adapt_layers: tuple[int, ...] | None = field(default=None, metadata={"help": "layer indices to adapt (negative from the top); default all"})
    max_length: int = field(default=64, metadata={"help": "tokens per example after truncation"})
    prefix_cache: bool = field(default=True, metadata={"help": "cache frozen hidden states below the lowest adapted layer"})
    chat_template: bool = field(default=True, metadata={
        "help": "instruct: wrap each prompt/response in the tokenizer's chat template when it has one"})
    max_new_tokens: int = field(default=8, metadata={"help": "instruct: tokens greedily generated per held-out prompt"})
    prefix_dtype: str = field(default="float32", metadata={
        "help": "instruct: float32 | bfloat16, the precision of the frozen-prefix pass (once per record); bfloat16 "
                "is ~3x faster on CPUs with AMX/AVX512-BF16 and moves the cached states by ~1% (relative)"})

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), f"model.name must be a non-empty string, got {self.name!r}")
        _check(self.task in TASKS, f"model.task must be one of {list(TASKS)}, got {self.task!r}")
        _check(isinstance(self.chat_template, bool), f"model.chat_template must be true or false, got {self.chat_template!r}")
        _pos_int("max_new_tokens", self.max_new_tokens)
        _check(self.prefix_dtype in ("float32", "bfloat16"),
               f"model.prefix_dtype must be 'float32' or 'bfloat16', got {self.prefix_dtype!r}")
        _pos_int("rank", self.rank)
        if self.lora_alpha is not None:
            _finite_pos("lora_alpha", self.lora_alpha)
        _pos_int("max_length", self.max_length, 2)
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            _check(len(self.target_modules) > 0, "target_modules must name at least one module, got []")
        if self.adapt_layers is not None:
            object.__setattr__(self, "adapt_layers", tuple(int(i) for i in self.adapt_layers))


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="embedded:rotten_tomatoes", metadata={
        "help": "embedded name, local csv/tsv/json/jsonl/parquet file (stored absolute), or HF hub dataset name"})
    text_column: str = "text"
    label_column: str | None = "label"
    labels: tuple[str, ...] | None = field(default=None, metadata={
        "help": "the declared label set, in head-index order; default: the labels of the test split and the public "
                "data (never read from the private records), numbers sorted numerically"})
    test_fraction: float = field(default=0.15, metadata={"help": "held-out test split (never trained on)"})
    public_fraction: float = field(default=0.0, metadata={
        "help": "slice of source declared public (fits the head/init without DP, outside ε); 0 = none"})
    public_source: str | None = field(default=None, metadata={
        "help": "a file of records declared public (same columns); never private, never split"})
    drop_invalid: bool = field(default=False, metadata={
        "help": "drop records with an empty/NaN label or a null/empty text (counted) instead of refusing the file"})
    num_clients: int = 10
    partition: str = field(default="iid", metadata={"help": "iid | dirichlet"})
    dirichlet_alpha: float = 1.0
    max_examples: int | None = field(default=None, metadata={"help": "cap on records loaded (quick runs)"})
    canaries: int = field(default=0, metadata={"help": "audit canaries, each planted with probability 1/2 (dpfed audit)"})
    canary_kind: str = field(default="gradient", metadata={
        "help": "gradient (white-box Dirac canaries: fixed per-sample gradients) | random-words (input-space records)"})
    audit_holdout: int = field(default=0, metadata={"help": "records held out as attack non-members (default with canaries: min(500, 5%))"})
    canary_clients: int = field(default=0, metadata={"help": "client-level audit: canary clients, each in the population with probability 1/2"})
    # model.task instruct: each record becomes a prompt and a response (dpfed.instruct)
    prompt_column: str | None = field(default=None, metadata={"help": "instruct: column holding the prompt (or use template)"})
    template: str | None = field(default=None, metadata={
        "help": "instruct: the prompt built from named columns, e.g. 'Is this review positive or negative?\\n\\n{text}'"})
    response_column: str | None = field(default=None, metadata={"help": "instruct: column holding the response"})
    response_map: dict[str, str] | None = field(default=None, metadata={
        "help": "instruct: response text per value of response_column, e.g. {fresh: positive, rotten: negative}"})
    system_prompt: str | None = field(default=None, metadata={
        "help": "instruct: a system message before each prompt (chat template only); default: the template's own"})

    def __post_init__(self) -> None:
        _check(isinstance(self.source, str) and bool(self.source.strip()), f"data.source must be a non-empty string, got {self.source!r}")
        _check(self.public_source is None or (isinstance(self.public_source, str) and bool(self.public_source.strip())),
               f"data.public_source must be a file path or null, got {self.public_source!r}")
        _check(isinstance(self.drop_invalid, bool), f"data.drop_invalid must be true or false, got {self.drop_invalid!r}")
        if self.labels is not None:
            object.__setattr__(self, "labels", _label_tuple(self.labels))
        _check(0 < self.test_fraction < 1, f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        _check(0 <= self.public_fraction < 1 and self.test_fraction + self.public_fraction < 1,
               f"public_fraction must be in [0, 1 - test_fraction), got {self.public_fraction!r}")
        _pos_int("clients", self.num_clients)
        _check(self.partition in ("iid", "dirichlet"), f"partition must be 'iid' or 'dirichlet', got {self.partition!r}")
        _finite_pos("dirichlet_alpha", self.dirichlet_alpha)
        if self.max_examples is not None:
            _pos_int("max_examples", self.max_examples, 2)
        _pos_int("canaries", self.canaries, 0)
        _check(self.canaries == 0 or self.canaries >= 2, f"canaries must be 0 or >= 2, got {self.canaries}")
        _check(self.canary_kind in CANARY_KINDS, f"canary_kind must be one of {list(CANARY_KINDS)}, got {self.canary_kind!r}")
        _pos_int("audit_holdout", self.audit_holdout, 0)
        _pos_int("canary_clients", self.canary_clients, 0)
        _check(self.canary_clients != 1, "canary_clients must be 0 or >= 2, got 1")
        for key in ("prompt_column", "response_column", "system_prompt"):
            v = getattr(self, key)
            _check(v is None or (isinstance(v, str) and bool(v.strip())), f"data.{key} must be a non-empty string or null, got {v!r}")
        if self.template is not None:
            _check(isinstance(self.template, str) and bool(template_fields(self.template)),
                   f"data.template must be a string naming at least one column in braces, e.g. '{{text}}', got {self.template!r}")
        if self.response_map is not None:
            _check(isinstance(self.response_map, dict) and len(self.response_map) > 0,
                   f"data.response_map must be a non-empty mapping of column value to response, got {self.response_map!r}")
            m = {_map_key(k): v for k, v in self.response_map.items()}
            bad = [v for v in m.values() if not (isinstance(v, str) and v.strip())]
            _check(not bad, f"data.response_map values must be non-empty strings, got {bad[0]!r}" if bad else "")
            object.__setattr__(self, "response_map", m)

    @property
    def instruct_keys_set(self) -> list[str]:
        """The instruct-only keys that are set (they apply to model.task 'instruct' only)."""
        return [k for k in ("prompt_column", "template", "response_column", "response_map", "system_prompt")
                if getattr(self, k) is not None]


def template_fields(template: str) -> list[str]:
    """The column names a ``data.template`` refers to ('{text}' → ['text']); ConfigError if it is malformed."""
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"data.template must be a format string such as 'Review: {{text}}', got {template!r} ({exc})") from None
    _check(all(n and n.isidentifier() for n in names),
           f"data.template fields must be column names in braces (no positional '{{}}', no '{{a.b}}'), got {template!r}")
    return names


def _map_key(k: Any) -> str:
    """A response_map key as the label text it matches: integers (and integral floats) by their decimal form."""
    if isinstance(k, bool):
        return str(k).lower()
    if isinstance(k, float) and math.isfinite(k) and k == int(k):
        k = int(k)
    return str(k).strip()


INIT_STRATEGIES = ("public", "dp", "random")
CANARY_KINDS = ("random-words", "gradient")


@dataclass(frozen=True)
class InitConfig:
    strategy: str = field(default="random", metadata={"help": "public (from declared public data) | dp (accounted, from client data) | random (data-free)"})
    public_examples: int = field(default=512, metadata={"help": "public records used for the gradient-sign estimate"})
    lr: float = field(default=1e-3, metadata={"help": "lr_eff of the estimated first update ΔW ≈ -lr·sign(Σ∇W)"})
    head_epochs: int = field(default=30, metadata={"help": "LBFGS iterations fitting the head on public features"})
    head: str = field(default="random", metadata={"help": "classification head init: public (fit on the declared public data) | random"})
    dp_noise_multiplier: float = field(default=2.0, metadata={"help": "init dp: σ of each client's Gaussian release (noise σ·C)"})
    dp_clip: float = field(default=1.0, metadata={"help": "init dp: per-example clip C of the base-weight gradient (all adapted layers jointly)"})
    dp_batch_size: int = field(default=256, metadata={"help": "init dp: expected Poisson sample per client, q = b / n_client"})

    def __post_init__(self) -> None:
        _check(self.strategy in INIT_STRATEGIES, f"init must be one of {list(INIT_STRATEGIES)}, got {self.strategy!r}")
        _pos_int("init.public_examples", self.public_examples)
        _finite_pos("init.lr", self.lr)
        _pos_int("init.head_epochs", self.head_epochs, 0)
        _check(self.head in ("public", "random"), f"init.head must be 'public' or 'random', got {self.head!r}")
        _finite_pos("init.dp_noise_multiplier", self.dp_noise_multiplier)
        _finite_pos("init.dp_clip", self.dp_clip)
        _pos_int("init.dp_batch_size", self.dp_batch_size)


@dataclass(frozen=True)
class TrainConfig:
    method: str = "fed-sb"
    rounds: int = 3
    local_steps: int = 4
    batch_size: int = field(default=256, metadata={"help": "expected Poisson batch size b; q = b / n_client"})
    lr: float = 0.5
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adam (post-processing of the noised gradient)"})
    momentum: float = 0.0
    client_fraction: float = field(default=1.0, metadata={"help": "fraction of clients sampled per round"})
    weighting: str = field(default="size", metadata={"help": "size | uniform"})
    eval_batch_size: int = 256
    eval_examples: int | None = field(default=None, metadata={
        "help": "score only the first N records of the held-out test split (a random split already); default all. "
                "For instruct, greedy generation over the test prompts dominates the evaluation time"})

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method must be one of {list(METHODS)}, got {self.method!r}")
        _pos_int("rounds", self.rounds)
        _pos_int("local_steps", self.local_steps)
        _pos_int("batch_size", self.batch_size)
        _finite_pos("lr", self.lr)
        _check(self.optimizer in ("sgd", "adam"), f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        _check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum!r}")
        _check(0 < self.client_fraction <= 1, f"client_fraction must be in (0, 1], got {self.client_fraction!r}")
        _check(self.weighting in ("size", "uniform"), f"weighting must be 'size' or 'uniform', got {self.weighting!r}")
        _pos_int("eval_batch_size", self.eval_batch_size)
        if self.eval_examples is not None:
            _pos_int("eval_examples", self.eval_examples)


AGGREGATIONS = ("local", "secure")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 3.0
    delta: float = 1e-5
    clip: float = field(default=1.0, metadata={"help": "per-sample clipping norm C"})
    noise_multiplier: float | None = field(default=None, metadata={"help": "σ; calibrated from epsilon when unset"})
    unit: str = field(default="record", metadata={"help": "record (local DP-SGD) | client (DP-FedAvg, trusted server) | both"})
    client_clip: float = field(default=1.0, metadata={"help": "client-level: L2 clip S of each client's update (R and head delta)"})
    client_noise_multiplier: float | None = field(default=None, metadata={"help": "client-level σ_c; calibrated from client_epsilon when unset"})
    client_epsilon: float | None = field(default=None, metadata={"help": "client-level ε budget (server ledger, PRV upper bound)"})
    client_delta: float | None = field(default=None, metadata={"help": "client-level δ; default: delta; must be < 1/num_clients"})
    aggregation: str = field(default="local", metadata={
        "help": "local (each site adds the full noise to its own update) | secure (distributed DP: one DP-SGD step "
                "over all sites per round, each site adds a Skellam share, only the secure sum is seen)"})
    min_sites: int | None = field(default=None, metadata={
        "help": "secure: the noise is calibrated for at least this many surviving sites; a round with fewer is "
                "discarded. Default: the sites chosen per round"})

    def __post_init__(self) -> None:
        _check(self.aggregation in AGGREGATIONS,
               f"privacy.aggregation must be one of {list(AGGREGATIONS)}, got {self.aggregation!r}")
        if self.min_sites is not None:
            _pos_int("privacy.min_sites", self.min_sites)
        if self.enabled:
            _epsilon("epsilon", self.epsilon)
            _check(isinstance(self.delta, (int, float)) and 0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta!r}")
        _finite_pos("clip", self.clip)
        if self.noise_multiplier is not None:
            _finite_pos("noise_multiplier", self.noise_multiplier)
        _check(self.unit in ("record", "client", "both"), f"privacy.unit must be 'record', 'client' or 'both', got {self.unit!r}")
        _finite_pos("client_clip", self.client_clip)
        if self.client_noise_multiplier is not None:
            _finite_pos("client_noise_multiplier", self.client_noise_multiplier)
        if self.client_epsilon is not None:
            _epsilon("client_epsilon", self.client_epsilon)
        if self.client_delta is not None:
            _check(isinstance(self.client_delta, (int, float)) and 0 < self.client_delta < 1,
                   f"client_delta must be in (0, 1), got {self.client_delta!r}")
        if self.enabled and self.unit in ("client", "both"):
            _check(self.client_noise_multiplier is not None or self.client_epsilon is not None,
                   f"privacy.unit {self.unit!r} needs client_noise_multiplier or client_epsilon, got neither")

    @property
    def record_level(self) -> bool:
        return self.enabled and self.unit in ("record", "both")

    @property
    def client_level(self) -> bool:
        return self.enabled and self.unit in ("client", "both")

    @property
    def client_delta_value(self) -> float:
        return self.client_delta if self.client_delta is not None else self.delta


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    init: InitConfig = InitConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    seed: int | None = field(default=None, metadata={"help": "fixed seed for reproducibility; None = OS entropy"})
    device: str = "auto"

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        spec = method_spec(self.train.method)
        _check(self.init.strategy != "dp" or spec.server_init,
               f"init 'dp' estimates LoRA-SB's B and A and applies to method {', '.join(names_with('server_init'))} only, "
               f"got method {self.train.method!r}")
        _check(self.data.canary_clients == 0 or self.privacy.client_level,
               "data.canary_clients audits a client-level claim: it needs privacy.unit client or both, "
               f"got privacy.unit={self.privacy.unit!r}, privacy.enabled={self.privacy.enabled!r}")
        _check(not (self.data.canaries or self.data.canary_clients) or spec.auditable,
               f"data.canaries and data.canary_clients need method {', '.join(names_with('auditable'))}: dpfed audit "
               f"reads LoRA-SB runs only, got method {self.train.method!r}")
        _check(not self.privacy.client_level or spec.client_level_dp,
               f"privacy.unit client|both (DP-FedAvg) is implemented for method {', '.join(names_with('client_level_dp'))} "
               f"only, got method {self.train.method!r}")
        _check(self.init.strategy != "dp" or self.privacy.record_level,
               "init 'dp' needs record-level DP (its cost goes into each client's record-level ledger), "
               f"got privacy.unit={self.privacy.unit!r}, privacy.enabled={self.privacy.enabled!r}")
        if self.model.task == "instruct":
            d = self.data
            _check(d.response_column is not None,
                   "data.response_column must name the column holding the response for model.task 'instruct', got null")
            _check((d.prompt_column is None) != (d.template is None),
                   "model.task 'instruct' needs exactly one of data.prompt_column and data.template, got "
                   f"prompt_column={d.prompt_column!r}, template={d.template!r}")
            _check(not d.canaries or d.canary_kind == "gradient",
                   "data.canary_kind 'random-words' is not implemented for model.task 'instruct' (use the default "
                   f"'gradient': white-box canaries, independent of the text), got canaries={d.canaries}, "
                   f"canary_kind={d.canary_kind!r}")
            _check(d.public_source is None, "data.public_source is not used by model.task 'instruct' (it has no head and no "
                   f"public initialisation), got {d.public_source!r}")
            _check(self.init.strategy != "public" and self.init.head != "public",
                   "init 'public' (strategy or head) is not implemented for model.task 'instruct': use init.strategy random "
                   f"or dp and init.head random, got strategy={self.init.strategy!r}, head={self.init.head!r}")
        else:
            _check(not self.data.instruct_keys_set,
                   f"data.{', data.'.join(self.data.instruct_keys_set)} apply to model.task 'instruct' only, "
                   f"got model.task {self.model.task!r}")
        _check(self.init.strategy != "dp" or not self.privacy.client_level,
               "init 'dp' releases each site's noised gradient sum, protected per record but not per client (one "
               "site's whole data moves it without a client-level bound): use init 'random' or 'public' with "
               f"privacy.unit {self.privacy.unit!r}")

        if self.privacy.aggregation == "secure":
            self._check_secure()

    def sites_per_round(self) -> int:
        """How many sites the server chooses each round (fixed-size selection)."""
        return max(1, int(math.ceil(self.train.client_fraction * self.data.num_clients)))

    def min_sites(self) -> int:
        """``privacy.min_sites``, or the sites chosen per round."""
        return self.privacy.min_sites if self.privacy.min_sites is not None else self.sites_per_round()

    def _check_secure(self) -> None:
        """What ``privacy.aggregation: secure`` (one FedSGD step per round, Skellam shares) implements."""
        p, t = self.privacy, self.train
        _check(p.enabled, "privacy.aggregation 'secure' adds distributed DP noise: it needs privacy.enabled true "
               "(use aggregation 'local' with --no-dp for a non-private run), got privacy.enabled false")
        _check(p.unit == "record", "privacy.aggregation 'secure' protects records (record-level DP against everyone "
               f"who sees only the sum): it needs privacy.unit 'record', got {p.unit!r}")
        _check(t.method == "fed-sb", "privacy.aggregation 'secure' sums one gradient of R and the head per site, which "
               f"only Fed-SB's shared B, A make exact: it needs train.method 'fed-sb', got {t.method!r}")
        _check(t.local_steps == 1, "train.local_steps must be 1 with privacy.aggregation 'secure' (one DP-SGD step over "
               "all sites per round; several local steps per round are not compatible with this analysis), "
               f"got {t.local_steps}")
        _check(t.optimizer == "sgd" and t.momentum == 0.0, "privacy.aggregation 'secure' applies plain SGD on the "
               f"server: it needs train.optimizer 'sgd' and train.momentum 0, got {t.optimizer!r}, {t.momentum!r}")
        _check(self.init.strategy != "dp", "init 'dp' is not implemented with privacy.aggregation 'secure' yet, got "
               "init.strategy 'dp'")
        _check(not self.data.canaries and not self.data.canary_clients, "data.canaries (dpfed audit) are not "
               f"implemented with privacy.aggregation 'secure' yet, got canaries={self.data.canaries}")
        per_round = self.sites_per_round()
        _check(self.min_sites() <= per_round, f"privacy.min_sites must be <= the sites chosen per round ({per_round}), "
               f"got {self.min_sites()}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "init": InitConfig, "train": TrainConfig, "privacy": PrivacyConfig}


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig`; unknown keys are errors, not silently ignored."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            cls = _SECTIONS[key]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"config section '{key}' has unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
            try:
                kwargs[key] = cls(**value)
            except TypeError as exc:
                raise ConfigError(f"config section '{key}': {exc}") from None
        elif key in ("seed", "device"):
            kwargs[key] = value
        else:
            raise ConfigError(f"config has unknown section '{key}' (known: {', '.join([*_SECTIONS, 'seed', 'device'])})")
    return RunConfig(**kwargs)


def load(path: str | Path) -> RunConfig:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config must be a readable YAML file, got missing path '{p}'") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config must be a readable YAML file, got '{p}' ({type(exc).__name__})") from None
    return from_dict(raw or {})


def override(cfg: RunConfig, **changes: Any) -> RunConfig:
    """Return a copy with ``section.key`` changes applied (``None`` values are skipped).

    ``data.labels`` describes ``data.source``: a change of source without new labels drops them.
    """
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for dotted, value in changes.items():
        if value is None:
            continue
        if "." in dotted:
            sec, key = dotted.split(".", 1)
            sections.setdefault(sec, {})[key] = value
        else:
            top[dotted] = value
    data = sections.get("data", {})
    if "source" in data and data["source"] != cfg.data.source and "labels" not in data:
        data["labels"] = None
    new = {name: dataclasses.replace(getattr(cfg, name), **kw) for name, kw in sections.items()}
    return dataclasses.replace(cfg, **new, **top)


def to_yaml(cfg: RunConfig) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)
