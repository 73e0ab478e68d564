"""What to adapt and how: the LoLDU configuration, validated on construction (like PEFT's configs).

The keys, their enums and defaults are the adapter format's (python/loldu/adapter_spec.json, via
loldu.spec), which the C++ reader checks from the same description.
"""
import functools
import math
import re
import warnings
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Dict, List, Optional, Tuple, Union

import torch

from .errors import AdapterError
from .spec import (  # noqa: F401  (re-exported: the names other modules import from here)
    ALL_LINEAR,
    CONFIG_DEFAULTS,
    FACTOR_TORCH_DTYPES,
    FORMS,
    FULL_RANK,
    OMITTED_AT_DEFAULT,
    PARAMETRIZATIONS,
    PEFT_ALIASES,
    PIVOTINGS,
    STORAGES,
    TASK_HEADS,
    TASK_TYPES,
)

_FACTOR_DTYPES = FACTOR_TORCH_DTYPES


class _DefaultRank(int):
    """The default rank, told apart from an explicit rank of the same value (rank=8 together with r=4
    is a contradiction, not r=4)."""


def _as_float(v) -> float:
    """float(v), or inf for an int too large for a float (which math.isfinite would raise on)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _short(v) -> str:
    """repr(v), cut short (an int of 400 digits)."""
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:20]}...({len(r)} characters)"


# LoLDUConfig.suggested_lr per parametrization (docs/evaluation.md, "Choosing the defaults").
_SUGGESTED_LR = {"paper": 1e-2, "relative": 1e-2}

# PEFT's LoRA keywords a PEFT user types by habit -> what LoLDU has instead (LoLDUConfig refuses them
# with this text rather than a bare TypeError).
PEFT_ONLY = {
    "lora_alpha": "use alpha= (LoLDU's initial scale sigma0 = alpha / r; docs/method.md §1)",
    "lora_dropout": "LoLDU has no adapter dropout (the adapted layer runs the base layer's own input); leave it out",
    "bias": "LoLDU trains no biases; to train a layer's bias, list the layer in modules_to_save (trained and saved "
            "whole)",
    "lora_bias": "LoLDU trains no biases; list a layer in modules_to_save to train it whole",
    "inference_mode": "a config has no mode: loldu.load_adapter / LoLDUModel.from_pretrained load frozen for "
                      "inference by default (is_trainable=False)",
    "init_lora_weights": "LoLDU always starts at the base model (c = 0 at init; docs/method.md §1); pivoting= chooses "
                         "the factorization's pivots",
    "use_dora": "there is no DoRA variant of LoLDU",
    "use_rslora": "there is no rank-stabilized variant; sigma0= (or alpha=) sets the initial scale directly",
    "fan_in_fan_out": "not needed: transformers Conv1D layers are recognised and adapted in their own layout",
    "target_parameters": "LoLDU adapts modules (target_modules), not bare parameters",
    "exclude_modules": "there is no exclude list; use a regular expression target_modules (it must match the "
                       "whole module name)",
    "layer_replication": "there is no layer replication in LoLDU",
    "module_to_save": "did you mean modules_to_save= (a list of module names trained and saved whole)?",
    "modules_to_saves": "did you mean modules_to_save= (a list of module names trained and saved whole)?",
    "save_modules": "did you mean modules_to_save= (a list of module names trained and saved whole)?",
    "layer_to_transform": "did you mean layers_to_transform=?",
    "layer_pattern": "did you mean layers_pattern=?",
    "peft_type": "a LoLDUConfig is always LoLDU; leave it out",
    "base_model_name_or_path": "the adapter file records the base model's class and fingerprints its weights",
    "revision": "the adapter file records the base model's class and fingerprints its weights",
    "loftq_config": "there is no LoftQ initialisation in LoLDU",
    "megatron_config": "Megatron layers are not supported",
    "megatron_core": "Megatron layers are not supported",
}


def _refuse_peft_keywords(kwargs) -> None:
    """AdapterError for keywords LoLDUConfig does not take: LoLDU's equivalent of PEFT's, or the known names."""
    known = {f.name for f in fields(LoLDUConfig) if not f.name.startswith("_")} | set(PEFT_ALIASES)
    unknown = [k for k in kwargs if k not in known]
    if not unknown:
        return
    parts = [f"{k}: {PEFT_ONLY[k]}" if k in PEFT_ONLY else f"{k}: not an option" for k in unknown]
    raise AdapterError("LoLDUConfig: " + "; ".join(parts) + f" (LoLDUConfig's options: {', '.join(sorted(known))})")


def _is_rank(v) -> bool:
    """A positive int (not a bool) or FULL_RANK."""
    return v == FULL_RANK if isinstance(v, str) else isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_alpha(v) -> bool:
    """A finite nonzero number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(_as_float(v)) and v != 0


