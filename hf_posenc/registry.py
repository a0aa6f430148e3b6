"""The encodings, one registry entry per ``kind``: what each one is and what it can do.

Each encoding module (``hf_posenc/encodings/<name>.py``) defines its config class and its position module
and ends with one :func:`register` call. Everything else reads the entry instead of knowing the kind:
conversion builds the per-layer module and checks the compatibility rules with it, the attention
functions dispatch on its declared :class:`Capabilities` (through :func:`hf_posenc.kernels.select`),
and the model card, the CLI, the README table and the tests take their names and lists of kinds from
here. A capability names the method it relies on (:data:`REQUIRED_METHODS`), and :func:`register`
refuses an entry whose module lacks one, so a renamed method fails loudly instead of sending the
encoding down another kernel.

Adding a kind is its module, its reference test and its :func:`register` call (``CONTRIBUTING.md``); what
the shared tests need to know about it (a non-trivial config, the kernel it must take, its tolerances) is
the entry's :class:`Example`, so no test file keeps a per-kind list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: How the attention function applies an encoding: rotate q/k at attention time, add a score bias, hand
#: the whole attention to the module (it needs the logits), or hand it unrotated q/k to attend with RoPE at
#: two position sets (``two_position_rope``: Self-Extend, ReRoPE). None: the encoding adds nothing (NoPE).
ROUTES = ("rotate", "bias", "attend", "two_position_rope")
#: How a bias encoding gives its bias: a ``[1, H, q, kv]`` tensor only (``dense``), once per diagonal
#: (``diagonal``: shift-invariant), or per diagonal and constant beyond a band of distances (``banded``), or
#: ``[B|1, H, q, kv]`` per batch row from the whole call (``rows``: it reads the keys each query sees or the keys
#: themselves: FIRE's normaliser, FoX's gates).
BIAS_FORMS = ("dense", "diagonal", "banded", "rows")
#: Kernel families an encoding may declare (:func:`hf_posenc.kernels.select.select` picks one per call):
#: ``dense``: a materialised bias on eager/SDPA; ``diagonal_tiles``: causal tiles of per-diagonal biases;
#: ``key_fold``: a causal bias ``-m_h (i - j)`` folded into an extra head dimension (ALiBi); ``key_term_fold``: a
#: causal bias that is a differentiable per-key term up to a row constant, folded the same way (FoX);
#: ``row_tiles``: a ``rows`` bias computed tile by tile of query rows, recomputed in backward (FIRE); ``flex_rows``: a
#: ``rows`` bias that the module gives as a FlexAttention ``score_mod`` built from the call (``row_score_mod``: FoX's
#: per-key terms, FIRE's MLP).
KERNEL_FAMILIES = ("dense", "diagonal_tiles", "key_fold", "key_term_fold", "row_tiles", "flex_rows", "cope_triton")
#: The families an encoding of the attend route may declare: CoPE's own Triton kernel (CUDA).
ATTEND_KERNELS = ("cope_triton",)
#: The backends our attention functions implement (``hf_posenc_eager`` / ``hf_posenc_sdpa`` /
#: ``hf_posenc_flex_attention``).
OWN_BACKENDS = ("eager", "sdpa", "flex_attention")

#: What a declared capability calls on the position module: (capability, value) -> method names.
REQUIRED_METHODS: dict[tuple[str, str], tuple[str, ...]] = {
    ("route", "rotate"): ("rotate",),
    ("route", "bias"): ("bias",),
    ("route", "attend"): ("attend",),
    ("route", "two_position_rope"): ("near_and_far", "decode_keys", "far_positions"),
    ("bias_form", "diagonal"): ("bias_diagonals",),
    ("bias_form", "banded"): ("bias_diagonals", "banded_diagonals"),
    ("bias_form", "rows"): ("row_bias",),
    ("rotates", "True"): ("rotate",),
    ("kernel", "key_fold"): ("slopes",),
    ("kernel", "key_term_fold"): ("key_terms",),
    ("kernel", "row_tiles"): ("tile_bias",),
    ("kernel", "flex_rows"): ("row_score_mod",),
}


@dataclass(frozen=True)
class Capabilities:
    """What an encoding declares about itself; read by conversion and the kernel selector, never probed.

    Attributes:
        route: One of :data:`ROUTES`, or None (nothing to apply: NoPE).
        bias_form: One of :data:`BIAS_FORMS` (bias route only).
        needs_logits: The module computes the logits itself (no fused kernel); its ``attend`` also applies the
            layer's logit soft-capping (``softcap``, Gemma 2).
        causal_only: Only decoders can take it.
        tables: Names of the module's learned parameters (PEFT ``modules_to_save`` targets); checked on
            every module conversion builds.
        kernels: Kernel families of :data:`KERNEL_FAMILIES` it may run on (bias route; the attend route only
            those of :data:`ATTEND_KERNELS`).
        flush_denormals: Its far keys' weights underflow to denormals, which x86 computes slowly: the CPU
            kernels flush them to zero.
        extends_rope: It re-uses the model's own RoPE (frequencies, scaling, layout): refused on
            architectures without RoPE, and, like RoPE, it leaves natively RoPE-less layers without.
        patch_grid: Its positions are the 2-D patch grid of an image (RoPE-ViT): only architectures whose
            row records the grid (``Architecture.patch_grid``) take it, and its ``rotate`` receives
            ``(row, column)`` positions ``[n, 2]`` instead of sequence positions ``[n]``.
        rotates: A bias kind that also rotates q/k before attending (FoX keeping the model's RoPE): the dense
            kernels call its ``rotate`` as they do for the rotate route.
    """

    route: str | None = None
    bias_form: str | None = None
    needs_logits: bool = False
    causal_only: bool = False
    tables: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    flush_denormals: bool = False
    extends_rope: bool = False
    patch_grid: bool = False
    rotates: bool = False

    def required_methods(self) -> tuple[str, ...]:
        """Every method of the position module these capabilities rely on."""
        keys = [("route", self.route), ("bias_form", self.bias_form), *(("kernel", k) for k in self.kernels),
                ("rotates", str(self.rotates))]
        return tuple(dict.fromkeys(m for key in keys for m in REQUIRED_METHODS.get(key, ())))


@dataclass(frozen=True)
class LayerSpec:
    """What a position module is built from, for one converted attention layer.

    Attributes:
        num_heads: Query heads.
        head_dim: Per-head dimension.
        rope_parameters: The layer's own stock RoPE parameters (defaults on models without RoPE).
        max_position_embeddings: The model's context length.
        rope_layout: The architecture's native RoPE layout (``"half"`` or ``"interleaved"``).
        num_key_value_heads: Key/value heads (GQA; 0: as many as ``num_heads``).
    """

    num_heads: int
    head_dim: int
    rope_parameters: dict = field(default_factory=dict)
    max_position_embeddings: int = 0
    rope_layout: str = "half"
    num_key_value_heads: int = 0


@dataclass(frozen=True)
class Example:
    """A non-trivial configuration of a kind and what the shared tests expect of it (``tests/tiny_models.py``).

    Declared data, never computed from the code under test: a test compares the code against it.

    Attributes:
        params: ``PosEncConfig(kind=kind, **params)`` is the config the tests convert to; windows and tables
            smaller than the tests' 12-16 token sequences, so that every regime of the kind runs.
        prefill_kernels: The kernel a CPU sdpa prefill must take in (fp32, bf16), written down from the
            design (``tests/test_registry.py`` checks the selector against it); None: not checked.
        archs: The tiny architectures the save/reload tests put it on (the first one for the refusal test).
        positive_tables: Tables the tests randomise as ``|x| + 0.5`` instead of ``x``: parameters the paper
            keeps positive and away from 0, where a bias-free or distance-blind head would hide a gradient.
        grad_tol: Relative gradient tolerance in low precision, if above the shared one (None: shared).
        bf16_table_grad_tol: The same for its own tables' gradients in bf16 only (None: as ``grad_tol``).
        precision_tested: It runs in the bf16/fp16 matrix (``tests/test_dtypes.py``), whose tolerances were
            measured on it.
        fixed_tables: Tables the tests set to a value instead of randomising: a scale that must sit inside the
            tests' lengths for its gradient to mean anything (FIRE's threshold ``L``).
    """

    params: dict = field(default_factory=dict)
    prefill_kernels: tuple[str, str] | None = None
    archs: tuple[str, ...] = ("llama",)
    positive_tables: tuple[str, ...] = ()
    grad_tol: float | None = None
    bf16_table_grad_tol: float | None = None
    precision_tested: bool = True
    fixed_tables: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Encoding:
    """The registry entry of one kind.

    Attributes:
        kind: The ``PosEncConfig.kind`` tag.
        config_class: Its typed config (a ``PosEncConfig`` dataclass).
        module_class: Its per-layer ``PositionModule`` class (None: the kind attaches no module).
        build: ``build(config, layer: LayerSpec) -> module``, the module of one converted layer.
        capabilities: What it declares (:class:`Capabilities`).
        display_name: Human name (model cards, CLI help).
        paper: Link to the paper.
        backends: Stock backends a converted model may run: ours for every kind with a route; None: any.
        encoder_note: How it reads on an encoder, for the README table (``"symmetric"``); empty: as on decoders.
        check: Extra rule ``check(config, causal) -> reason or None`` (e.g. an even bucket count on encoders).
        causal_reason: Why it is causal-only (quoted in the refusal).
        example: A tested configuration and what the shared tests expect of it (:class:`Example`).
    """

    kind: str
    config_class: type
    module_class: type | None
    build: Callable[[Any, LayerSpec], Any] | None
    capabilities: Capabilities
    display_name: str
    paper: str
    backends: tuple[str, ...] | None = None
    encoder_note: str = ""
    check: Callable[[Any, bool], str | None] | None = None
    causal_reason: str = ""
    example: Example = field(default_factory=Example, hash=False)  # its params are a dict

    @property
    def needs_attention_function(self) -> bool:
        """Whether converted layers run our attention functions (every kind with a route)."""
        return self.capabilities.route is not None


_REGISTRY: dict[str, Encoding] = {}
_BY_MODULE: dict[type, Encoding] = {}


def _check(entry: Encoding) -> None:
    """Refuse an entry whose declarations are inconsistent or name methods its module lacks."""
    caps = entry.capabilities

    def bad(field_name: str, value, allowed) -> ValueError:
        return ValueError(f"Encoding(kind={entry.kind!r}): invalid {field_name}={value!r}; allowed: {allowed}.")

    if getattr(entry.config_class, "kind", None) != entry.kind:
        raise bad("config_class", entry.config_class, f"a PosEncConfig subclass with kind={entry.kind!r}")
    if caps.route is not None and caps.route not in ROUTES:
        raise bad("route", caps.route, f"None or one of {list(ROUTES)}")
    if (caps.route is None) != (entry.module_class is None and entry.build is None):
        raise bad("module_class", entry.module_class, "a module class and a build function exactly when route is set")
    if caps.route == "bias" and caps.bias_form not in BIAS_FORMS:
        raise bad("bias_form", caps.bias_form, f"one of {list(BIAS_FORMS)} for the bias route")
    if caps.route != "bias" and (caps.bias_form is not None or set(caps.kernels) - set(ATTEND_KERNELS)):
        raise bad("bias_form", caps.bias_form,
                  f"None, and no kernels outside the bias route but {list(ATTEND_KERNELS)} on the attend route")
    if caps.route != "attend" and set(caps.kernels) & set(ATTEND_KERNELS):
        raise bad("kernels", caps.kernels, f"{list(ATTEND_KERNELS)} only on the attend route")
    unknown = [k for k in caps.kernels if k not in KERNEL_FAMILIES]
    if unknown or (caps.route == "bias" and "dense" not in caps.kernels):
        raise bad("kernels", caps.kernels, f"families of {list(KERNEL_FAMILIES)}, 'dense' included (the fallback)")
    if caps.rotates and caps.route != "bias":
        raise bad("rotates", caps.rotates, "True only for the bias route (the rotate route rotates anyway)")
    if "diagonal_tiles" in caps.kernels and caps.bias_form in ("dense", "rows"):
        raise bad("kernels", caps.kernels, "'diagonal_tiles' only with bias_form 'diagonal' or 'banded'")
    if caps.needs_logits != (caps.route == "attend"):
        raise bad("needs_logits", caps.needs_logits, "True exactly for the attend route")
    if caps.patch_grid and caps.route != "rotate":
        raise bad("patch_grid", caps.patch_grid, "True only for the rotate route (grid positions rotate q/k)")
    if entry.backends is not None and not set(entry.backends) <= set(OWN_BACKENDS):
        raise bad("backends", entry.backends, f"None or a subset of {list(OWN_BACKENDS)}")
    if entry.needs_attention_function and entry.backends is None:
        raise bad("backends", None, f"the backends of our attention functions {list(OWN_BACKENDS)}")
    missing = [m for m in caps.required_methods() if not callable(getattr(entry.module_class, m, None))]
    if missing:
        raise ValueError(
            f"Encoding(kind={entry.kind!r}) declares capabilities that call {missing} but "
            f"{entry.module_class.__name__} has no such method(s): rename the declaration with the method, "
            "or the attention functions would fail on it."
        )


def register(entry: Encoding) -> Encoding:
    """Add an encoding to the registry (once per kind, from its own module).

    Raises:
        ValueError: The kind is already registered, or the entry is inconsistent (see :func:`check_entry`).
    """
    if entry.kind in _REGISTRY and _REGISTRY[entry.kind] is not entry:
        owner = _REGISTRY[entry.kind].config_class.__name__
        raise ValueError(f"kind={entry.kind!r} is already registered (by {owner}).")
    _check(entry)
    _REGISTRY[entry.kind] = entry
    if entry.module_class is not None:
        _BY_MODULE[entry.module_class] = entry
    return entry


def unregister(kind: str) -> Encoding:
    """Remove a kind from the registry (a test's temporary kind); returns its entry.

    Raises:
        ValueError: Unknown kind.
    """
    entry = get(kind)
    del _REGISTRY[kind]
    if entry.module_class is not None:
        _BY_MODULE.pop(entry.module_class, None)
    return entry


def check_entry(entry: Encoding) -> None:
    """Raise ValueError if ``entry`` is inconsistent or names methods its module lacks."""
    _check(entry)


def kinds() -> tuple[str, ...]:
    """Every registered kind, in registration order."""
    return tuple(_REGISTRY)


def entries() -> tuple[Encoding, ...]:
    """Every registry entry, in registration order."""
    return tuple(_REGISTRY.values())


def get(kind: str) -> Encoding:
    """The entry of ``kind``.

    Raises:
        ValueError: Unknown kind (the message lists the registered ones).
    """
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown positional encoding kind={kind!r}; allowed: {sorted(_REGISTRY)}.") from None


def entry_of(module) -> Encoding:
    """The entry of a position module instance (subclasses resolve to their registered base).

    Raises:
        TypeError: The module's class was never registered.
    """
    for cls in type(module).__mro__:
        entry = _BY_MODULE.get(cls)
        if entry is not None:
            return entry
    raise TypeError(f"{type(module).__name__} is not the module of a registered encoding; registered: "
                    f"{sorted(c.__name__ for c in _BY_MODULE)}.")
