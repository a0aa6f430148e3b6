"""Registered ``HfPosenc*`` config/model classes, so converted checkpoints reload converted.

For each supported architecture, ``hf_posenc_<type>`` is a ``model_type`` whose config class
subclasses the stock config and whose model classes subclass the stock ones, with an ``__init__``
that applies the recorded encoding after the stock one. The classes are made on demand from the
stock classes (growth stays M encodings + N architectures, no copied model files). They are
registered with the Auto classes when ``hf_posenc`` is imported (this adds names; stock models are
untouched), and their ``__module__`` is the tiny remote-code stub ``hf_posenc.modeling_hf_posenc``,
which ``save_pretrained`` copies next to the weights and names in ``auto_map``: with hf_posenc
installed, ``from_pretrained(folder, trust_remote_code=True)`` works without importing it first.
"""

from __future__ import annotations

import contextlib
import logging

import transformers
from transformers import AutoConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

from . import _hf, attention, plugin
from .architectures import ARCHITECTURES, MODEL_TYPE_PREFIX, architecture_of
from .config import CONFIG_KEY, PosEncConfig
from .encodings.base import PositionModule
from .encodings.rope import cache_is_stale
from .rules import validate

STUB_MODULE = "hf_posenc.modeling_hf_posenc"
CLASS_PREFIX = "HfPosenc"
#: ``hf-posenc convert --task`` -> (Auto class, transformers' table of stock class names per model_type).
#: Every head a stock architecture has in these tables is registered for its converted model_type, so a new
#: architecture row gets its heads without code; the base model comes first (``AutoModel`` maps to it).
TASKS = {
    "base": ("AutoModel", "MODEL_MAPPING_NAMES"),
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "sequence-classification": ("AutoModelForSequenceClassification",
                                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "token-classification": ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "question-answering": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    "multiple-choice": ("AutoModelForMultipleChoice", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
}
_AUTO_CLASSES = tuple((getattr(transformers, auto), getattr(modeling_auto, names)) for auto, names in TASKS.values())
_classes: dict[str, type] = {}


@contextlib.contextmanager
def _stock_checkpoint_expected(stock_type: str, own_type: str):
    """Drop transformers' "You are using a model of type `llama` to instantiate a model of type
    `hf_posenc_llama` ... can yield errors" warning, and only that one, while it is in effect."""

    # transformers >= 5.2x quotes the types in backticks, 5.1 does not.
    quoted = (f"of type `{stock_type}` to instantiate a model of type `{own_type}`",
              f"of type {stock_type} to instantiate a model of type {own_type}")

    def expected(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in quoted)

    logger = logging.getLogger(transformers.configuration_utils.__name__)
    logger.addFilter(expected)
    try:
        yield
    finally:
        logger.removeFilter(expected)


def _stock_names(names: dict, model_type: str) -> tuple[str, ...]:
    """The stock classes an Auto class maps ``model_type`` to: transformers names one, or several (DeiT's image
    classifiers, with and without the distillation head; the first is the default)."""
    value = names.get(model_type, ())
    return (value,) if isinstance(value, str) else tuple(value)


def auto_map(model_type: str, architectures=()) -> dict[str, str]:
    """The ``auto_map`` of a converted checkpoint of the stock ``model_type``: AutoConfig and every Auto
    class the architecture has, each to its ``HfPosenc`` class in the remote-code stub (where an Auto class
    has several, the one the checkpoint's ``architectures`` names)."""
    stub = STUB_MODULE.rpartition(".")[2]
    out = {"AutoConfig": f"{stub}.{CLASS_PREFIX}{CONFIG_MAPPING[model_type].__name__}"}
    saved = {name.removeprefix(CLASS_PREFIX) for name in architectures or ()}
    for auto, names in _AUTO_CLASSES:
        stock = _stock_names(names, model_type)
        if stock:
            chosen = next((name for name in stock if name in saved), stock[0])
            out[auto.__name__] = f"{stub}.{CLASS_PREFIX}{chosen}"
    return out


def posenc_config_class(base: type) -> type:
    """``HfPosenc<Config>``: the stock config class with ``model_type = "hf_posenc_<type>"``.

    It also lets ``output_attentions`` pair with ``hf_posenc_eager`` (transformers' own check knows only the
    literal ``"eager"``; ours returns the weights as well), and serialises an ``auto_map`` naming every Auto
    class of the architecture, whichever head was saved.
    """
    name = CLASS_PREFIX + base.__name__
    if name not in _classes:

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            # Reading the stock checkpoint a model was converted from is expected (PEFT's save does, to
            # compare vocabulary sizes): the subclass reads its parent's model_type by design.
            with _stock_checkpoint_expected(base.model_type, cls.model_type):
                return base.from_pretrained.__func__(cls, *args, **kwargs)

        stock_output_attentions = base.output_attentions

        def set_output_attentions(self, value):
            if value and self._attn_implementation == attention.EAGER:
                self._output_attentions = value
            else:
                stock_output_attentions.fset(self, value)

        def validate(self):
            # The stock save-time validation refuses output_attentions with any backend but "eager": show it
            # the stock name of ours while it runs (its other checks are unchanged).
            with _hf.stock_backend_name(self, attention.EAGER):
                base.validate(self)

        def to_dict(self):
            output = base.to_dict(self)
            output["auto_map"] = {**output.get("auto_map", {}), **auto_map(base.model_type, self.architectures)}
            return output

        namespace = {
            "model_type": MODEL_TYPE_PREFIX + base.model_type,
            "__module__": STUB_MODULE,
            "__doc__": f"{base.__name__} of a model converted by hf_posenc (encoding in `config.{CONFIG_KEY}`).",
            "_auto_class": "AutoConfig",
            "output_attentions": property(stock_output_attentions.fget, set_output_attentions,
                                          doc=stock_output_attentions.__doc__),
            "to_dict": to_dict,
            "from_pretrained": from_pretrained,
        }
        if hasattr(base, "validate"):  # strict configs (transformers 5.2x) validate at save time
            namespace["validate"] = validate
        _classes[name] = type(name, (base,), namespace)
    return _classes[name]


def _auto_class_name(base: type) -> str:
    for auto, names in _AUTO_CLASSES:
        if base.__name__ in _stock_names(names, base.config_class.model_type):
            return auto.__name__
    return "AutoModel"


def _loaded(module: PositionModule) -> bool:
    """Whether ``from_pretrained`` filled every parameter of this position module from the checkpoint."""
    params = list(module.parameters(recurse=False))
    return bool(params) and all(getattr(p, "_is_hf_initialized", False) for p in params)


def posenc_class(base: type) -> type:
    """``HfPosenc<Model>``: the stock model class whose ``__init__`` also applies ``config.posenc``."""
    if base.__name__.startswith(CLASS_PREFIX):
        return base
    name = CLASS_PREFIX + base.__name__

    if name not in _classes:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            posenc_dict = getattr(config, CONFIG_KEY, None)
            if not posenc_dict:
                source = getattr(config, "_name_or_path", "") or "this config"
                raise ValueError(
                    f"{name} needs `config.{CONFIG_KEY}` (the encoding), and {source} has none: it is a stock "
                    "checkpoint, not a converted one. To load a PEFT adapter trained on a model converted in "
                    "memory (e.g. with AutoPeftModelForCausalLM), load that base, convert it with the adapter's "
                    "encoding and call hf_posenc.load_adapter(base, adapter_dir). To build a converted model, "
                    "pass config=hf_posenc.patch_config(config, PosEncConfig(...))."
                )
            posenc = PosEncConfig.from_dict(posenc_dict)
            # A checkpoint's record gets the rules convert applies: layer indices in range, a kind the
            # architecture can run (otherwise it would run something else, e.g. NoPE on every layer).
            validate(posenc, config)
            # Undoing it returns to the stock classes of the architecture.
            plugin.install(self, posenc, architecture_of(config),
                           (stock_class(type(self)), stock_class(type(config))))

        def _init_weights(self, module):
            # New position tables must start as documented (zero = no-op), not as random values; tables
            # that the checkpoint provided are kept (transformers < 5.2x flags loaded parameters but
            # not their modules, so a module-level skip does not protect them).
            if isinstance(module, PositionModule):
                if not _loaded(module):
                    module.reset_parameters()
            else:
                base._init_weights(self, module)

        def _initialize_missing_keys(self, *args, **kwargs):
            # transformers initialises missing weights with the `_init_weights` of the nearest
            # PreTrainedModel, often the inner stock base model, which does not know our tables: reset
            # every position table that the checkpoint did not provide.
            base._initialize_missing_keys(self, *args, **kwargs)
            for module in self.modules():
                if isinstance(module, PositionModule) and not _loaded(module):
                    module.reset_parameters()

        def check_and_adjust_attn_implementation(self, requested, *args, **kwargs):
            # Called by `__init__` (so also by from_pretrained(attn_implementation=...)) and by
            # set_attn_implementation: map the stock names to ours, refuse what would drop the encoding.
            # transformers' default (None) is sdpa, or eager for a class without sdpa (Gemma 2): ours follows
            # that choice, or a plain from_pretrained(folder) would ask such a class for our sdpa function.
            if requested is None and not getattr(self, "_supports_sdpa", True):
                requested = "eager"
            return base._check_and_adjust_attn_implementation(
                self, attn_implementation_for(self.config, requested), *args, **kwargs)

        def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
            # Exact length-dependent RoPE: where the frequencies changed since the cache was written, the cached
            # keys/values of the upper layers are stale; empty the cache (same object, so a StaticCache stays
            # static) and feed the whole sequence, as recomputing without a cache would.
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if (cache is not None and input_ids is not None and kwargs.get("inputs_embeds") is None
                    and cache_is_stale(self, cache.get_seq_length(), input_ids.shape[-1])):
                _hf.empty_cache(cache)
                kwargs["next_sequence_length"] = None
            return base.prepare_inputs_for_generation(self, input_ids, *args, **kwargs)

        _hf.share_weight_conversions(base.__name__, name)
        _classes[name] = type(
            name,
            (base,),
            {
                "__init__": __init__,
                _hf.ATTN_IMPLEMENTATION_CHECK: check_and_adjust_attn_implementation,
                "_init_weights": _init_weights,
                "_initialize_missing_keys": _initialize_missing_keys,
                **({"prepare_inputs_for_generation": prepare_inputs_for_generation}
                   if hasattr(base, "prepare_inputs_for_generation") else {}),
                "config_class": posenc_config_class(base.config_class),
                "__module__": STUB_MODULE,
                "__doc__": (f"{base.__name__} with the positional encoding recorded in "
                            f"`config.{CONFIG_KEY}` (hf_posenc)."),
                "_auto_class": _auto_class_name(base),
            },
        )
    return _classes[name]


def stock_class(cls: type) -> type:
    """The stock transformers class an ``HfPosenc`` class was made from (``cls`` itself if stock)."""
    return next(c for c in cls.__mro__ if not c.__name__.startswith(CLASS_PREFIX))


def attn_implementation_for(config, requested: str | None) -> str | None:
    """The attention name a converted model runs when asked for ``requested``.

    Encodings that need an attention function of ours map ``eager``/``sdpa`` (and None, transformers'
    default) to ``hf_posenc_eager``/``hf_posenc_sdpa``; encodings that do not (NoPE) keep every stock backend
    and map ours back to the stock name.

    Raises:
        ValueError: A backend that cannot express the encoding (flash attention, flex attention, kernels).
    """
    posenc_dict = getattr(config, CONFIG_KEY, None)
    if not posenc_dict or not isinstance(requested, str | type(None)):
        return requested  # nothing recorded yet, or a per-sub-config dict: transformers decides
    posenc = PosEncConfig.from_dict(posenc_dict)
    ours = {value: key for key, value in attention.BACKENDS.items()}
    # A recorded encoding is a plug-in one (a native request leaves a stock config): its entry decides.
    if not posenc.needs_attention_function():
        return ours.get(requested, requested)
    requested = requested or "sdpa"
    if requested in ours:
        return requested
    if requested in attention.BACKENDS:
        return attention.BACKENDS[requested]
    allowed = sorted([*attention.BACKENDS, *ours])
    raise ValueError(
        f"attn_implementation={requested!r} cannot express the {posenc.kind!r} encoding of this hf_posenc model "
        f"(it needs an additive bias, the full logits, rotation or a temperature at attention time); "
        f"allowed: {allowed}."
    )


def class_by_name(name: str) -> type:
    """Resolve ``HfPosenc<StockClass>`` names (used by the remote-code stub and by pickling)."""
    if not name.startswith(CLASS_PREFIX):
        raise AttributeError(name)
    stock = getattr(transformers, name[len(CLASS_PREFIX):], None)
    if stock is None:
        raise AttributeError(f"{name}: transformers has no class {name[len(CLASS_PREFIX):]!r}")
    if issubclass(stock, transformers.PreTrainedConfig):
        return posenc_config_class(stock)
    return posenc_class(stock)


def register_model_type(model_type: str) -> type:
    """Register ``hf_posenc_<model_type>`` with AutoConfig and every Auto model class the architecture has
    (idempotent); returns its config class."""
    config_cls = posenc_config_class(CONFIG_MAPPING[model_type])
    if CONFIG_MAPPING._extra_content.get(config_cls.model_type) is not config_cls:
        # exist_ok: a rowless type's placeholder (_RowlessConfig) hands its place over.
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    _hf.share_weight_conversions(model_type, config_cls.model_type)
    for auto, names in _AUTO_CLASSES:
        stock = _stock_names(names, model_type)
        if not stock:
            continue
        # Several classes: transformers' Auto class picks the one the config's `architectures` names.
        model_cls = tuple(posenc_class(getattr(transformers, name)) for name in stock)
        if config_cls not in auto._model_mapping._extra_content:
            auto.register(config_cls, model_cls[0] if len(model_cls) == 1 else model_cls)
    return config_cls


class _RowlessConfig:
    """Holds AutoConfig's place for ``hf_posenc_<type>`` of a decoder without a table row, until transformers
    reads such a config: then it registers the real classes (:func:`register_model_type`) and hands over.

    Registering the real classes of every such decoder at import would import each one's modeling code
    (seconds); a converted checkpoint of any of them must still reload with only ``import hf_posenc``.
    """

    stock_type = ""
    model_type = ""

    def __new__(cls, *args, **kwargs):  # AutoConfig.for_model
        return register_model_type(cls.stock_type)(*args, **kwargs)

    @classmethod
    def from_dict(cls, *args, **kwargs):  # AutoConfig.from_pretrained
        return register_model_type(cls.stock_type).from_dict(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return register_model_type(cls.stock_type).from_pretrained(*args, **kwargs)


def register_auto_classes() -> None:
    """Register every ``hf_posenc_<type>`` with AutoConfig and the Auto model classes (idempotent): the rows'
    types now, the decoders without a row when a config of theirs is first read (:class:`_RowlessConfig`)."""
    for model_type in ARCHITECTURES:
        register_model_type(model_type)
    for model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        own = MODEL_TYPE_PREFIX + model_type
        if model_type in CONFIG_MAPPING_NAMES and own not in CONFIG_MAPPING:
            placeholder = type(f"_Rowless_{model_type}", (_RowlessConfig,), {"stock_type": model_type,
                                                                             "model_type": own})
            AutoConfig.register(own, placeholder)