# The regular-expression syntax a rank_pattern / alpha_pattern key may use: the part that Python's `re` and
# ECMAScript (C++ std::regex, which re-resolves each layer's rank and scale from the saved config) read
# alike. Anything else (lookbehind, inline flags, named groups, \A, \Z, {,n}, possessive quantifiers,
# POSIX classes) is refused, so the two readers can never resolve a layer differently.
_PORTABLE_TOKEN = re.compile(r"""
    \\[dwsDWSbB] | \\[^A-Za-z0-9]            # class escapes, escaped punctuation
  | \[(?:\^)?(?:\\[dwsDWS]|\\[^A-Za-z0-9]|[^\\\[\]])+\]   # a character class without nesting or POSIX names
  | \((?:\?[:=!])? | \)                         # groups: plain, non-capturing, lookahead
  | (?:[*+?]|\{\d+(?:,\d*)?\})\??                  # a quantifier, lazy or not
  | [\w\-.^$|,:=!<>@#%&~'"/;`]                 # literals and anchors
""", re.X)


def _portable_key_problem(key: str) -> Optional[str]:
    """Why the pattern key `key` is not read alike by Python and C++, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "possible nested set": refused below anyway
            re.compile(key)
    except re.error:
        return "it is not a valid regular expression"
    pos, last = 0, "|"
    while pos < len(key):
        m = _PORTABLE_TOKEN.match(key, pos)
        if m is None:
            return f"its regular-expression syntax at {key[pos:pos + 6]!r} is not portable to the C++ reader"
        quant = m.group()[0] in "*+?{"
        if quant and (last in "*+?{(|" or last.endswith("?") and len(last) > 1):
            return f"the quantifier at {key[pos:pos + 6]!r} follows no atom it could repeat in both readers"
        pos, last = m.end(), m.group()
    return None


def key_matches(key: str, name: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key selects the module called `name` (PEFT's rule): equal,
    a '.'-suffix, or a regular expression matching it whole (a key that is no valid one is a plain name)."""
    if name == key or name.endswith("." + key):
        return True
    try:
        return re.fullmatch(key, name) is not None
    except re.error:
        return False


def _scale_refusal(s: float) -> Optional[str]:
    """Why the fp32 initial scale s cannot be used, or None: Inf gives NaN outputs at init, and 0 or a
    subnormal gives z (whose gradient is sigma times the layer's) a zero or vanishing gradient."""
    if not math.isfinite(s):
        return (f"overflows float32 (sigma is an fp32 parameter) to {s}, which makes every output NaN; use "
                f"|sigma0| <= {torch.finfo(torch.float32).max:.4g}")
    if abs(s) < torch.finfo(torch.float32).tiny:
        return (f"is {s!r} in float32 (zero or subnormal), so z would get a zero or vanishing gradient; use "
                f"|sigma0| >= {torch.finfo(torch.float32).tiny:.4g}")
    return None


def _as_list(v):
    """A tuple as a list and a set as a sorted list (stable to_dict output); anything else unchanged."""
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    return list(v) if isinstance(v, tuple) else v


