"""Supported architectures: one row per architecture, no per-architecture code.

Adding an architecture is one row of ``ARCHITECTURES`` plus tests (see CONTRIBUTING.md). What an
architecture cannot take is data too (:class:`Refusal`), so that conversion, the tests and the README
table all read the same rules. A Llama-like decoder without a row gets one read from its module tree
(:mod:`hf_posenc.module_tree`); a row in the table overrides that reading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from . import module_tree, registry


@dataclass(frozen=True)
class Refusal:
    """An encoding an architecture cannot take, when its config says so.

    Attributes:
        kinds: The refused ``PosEncConfig.kind`` values.
        when: A config attribute: the rule holds when it is set (not None/False/0); ``""``: always.
        why: The reason, quoted in the error (say what the architecture does that the encoding cannot).
        capability: Also refuse every kind that declares this boolean capability
            (``hf_posenc.registry.Capabilities``, e.g. ``"needs_logits"``), so a new kind is covered by its entry.
        except_kinds: Also refuse every kind not listed here (an allow-list: a new kind is refused until a row
            takes it and tests it).
    """

    kinds: tuple[str, ...]
    when: str
    why: str
    capability: str = ""
    except_kinds: tuple[str, ...] = ()

    def refuses(self, kind: str) -> bool:
        """Whether the rule names ``kind``, directly, through its declared capability or by not excepting it
        (config aside)."""
        if kind in self.kinds or (self.except_kinds and kind not in self.except_kinds):
            return True
        return bool(self.capability) and bool(getattr(registry.get(kind).capabilities, self.capability))

    def applies(self, kind: str, config) -> bool:
        return self.refuses(kind) and (not self.when or bool(getattr(config, self.when, None)))


@dataclass(frozen=True)
class NativeAlibi:
    """An ALiBi bias that the model adds itself, instead of RoPE, when its config says so (Falcon's ``alibi``).

    Attributes:
        config_flag: The config attribute that turns the bias on (and the model's RoPE off).
        model_flag: The base model's attribute that its forward reads (copied from the config at construction):
            a conversion sets it False on the instance, so the model adds no bias of its own.
        slope_dtype: The dtype the stock code rounds the slopes through (Falcon: ``"bfloat16"``).
        head_dim_scaled: Whether the stock bias is divided by ``sqrt(head_dim)`` (Falcon: yes).
    """

    config_flag: str
    model_flag: str
    slope_dtype: str = "float32"
    head_dim_scaled: bool = False

    def on(self, config) -> bool:
        """Whether a model built from ``config`` adds this bias."""
        return bool(getattr(config, self.config_flag, False))


@dataclass(frozen=True)
class Architecture:
    """Where the pieces of one transformers architecture live.

    Attributes:
        model_type: ``config.model_type``.
        layers: Path from the base model to the list of blocks.
        attention: Path from a block to the module that calls the attention function.
        rope: ``"native"`` (full-head RoPE), ``"native_partial"`` (RoPE honouring
            ``partial_rotary_factor``) or ``"none"``.
        absolute: Paths (from the base model) of learned absolute position embeddings to neutralise.
        causal: True for decoders, False for encoders (None: ``config.is_decoder`` decides).
        q_proj, k_proj: Names of the query/key projections in the attention module; for fused
            projections, the fused module name and ``fused`` says the row layout.
        fused: None, ``"neox"`` (rows ``[H, (q, k, v), D]``), ``"qkv"`` (rows ``[q: H*D | k: Hkv*D | v: Hkv*D]``,
            Phi-3, ModernBERT), ``"grouped"`` (rows ``[Hkv, (H/Hkv q heads, k, v), D]``, Falcon's new decoder) or
            ``"gpt2"`` (Conv1D columns ``[(q, k, v), H, D]``).
        fused_by: Where the fused layout depends on the config (Falcon): ``(config attribute, layout)`` pairs read
            in order, the first whose attribute is set gives the layout; ``fused`` when none is.
        qk_norms: Norms applied to q/k before RoPE; their weights follow RoPE layouts in blocks of
            ``head_dim`` whatever their width (per head, per head of a ``[H, D]`` weight, a ModuleList of
            per-head norms, or the whole projection as in OLMo 2: a norm over the whole projection is
            unchanged by a permutation applied to its input and its weight alike).
        lora_targets: Default LoRA target modules (the attention projections).
        rope_layout: The layout of the native RoPE (``"half"`` = rotate_half, ``"interleaved"`` = adjacent
            pairs as in GPT-J and Cohere); ``PosEncConfig(kind="rope")`` without a layout keeps it.
        nope_layers: Layers that natively have no RoPE, as ``(config attribute, value)``: layer ``i`` has none
            iff ``config.<attribute>[i] == value`` (SmolLM3 ``no_rope_layers``, Cohere 2's global layers). A
            RoPE request without ``layers`` leaves them without, so it stays the identity.
        rope_switch: ``(attention attribute, value of a RoPE layer)`` where each attention module turns its RoPE on
            or off from the ``nope_layers`` list alone and that list sets nothing else (SmolLM3: ``use_rope``, read
            from ``no_rope_layers``): any set of RoPE and NoPE layers is then a stock config. None: the list also
            sets other behaviour (Cohere 2's ``layer_types``: the sliding window) or there is none, so only the
            model's own set of RoPE layers is stock.
        rope_types: The ``rope_type`` values the stock config accepts (None: all); others run in the plug-in.
        rotary_dim: For a RoPE fixed in the model's code (GPT-J: base 10000, no ``rope_parameters`` in the config),
            the config attribute giving the number of rotated dimensions per head; only the model's own RoPE is
            then stock, any other request runs in the plug-in. None: the config's ``rope_parameters`` say.
        native_alibi: The model's own ALiBi, where its config can switch it on instead of RoPE (Falcon).
        rotary_pair: The order of the ``position_embeddings`` pair the attention module receives (GPT-J's is
            ``("sin", "cos")``): the identity rotation that neutralises native RoPE is built in this order.
        cache: False for encoder-only attention modules whose forward takes no KV cache at all.
        patch_grid: Image models: the path (from the base model) of the patch embedding's convolution, whose
            output ``[B, D, rows, columns]`` gives each forward's patch grid; ``absolute`` then names the learned
            table parameter of the image embeddings. None: a model of token sequences.
        refusals: Encodings this architecture cannot take, and why.
        interface_checked: Older transformers releases computed this architecture's attention in per-backend
            classes of its own instead of through ``AttentionInterface`` (GPT-J and Falcon on 5.5): where the
            installed release still does, the row is refused, since the plug-in's attention would never run.
        name: Display name (README table).
        notes: What the architecture does around attention that hf_posenc honours (README table).
    """

    model_type: str
    layers: str
    attention: str
    rope: str
    absolute: tuple[str, ...] = ()
    causal: bool | None = True
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    fused: str | None = None
    fused_by: tuple[tuple[str, str], ...] = ()
    qk_norms: tuple[str, ...] = ()
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    rope_layout: str = "half"
    nope_layers: tuple[str, object] | None = None
    rope_switch: tuple[str, object] | None = None
    rope_types: tuple[str, ...] | None = None
    rotary_dim: str | None = None
    rotary_pair: tuple[str, str] = ("cos", "sin")
    native_alibi: NativeAlibi | None = None
    cache: bool = True
    patch_grid: str | None = None
    refusals: tuple[Refusal, ...] = ()
    interface_checked: bool = False
    name: str = ""
    notes: str = ""

    def native_nope_layers(self, config) -> set[int]:
        """Indices of the layers without native RoPE (see ``nope_layers``)."""
        if self.nope_layers is None:
            return set()
        attribute, value = self.nope_layers
        return {i for i, v in enumerate(getattr(config, attribute) or ()) if v == value}

    def fused_layout(self, config) -> str | None:
        """The fused q/k/v layout of a model with this config (see ``fused`` and ``fused_by``)."""
        return next((layout for attribute, layout in self.fused_by if getattr(config, attribute, None)), self.fused)

    def has_native_rope(self, config) -> bool:
        """Whether a model with this config rotates by its own RoPE (not where its native ALiBi is on)."""
        return self.rope != "none" and not (self.native_alibi is not None and self.native_alibi.on(config))

    def refusal(self, kind: str, config) -> Refusal | None:
        """The first rule that refuses ``kind`` on a model with this config (None: allowed)."""
        return next((rule for rule in self.refusals if rule.applies(kind, config)), None)


_BERT_LIKE = dict(rope="none", absolute=("embeddings.position_embeddings",), causal=None, q_proj="query",
                  k_proj="key", lora_targets=("query", "key", "value"))

#: Image models take the encodings tested on their patch grids; 1-D kinds over the flattened patches would
#: ignore the rows of the image, and are refused until a row takes and tests them.
_PATCH_GRID_KINDS = Refusal(
    (), "", "an image model takes only the encodings tested on patch grids (rope_2d, nope); a 1-D encoding of the "
    "flattened patch sequence would not see the rows of the image", except_kinds=("nope", "rope_2d"),
)
_VIT_LIKE = dict(rope="none", absolute=("embeddings.position_embeddings",), causal=False, cache=False,
                 patch_grid="embeddings.patch_embeddings.projection", refusals=(_PATCH_GRID_KINDS,))

ARCHITECTURES: dict[str, Architecture] = {
    row.model_type: row
    for row in (
        Architecture("llama", layers="layers", attention="self_attn", rope="native", name="Llama"),
        Architecture("mistral", layers="layers", attention="self_attn", rope="native", name="Mistral",
                     notes="sliding window"),
        Architecture("qwen2", layers="layers", attention="self_attn", rope="native", name="Qwen2"),
        Architecture("qwen3", layers="layers", attention="self_attn", rope="native", qk_norms=("q_norm", "k_norm"),
                     name="Qwen3", notes="q/k norms"),
        Architecture(
            "phi", layers="layers", attention="self_attn", rope="native_partial",
            qk_norms=("q_layernorm", "k_layernorm"), lora_targets=("q_proj", "k_proj", "v_proj", "dense"),
            name="Phi", notes="partial rotary",
        ),
        Architecture(
            "gpt_neox", layers="layers", attention="attention", rope="native_partial",
            q_proj="query_key_value", k_proj="query_key_value", fused="neox",
            lora_targets=("query_key_value", "dense"), name="GPT-NeoX", notes="partial rotary, fused qkv",
        ),
        Architecture(
            "gptj", layers="h", attention="attn", rope="native_partial", rope_layout="interleaved",
            rotary_dim="rotary_dim", rotary_pair=("sin", "cos"), rope_types=("default",), interface_checked=True,
            lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"), name="GPT-J",
            notes="interleaved partial rotary (`rotary_dim`), base fixed in code",
        ),
        Architecture(
            "gpt2", layers="h", attention="attn", rope="none", absolute=("wpe",),
            q_proj="c_attn", k_proj="c_attn", fused="gpt2", lora_targets=("c_attn", "c_proj"), name="GPT-2",
        ),
        Architecture(
            "falcon", layers="h", attention="self_attention", rope="native", q_proj="query_key_value",
            k_proj="query_key_value", fused="neox",
            fused_by=(("new_decoder_architecture", "grouped"), ("multi_query", "qkv")),
            native_alibi=NativeAlibi("alibi", "use_alibi", slope_dtype="bfloat16", head_dim_scaled=True),
            interface_checked=True, lora_targets=("query_key_value", "dense"), name="Falcon",
            notes="fused qkv (grouped, multi-query or per head), native ALiBi (`alibi`) converts to the plug-in's",
        ),
        Architecture("bert", layers="encoder.layer", attention="attention.self", **_BERT_LIKE, name="BERT"),
        Architecture("gemma", layers="layers", attention="self_attn", rope="native", name="Gemma"),
        Architecture("gemma2", layers="layers", attention="self_attn", rope="native", name="Gemma 2",
                     notes="attention-logit soft-capping (CoPE caps its own logits), alternating sliding-window "
                           "layers; eager only (no stock sdpa)"),
        Architecture("gemma3_text", layers="layers", attention="self_attn", rope="native",
                     qk_norms=("q_norm", "k_norm"), name="Gemma 3 (text)",
                     notes="local/global RoPE bases per layer type, sliding-window layers, q/k norms"),
        Architecture("phi3", layers="layers", attention="self_attn", rope="native_partial", q_proj="qkv_proj",
                     k_proj="qkv_proj", fused="qkv", lora_targets=("qkv_proj", "o_proj"),
                     rope_types=("default", "longrope"),
                     name="Phi-3",
                     notes="fused qkv_proj, partial rotary"),
        Architecture("mixtral", layers="layers", attention="self_attn", rope="native", name="Mixtral",
                     notes="MoE (routing untouched)"),
        Architecture("qwen2_moe", layers="layers", attention="self_attn", rope="native", name="Qwen2-MoE",
                     notes="MoE, shared expert"),
        Architecture("qwen3_moe", layers="layers", attention="self_attn", rope="native",
                     qk_norms=("q_norm", "k_norm"), name="Qwen3-MoE", notes="MoE, q/k norms"),
        Architecture("olmo", layers="layers", attention="self_attn", rope="native", name="OLMo",
                     notes="q/k/v clipping"),
        Architecture("olmo2", layers="layers", attention="self_attn", rope="native", qk_norms=("q_norm", "k_norm"),
                     name="OLMo 2", notes="q/k norms over the whole projection"),
        Architecture("granite", layers="layers", attention="self_attn", rope="native", name="Granite",
                     notes="attention_multiplier is the logit scale"),
        Architecture("stablelm", layers="layers", attention="self_attn", rope="native_partial",
                     qk_norms=("q_layernorm", "k_layernorm"), name="StableLM",
                     notes="partial rotary, per-head q/k layer norms"),
        Architecture("starcoder2", layers="layers", attention="self_attn", rope="native", name="Starcoder2",
                     notes="sliding window"),
        Architecture("cohere", layers="layers", attention="self_attn", rope="native", rope_layout="interleaved",
                     qk_norms=("q_norm", "k_norm"), name="Cohere", notes="interleaved RoPE, [H, D] q/k norms"),
        Architecture("cohere2", layers="layers", attention="self_attn", rope="native", rope_layout="interleaved",
                     nope_layers=("layer_types", "full_attention"), name="Cohere 2",
                     notes="interleaved RoPE on sliding-window layers, global layers NoPE"),
        Architecture("smollm3", layers="layers", attention="self_attn", rope="native",
                     nope_layers=("no_rope_layers", 0), rope_switch=("use_rope", 1), name="SmolLM3",
                     notes="native NoPE layers (no_rope_layers)"),
        Architecture("roberta", layers="encoder.layer", attention="attention.self", **_BERT_LIKE, name="RoBERTa",
                     notes="position ids offset by padding_idx"),
        Architecture("xlm-roberta", layers="encoder.layer", attention="attention.self", **_BERT_LIKE,
                     name="XLM-RoBERTa", notes="position ids offset by padding_idx"),
        Architecture("camembert", layers="encoder.layer", attention="attention.self", **_BERT_LIKE,
                     name="CamemBERT", notes="position ids offset by padding_idx"),
        Architecture("electra", layers="encoder.layer", attention="attention.self", **_BERT_LIKE, name="ELECTRA",
                     notes="embedding projection"),
        Architecture("ernie", layers="encoder.layer", attention="attention.self", **_BERT_LIKE, name="ERNIE"),
        Architecture(
            "distilbert", layers="transformer.layer", attention="attention", rope="none",
            absolute=("embeddings.position_embeddings",), causal=False, q_proj="q_lin", k_proj="k_lin",
            lora_targets=("q_lin", "k_lin", "v_lin", "out_lin"), cache=False, name="DistilBERT",
        ),
        Architecture(
            "modernbert", layers="layers", attention="attn", rope="native", causal=False, q_proj="Wqkv",
            k_proj="Wqkv", fused="qkv", lora_targets=("Wqkv", "attn.Wo"), cache=False, name="ModernBERT",
            notes="global/local RoPE bases, local attention window, fused Wqkv",
        ),
        Architecture("vit", layers="layers", attention="attention", **_VIT_LIKE, name="ViT",
                     notes="CLS token unrotated"),
        Architecture("deit", layers="layers", attention="attention", **_VIT_LIKE, name="DeiT",
                     notes="CLS and distillation tokens unrotated"),
        Architecture("dinov2", layers="encoder.layer", attention="attention", **_VIT_LIKE, name="DINOv2",
                     notes="CLS token unrotated"),
        Architecture("dinov2_with_registers", layers="encoder.layer", attention="attention", **_VIT_LIKE,
                     name="DINOv2 with registers", notes="CLS and register tokens unrotated"),
    )
}

#: Prefix of the ``model_type`` of converted checkpoints that stock transformers cannot express.
MODEL_TYPE_PREFIX = "hf_posenc_"


def base_model_type(model_type: str) -> str:
    """``"hf_posenc_llama"`` -> ``"llama"``; stock types unchanged."""
    return model_type[len(MODEL_TYPE_PREFIX):] if model_type.startswith(MODEL_TYPE_PREFIX) else model_type


def architecture_of(config) -> Architecture:
    """The table row of a model config, or for a decoder without one, the row read from its module tree.

    Raises:
        ValueError: The architecture has no row and its module tree cannot be read unambiguously (the message
            names what was not found and lists the architectures with rows).
    """
    model_type = base_model_type(getattr(config, "model_type", "") or "")
    if model_type in ARCHITECTURES:
        row = ARCHITECTURES[model_type]
        if row.interface_checked and not module_tree.calls_attention_interface(model_type):
            raise ValueError(f"{row.name} on transformers {transformers.__version__} computes attention in its own "
                             "per-backend classes, not through AttentionInterface, so hf_posenc cannot run an "
                             f"encoding there; allowed: a transformers release whose {model_type} attention calls "
                             "AttentionInterface (5.25 is tested).")
        return row
    supported = (f"Unsupported architecture model_type={model_type!r}; hf_posenc supports: {sorted(ARCHITECTURES)} "
                 "(rows of hf_posenc/architectures.py, see CONTRIBUTING.md) and Llama-like transformers decoders "
                 "without a row")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(f"{supported}; transformers does not know this one.")
    # Keyed by the whole config: a flag can add modules (q/k norms) to the same model_type.
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _READ_ROWS:
        try:
            fields = module_tree.read_decoder(config, model_type)
        except module_tree.StructureError as error:
            raise ValueError(f"{supported}, whose module tree must show {error}: this one does not.") from None
        _READ_ROWS[key] = Architecture(model_type, **fields)
    return _READ_ROWS[key]


def find_architecture(config) -> Architecture | None:
    """:func:`architecture_of`, or None for an architecture hf_posenc cannot convert."""
    try:
        return architecture_of(config)
    except ValueError:
        return None


#: Rows read from module trees, by config (reading builds a meta-device model: done once per config).
_READ_ROWS: dict[str, Architecture] = {}


def is_causal(arch: Architecture, config) -> bool:
    return bool(config.is_decoder) if arch.causal is None else arch.causal


def lora_target_modules(model_or_config) -> list[str]:
    """Default LoRA targets (attention projections) for a model or config of a supported architecture."""
    config = getattr(model_or_config, "config", model_or_config)
    return list(architecture_of(config).lora_targets)


def _get(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def attention_modules(model, arch: Architecture) -> list:
    """The attention module of every block, in layer order.

    Raises:
        ValueError: This transformers version lays the model out otherwise than the row says (transformers
            5.24 rewrote the image models: ViT, DeiT and DINOv2 had ``encoder.layer[i].attention.attention``
            with ``query``/``key``/``value`` before).
    """
    import transformers

    try:
        modules = [_get(block, arch.attention) for block in _get(model.base_model, arch.layers)]
        for module in modules:
            _get(module, arch.q_proj)
    except AttributeError as error:
        raise ValueError(
            f"{arch.name}: transformers {transformers.__version__} lays {arch.model_type!r} out otherwise than "
            f"hf_posenc's row for it (blocks at `{arch.layers}`, attention at `{arch.attention}`, query projection "
            f"`{arch.q_proj}`: {error}); the row follows the layout of the transformers release it "
            "was written for, upgrade transformers (image rows: 5.24 or newer)."
        ) from None
    return modules