@dataclass
class LoLDUConfig:
    """Configuration of one LoLDU adapter.

    Defaults: the paper's parametrization, sigma frozen; train with learning rate `suggested_lr`
    (1e-2 for everything the adapter trains, heads included: about 10x LoRA's habitual rates, at which
    LoLDU hardly moves; docs/evaluation.md, "Choosing the defaults").

    rank: number r of leading LDU components kept per adapted matrix (1 <= r <= min(d, k) of every
        targeted weight; checked per layer at inject time), or "full": min(d, k) of each layer, the
        paper's default (Shi et al., arXiv 2410.13618).
    target_modules: which modules to adapt, by their name in `model.named_modules()`. A str is a
        regular expression that must match the whole name; a list of str matches a module whose
        name equals an entry or ends with "." + entry (PEFT's rules).
    alpha: sets the initial scale sigma0 = alpha / rank, unless `sigma0` is given.
    sigma0: initial value of the scale sigma (overrides alpha / rank).
    train_scale: also train sigma (one number per layer). The paper trains only z.
    pivoting: "partial" (row pivoting, as torch.linalg.lu) or "none".
    factor_dtype: storage dtype of the frozen factors PL and U ("float32", "float64", "float16",
        "bfloat16"); None stores them in the base weight's dtype. The factorization itself always
        runs in fp32 (fp64 for fp64 weights) and c is always computed in fp32.
    form: how the adapted linear layers compute (docs/method.md §7): "delta" (base matmul plus the
        rank-r branch), "dense" (W = W0 + PL diag(c) U built once per call), or "auto" (the cheaper
        of the two for each call's shape, by the documented cost model). Same outputs and gradients.
    factor_storage: "full" keeps the frozen factors PL (d, r) and U (r, k); "cur" keeps only the two
        r x r triangles and reads the rest from W0 itself (r^2 numbers instead of r (d + k)); "lu"
        (rank = min(d, k) of every target, nn.Linear and Conv1D only) keeps the packed LU of W0 in
        place of W0: the memory and flops of the frozen layer (docs/storage.md).
    modules_to_save: modules (names or suffixes, as target_modules' list form) trained fully and
        stored whole in the adapter file: a task head such as a fresh `classifier`.
    task_type: PEFT's task names; "SEQ_CLS", "TOKEN_CLS" and "QUESTION_ANS" add the usual head
        names (TASK_HEADS) to modules_to_save, so a new head is trained and saved with the adapter.
        Other values ("CAUSAL_LM", "FEATURE_EXTRACTION", ...) are recorded and change nothing.
    parametrization: "paper" (the default): c = sigma z - sigma0 D with z trained from D (docs/method.md §1);
        "relative": c = (sigma / sigma0) D * z with z trained from 0, each pivot scaled by 1 + z_i, so
        the step on each component is relative to its pivot (docs/method.md §9). Same cost and file size.
    layers_to_transform: adapt only the targets in these layers (an int or a list of ints), as PEFT's
        option of that name: a target's layer is the first number in its name after `layers_pattern`
        ("model.layers.3.self_attn.q_proj" with layers_pattern "layers": 3), or without a pattern the
        first ".<name>.<number>." in it. Not with a regex target_modules (PEFT's rule).
    layers_pattern: the name (or names) of the module list holding the layers ("layers", "layer",
        "h", ...); only together with layers_to_transform.
    rank_pattern: per-layer ranks, PEFT's option: {key: rank or "full"}; a key selects a module whose
        name equals it or ends with "." + key, or that the key as a regular expression matches whole
        (an exact name wins, then the first key in order). Each key must select an adapted layer
        (AdapterError at inject: a typo would otherwise silently keep the default rank).
    alpha_pattern: per-layer alpha, matched as rank_pattern; sigma0 = alpha / r of each layer (not
        with sigma0, which sets every layer's scale).
    r: PEFT's spelling of `rank` (either may be given; both must then agree).

    PEFT's LoRA options (lora_alpha, lora_dropout, bias, use_dora, ...) are refused with an AdapterError
    that names LoLDU's equivalent, or says there is none (PEFT_ONLY).
    """

    rank: Union[int, str] = _DefaultRank(CONFIG_DEFAULTS["rank"])
    target_modules: Union[str, List[str], None] = CONFIG_DEFAULTS["target_modules"]
    alpha: float = CONFIG_DEFAULTS["alpha"]
    sigma0: Optional[float] = CONFIG_DEFAULTS["sigma0"]
    train_scale: bool = CONFIG_DEFAULTS["train_scale"]
    pivoting: str = CONFIG_DEFAULTS["pivoting"]
    factor_dtype: Optional[str] = CONFIG_DEFAULTS["factor_dtype"]
    form: str = CONFIG_DEFAULTS["form"]
    factor_storage: str = CONFIG_DEFAULTS["factor_storage"]
    modules_to_save: Optional[List[str]] = CONFIG_DEFAULTS["modules_to_save"]
    task_type: Optional[str] = CONFIG_DEFAULTS["task_type"]
    parametrization: str = CONFIG_DEFAULTS["parametrization"]
    layers_to_transform: Union[int, List[int], None] = CONFIG_DEFAULTS["layers_to_transform"]
    layers_pattern: Union[str, List[str], None] = CONFIG_DEFAULTS["layers_pattern"]
    rank_pattern: Optional[Dict[str, Union[int, str]]] = CONFIG_DEFAULTS["rank_pattern"]
    alpha_pattern: Optional[Dict[str, float]] = CONFIG_DEFAULTS["alpha_pattern"]
    r: InitVar[Optional[Union[int, str]]] = None
    _regex: Optional[re.Pattern] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self, r=None):
        self._check_rank(r)
        self._check_targets()
        for name in ("alpha", "sigma0"):
            v = getattr(self, name)
            if v is None and name == "sigma0":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(_as_float(v)):
                raise AdapterError(f"LoLDUConfig: {name} must be a finite number, got {_short(v)}")
        if self.sigma0 is None and self.alpha == 0:
            raise AdapterError("LoLDUConfig: alpha = 0 gives sigma0 = 0, which freezes the adapter at zero")
        self._check_patterns()
        if self.sigma0 is not None or isinstance(self.rank, int):
            self._check_initial_scale()
        if not isinstance(self.train_scale, bool):
            raise AdapterError(f"LoLDUConfig: train_scale must be a bool, got {self.train_scale!r}")
        self._check_choices()
        mts = _as_list([self.modules_to_save] if isinstance(self.modules_to_save, str) else self.modules_to_save)
        if mts is not None and not (isinstance(mts, list) and all(isinstance(t, str) and t for t in mts)):
            raise AdapterError(f"LoLDUConfig: modules_to_save must be None or a list of module names, got {mts!r}")
        self.modules_to_save = mts
        self._check_layers()

    def _check_layers(self) -> None:
        """layers_to_transform as a list of ints >= 0, layers_pattern as a list of names (PEFT's rules)."""
        lt = self.layers_to_transform
        if isinstance(lt, int) and not isinstance(lt, bool):
            lt = [lt]
        lt = _as_list(lt)
        if lt == []:
            lt = None  # PEFT: an empty list selects by name alone
        if lt is not None and not (isinstance(lt, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in lt)):
            raise AdapterError(f"LoLDUConfig: layers_to_transform must be None, an int or a list of ints in [0, 2**31), "
                               f"got {_short(self.layers_to_transform)}")
        lp = [self.layers_pattern] if isinstance(self.layers_pattern, str) else _as_list(self.layers_pattern)
        if lp is not None and not (isinstance(lp, list) and lp and all(isinstance(p, str) and p for p in lp)):
            raise AdapterError(f"LoLDUConfig: layers_pattern must be None, a name or a list of names, got {lp!r}")
        for p in lp or []:
            try:
                re.compile(p)  # a regular expression, as in PEFT
            except re.error as e:
                raise AdapterError(f"LoLDUConfig: layers_pattern {p!r} is not a valid regular expression ({e})") from None
        if lp is not None and lt is None:
            raise AdapterError("LoLDUConfig: layers_pattern is given without layers_to_transform (PEFT's rule: the "
                               "pattern only says where to read the layer number of layers_to_transform)")
        if lt is not None and isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            raise AdapterError("LoLDUConfig: layers_to_transform cannot be used with a regex target_modules (PEFT's "
                               "rule); put the layer numbers into the regular expression instead")
        self.layers_to_transform, self.layers_pattern = lt, lp

    def in_layers(self, module_name: str) -> bool:
        """Whether layers_to_transform keeps the module called `module_name` (True without it): PEFT's
        rule, the first layer number in the name after layers_pattern (or after any '.<name>.')."""
        if self.layers_to_transform is None:
            return True
        for pat in self.layers_pattern or [None]:
            m = re.match(r".*?\.[^.]*\.(\d+)\." if pat is None else rf"(?:^|.*?\.){pat}\.(\d+)\.", module_name)
            if m:
                return int(m.group(1)) in self.layers_to_transform
        return False

    def _check_rank(self, r) -> None:
        """rank, or PEFT's spelling r; an explicit rank (even the default's value) must agree with r."""
        explicit = type(self.rank) is not _DefaultRank
        if r is not None:
            if not _is_rank(r):
                raise AdapterError(f"LoLDUConfig: r (PEFT's name for rank) must be a positive int or {FULL_RANK!r}, "
                                   f"got {_short(r)}")
            if explicit and self.rank != r:
                raise AdapterError(f"LoLDUConfig: r={r} and rank={self.rank!r} disagree; give one of them")
            self.rank = r
        if not _is_rank(self.rank):
            raise AdapterError(f"LoLDUConfig: rank must be a positive int or {FULL_RANK!r} (min(d, k) of each layer), "
                               f"got {_short(self.rank)}")
        if not explicit:
            self.rank = int(self.rank)

    def _check_patterns(self) -> None:
        """rank_pattern: {key: positive int or "full"}; alpha_pattern: {key: finite number, nonzero};
        PEFT's empty dict means none. alpha_pattern cannot be combined with sigma0."""
        for key, valid, what in (("rank_pattern", _is_rank, f"a positive int or {FULL_RANK!r}"),
                                 ("alpha_pattern", _is_alpha, "a finite nonzero number")):
            pat = getattr(self, key)
            if pat is not None and not isinstance(pat, dict):
                raise AdapterError(f"LoLDUConfig: {key} must be None or a dict from module names to values, got "
                                   f"{_short(pat)}")
            for k, v in (pat or {}).items():
                if not isinstance(k, str) or not k:
                    raise AdapterError(f"LoLDUConfig: {key} keys must be non-empty module names, got {_short(k)}")
                problem = _portable_key_problem(k)
                if problem:
                    raise AdapterError(f"LoLDUConfig: {key} key {k!r}: {problem}; use a module name, a '.'-suffix or a "
                                       "plain regular expression (classes, groups, alternation, quantifiers)")
                if not valid(v):
                    raise AdapterError(f"LoLDUConfig: {key}[{k!r}] must be {what}, got {_short(v)}")
            setattr(self, key, dict(pat) if pat else None)
        if self.alpha_pattern and self.sigma0 is not None:
            raise AdapterError("LoLDUConfig: alpha_pattern cannot be combined with sigma0 (sigma0 sets every layer's "
                               "initial scale, so alpha_pattern would change nothing); give one of them")

    # -- per-layer rank and scale ---------------------------------------------------------------
    @property
    def per_layer(self) -> bool:
        """Whether ranks or scales may differ between layers (rank="full", rank_pattern or alpha_pattern)."""
        return not isinstance(self.rank, int) or bool(self.rank_pattern) or bool(self.alpha_pattern)

    def pattern_key(self, pattern: Optional[dict], name: str) -> Optional[str]:
        """The key of `pattern` (rank_pattern or alpha_pattern) that selects the module called `name`, or
        None: an equal name wins, then the first key that is a '.'-suffix of it or matches it whole
        as a regular expression."""
        if not pattern:
            return None
        if name in pattern:
            return name
        return next((k for k in pattern if key_matches(k, name)), None)

    def rank_for(self, name: str, shape: Tuple[int, ...], kind: str = "") -> int:
        """The rank of the layer called `name` whose weight is viewed as the (d, k) matrix `shape`:
        rank_pattern's value for it, else rank; "full" is min(d, k). AdapterError naming the layer
        and its shape when the rank exceeds min(d, k)."""
        key = self.pattern_key(self.rank_pattern, name)
        r = self.rank if key is None else self.rank_pattern[key]
        m = min(shape)
        if r == FULL_RANK:
            return m
        if r > m:
            src = f"rank_pattern[{key!r}] = {r}" if key is not None else f"rank {r}"
            raise AdapterError(f"layer '{name}': {src} exceeds min(d, k) = {m} of its {kind + ' ' if kind else ''}"
                               f"weight viewed as "
                               f"{tuple(shape)}; lower it or use {FULL_RANK!r}")
        return int(r)

    def alpha_for(self, name: str) -> float:
        """alpha_pattern's value for the layer called `name`, else alpha."""
        key = self.pattern_key(self.alpha_pattern, name)
        return self.alpha if key is None else self.alpha_pattern[key]

    def scale_for(self, name: str, rank: int) -> float:
        """The initial scale sigma0 of the layer called `name` at rank `rank`: sigma0, else
        alpha_for(name) / rank, rounded to fp32 (sigma is an fp32 parameter)."""
        if self.sigma0 is not None:
            return self.initial_scale
        alpha = self.alpha_for(name)
        s = float(torch.tensor(alpha / rank, dtype=torch.float32))
        why = _scale_refusal(s)
        if why is not None:
            raise AdapterError(f"layer '{name}': sigma0 = alpha / rank = {_short(alpha)} / {rank} {why}")
        return s

    def _check_targets(self) -> None:
        tm = self.target_modules = _as_list(self.target_modules)
        if tm == ALL_LINEAR:
            pass  # every linear layer but the output head (loldu.model.find_targets)
        elif isinstance(tm, str):
            if not tm:
                raise AdapterError("LoLDUConfig: target_modules is an empty regular expression")
            try:
                self._regex = re.compile(tm)
            except re.error as e:
                raise AdapterError(f"LoLDUConfig: target_modules {tm!r} is not a valid regular expression ({e})") from None
        elif isinstance(tm, list):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise AdapterError(f"LoLDUConfig: target_modules must be a non-empty list of non-empty names, got {tm!r}")
        elif tm is None:
            raise AdapterError("LoLDUConfig: target_modules is required: a list of module names or suffixes (e.g. "
                               f"['query', 'value']), a regular expression, or {ALL_LINEAR!r} (every linear layer but "
                               "the output head)")
        else:
            raise AdapterError(
                f"LoLDUConfig: target_modules must be a regex str or a list of module names/suffixes, got {tm!r}")

    def _check_choices(self) -> None:
        """The enum-valued keys (adapter_spec.json), factor_dtype also as a torch.dtype, task_type in any case."""
        if self.pivoting not in PIVOTINGS:
            raise AdapterError(f"LoLDUConfig: pivoting must be {' or '.join(map(repr, PIVOTINGS))}, got {self.pivoting!r}")
        if isinstance(self.factor_dtype, torch.dtype):
            names = {v: k for k, v in _FACTOR_DTYPES.items()}
            if self.factor_dtype not in names:
                raise AdapterError(
                    f"LoLDUConfig: factor_dtype must be one of {sorted(_FACTOR_DTYPES)}, got {self.factor_dtype}")
            self.factor_dtype = names[self.factor_dtype]
        fd = self.factor_dtype
        if fd is not None and (not isinstance(fd, str) or fd not in _FACTOR_DTYPES):  # a list is unhashable
            raise AdapterError(f"LoLDUConfig: factor_dtype must be None or one of {sorted(_FACTOR_DTYPES)}, got {fd!r}")
        for key, allowed in (("form", FORMS), ("factor_storage", STORAGES), ("parametrization", PARAMETRIZATIONS)):
            if getattr(self, key) not in allowed:
                raise AdapterError(f"LoLDUConfig: {key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        if self.task_type is not None:
            if not isinstance(self.task_type, str) or self.task_type.upper() not in TASK_TYPES:
                raise AdapterError(f"LoLDUConfig: task_type must be None or one of PEFT's {list(TASK_TYPES)}, "
                                   f"got {self.task_type!r}")
            self.task_type = self.task_type.upper()

    def _check_initial_scale(self) -> None:
        """sigma0 must be a normal fp32 number: Inf gives NaN outputs at init, and 0 or a subnormal
        gives z (whose gradient is sigma times the layer's) a zero or vanishing gradient. With an int
        rank and no sigma0, alpha_pattern's values are checked here too; the rest per layer (scale_for)."""
        s0 = self.sigma0
        alphas = [self.alpha] + ([] if s0 is not None else list((self.alpha_pattern or {}).values()))
        for alpha in alphas:
            how = "sigma0" if s0 is not None else f"sigma0 = alpha / rank = {_short(alpha)} / {self.rank}"
            s = float(torch.tensor(s0 if s0 is not None else alpha / self.rank, dtype=torch.float32))
            why = _scale_refusal(s)
            if why is not None:
                raise AdapterError(f"LoLDUConfig: {how} {why}")

    @property
    def saved_modules(self) -> List[str]:
        """modules_to_save together with the head names its task_type implies (TASK_HEADS), no repeats."""
        names = list(self.modules_to_save or [])
        for n in TASK_HEADS.get((self.task_type or "").upper(), ()):
            if n not in names:
                names.append(n)
        return names

    def matches_saved(self, module_name: str) -> bool:
        """Whether the module called `module_name` is one of saved_modules (name or '.'-suffix)."""
        return any(module_name == t or module_name.endswith("." + t) for t in self.saved_modules)

    @property
    def suggested_lr(self) -> float:
        """A learning rate that needs no grid: one rate for z, sigma and the saved heads, as
        transformers.Trainer applies its learning_rate (Adam/AdamW). 1e-2 in both parametrizations:
        measured on the demo's task at r = 8 on every linear, 3 epochs, 3 seeds, against 3e-3 (as good
        after 3 epochs, slower to get there) and 3e-2 (1-2 points worse); LoRA's habitual 1e-4 to 2e-4
        under-trains LoLDU (docs/evaluation.md, "Choosing the defaults").

        The relative form moves every pivot by about the same fraction per step, so the change of W grows
        with the rank: at rank >= 64 it suggests 1e-3, and at rank="full" 1e-4 (measured: 1e-2 diverged
        at full rank on every linear, on the encoder task and on SmolLM2; docs/evaluation.md)."""
        if self.parametrization == "relative":
            if self.rank == "full":
                return 1e-4
            if isinstance(self.rank, int) and self.rank >= 64:
                return 1e-3
        return _SUGGESTED_LR[self.parametrization]

    @property
    def initial_scale(self) -> float:
        """sigma0, rounded to fp32 so that sigma (an fp32 parameter) starts exactly equal to it. With
        per-layer ranks or alphas and no sigma0 there is no single value: scale_for gives each layer's."""
        if self.sigma0 is None and self.per_layer:
            raise AdapterError("LoLDUConfig.initial_scale: the initial scale alpha / r differs per layer (rank="
                               f"{self.rank!r}, rank_pattern or alpha_pattern); use LoLDUConfig.scale_for(name, rank) "
                               "or the layer's sigma0")
        s = self.sigma0 if self.sigma0 is not None else self.alpha / self.rank
        return float(torch.tensor(s, dtype=torch.float32))

    def torch_factor_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of PL and U for a base weight of `weight_dtype`."""
        return weight_dtype if self.factor_dtype is None else _FACTOR_DTYPES[self.factor_dtype]

    def matches(self, module_name: str) -> bool:
        """Whether a list or regex target_modules selects the module called `module_name`. 'all-linear'
        selects by module kind, not by name: loldu.targets.selector expands it for a model first."""
        if self.target_modules == ALL_LINEAR:
            raise AdapterError("LoLDUConfig.matches: target_modules='all-linear' selects by module kind, not by name; "
                               "expand it for a model with loldu.targets.selector")
        if self._regex is not None:
            return self._regex.fullmatch(module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def to_dict(self) -> dict:
        """JSON-serializable form (the "config" of an adapter file's stored config text)."""
        d = asdict(self)
        d.pop("_regex")
        for key in OMITTED_AT_DEFAULT:
            if d[key] == CONFIG_DEFAULTS[key]:
                d.pop(key)  # files stay readable by loldu versions without these options
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoLDUConfig":
        """Inverse of to_dict; unknown keys are an AdapterError (a file from a newer loldu)."""
        if not isinstance(d, dict):
            raise AdapterError(f"LoLDUConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")} - set(PEFT_ALIASES)
        unknown = set(d) - known
        if unknown:
            raise AdapterError(f"LoLDUConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)


def _refusing_init(dataclass_init):
    """The dataclass's __init__, with PEFT's keywords refused by name first (instead of a TypeError)."""
    @functools.wraps(dataclass_init)
    def __init__(self, *args, **kwargs):
        _refuse_peft_keywords(kwargs)
        dataclass_init(self, *args, **kwargs)
    return __init__


LoLDUConfig.__init__ = _refusing_init(LoLDUConfig.__init__)
