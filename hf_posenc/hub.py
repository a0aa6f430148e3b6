"""Push converted models and LoRA adapters to the Hugging Face Hub with a model card, in one commit.

A push is two steps:

* :func:`plan_push` reads a folder written by ``save_pretrained`` and decides everything the commit
  will hold: the files, the ``huggingface_hub`` commit operations and the model card
  (:mod:`hf_posenc.cards`). It makes no request, so what a push would do can be inspected and tested
  without a Hub. Before anything is planned it checks:

  * a full model will load with the same encoding elsewhere: either it is a stock checkpoint (a
    native RoPE variant, as recorded at conversion in ``config.posenc_native``) or it carries
    ``auto_map`` and its remote-code files; a ``posenc`` entry on a stock ``model_type`` that is not
    native is refused, since stock transformers would silently load it without the encoding;
  * an adapter's base model is an hf_posenc-converted model (otherwise ``PeftModel.from_pretrained``
    would silently drop the position weights kept in ``modules_to_save``).

* :func:`execute_push` commits a plan with a single :meth:`huggingface_hub.HfApi.create_commit`
  (https://huggingface.co/docs/huggingface_hub/guides/upload#upload-files). The Hub applies a commit
  atomically, so a push that fails (network error, rejected token, invalid metadata) leaves the repo
  as it was. It refuses a repo that already holds a *different* model unless told to overwrite it.

:func:`push_to_hub` does both, for a model object or a folder, after checking that a token is
available (argument, ``HF_TOKEN``, or ``hf auth login``). ``peft``'s own card metadata
(``library_name: peft``, ``base_model:adapter:...`` tags) is merged into the card rather than
dropped, which ``PeftModel.push_to_hub`` would do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    get_token,
    hf_hub_download,
)
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from . import cards
from .architectures import MODEL_TYPE_PREFIX
from .config import CONFIG_KEY
from .convert import is_native_checkpoint
from .results import METRICS, EvalSummary, load_results, plot_results, records_from_rows, select_method

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
README = "README.md"

# Local-only clutter never worth uploading.
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}

# Config keys that identify which model a repo holds; a re-push that changes any of them is a
# different model and needs overwrite=True. Weights may change freely (a new fine-tune of the same model).
_MODEL_IDENTITY_KEYS = ("model_type", "architectures", "posenc", "hidden_size", "num_hidden_layers",
                        "num_attention_heads", "vocab_size")
_ADAPTER_IDENTITY_KEYS = ("peft_type", "base_model_name_or_path", "target_modules", "r", "modules_to_save")


_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class HubPushError(RuntimeError):
    """Base class of every push error; the message says what to do."""


class MissingTokenError(HubPushError):
    """No Hugging Face token was found."""


class RepoConflictError(HubPushError):
    """The target repo already holds a different model."""


class UnconvertedBaseError(HubPushError):
    """An adapter's base model was not converted with hf_posenc."""


class NotLoadableError(HubPushError):
    """The folder would not load back with its encoding (e.g. ``posenc`` on a stock model type)."""


class PushFailedError(HubPushError):
    """The upload failed (network, server or permission error); the remote was not changed."""


@dataclass(frozen=True)
class CardOptions:
    """What the model card says beyond what the checkpoint records.

    Attributes:
        base_model: Hub id of the model this was derived from, for the card's ``base_model``. For an
            adapter it is the converted base on the Hub, and it also replaces a local path in
            ``adapter_config.json``'s ``base_model_name_or_path`` so the adapter loads anywhere.
        results: Evaluation numbers of this model (one method; see :func:`~hf_posenc.results.select_method`).
        training: Training budget shown in the card (steps, tokens, sequence length, ...).
        datasets: Hub dataset ids for the card metadata.
        license: License id for the card metadata.
        tags: Extra tags.
        plot: Add the perplexity-by-length plot (``ppl_by_length.png``) when results have a metric to plot.
    """

    base_model: str | None = None
    results: EvalSummary | None = None
    training: Mapping[str, Any] | None = None
    datasets: Sequence[str] = ()
    license: str | None = None
    tags: Sequence[str] = ()
    plot: bool = True


@dataclass(frozen=True)
class CommitOptions:
    """Where and how :func:`execute_push` commits.

    Attributes:
        revision: Branch to commit to (created from ``main`` if missing); None: ``main``.
        create_pr: Open a pull request against ``revision`` instead of committing to it.
        message: Commit title; None: the plan's default, which names the encoding.
        description: Commit body.
        private: Create the repo private (ignored when it already exists, as on the Hub).
        overwrite: Replace a repo that holds a different model (its other files are deleted in the
            same commit).

    Raises:
        ValueError: ``create_pr`` with a pull-request ref as ``revision``.
    """

    revision: str | None = None
    create_pr: bool = False
    message: str | None = None
    description: str | None = None
    private: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.create_pr and self.revision is not None and self.revision.startswith("refs/pr/"):
            raise ValueError(f"revision={self.revision!r} is a pull request ref; with create_pr=True pass the target "
                             "branch (or None for main)")

    @property
    def branch(self) -> str:
        """The branch committed to, or that the pull request targets."""
        return self.revision or "main"


@dataclass(frozen=True)
class PushPlan:
    """Everything a push will commit, decided from local files alone (see :func:`plan_push`).

    Attributes:
        repo_id: The target repo as requested; a bare name gets its namespace when committed.
        kind: ``"model"`` or ``"adapter"``.
        uploads: Path in the repo -> local file or content: the folder's files (``adapter_config.json``
            rewritten when ``base_model`` replaces its base), then the plot and the card.
        card: The rendered card (``huggingface_hub.ModelCard``); ``uploads["README.md"]`` is its text.
        card_info: What the card was rendered from.
        identity: The config values that say which model this is; a repo holding other values holds a
            different model.
    """

    repo_id: str
    kind: str
    uploads: Mapping[str, Path | bytes]
    card: ModelCard
    card_info: cards.CardInfo
    identity: Mapping[str, Any]

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths the commit adds or replaces, sorted."""
        return tuple(sorted(self.uploads))

    @property
    def default_message(self) -> str:
        """The commit title when none is given: what is uploaded, and its encoding."""
        what = "LoRA adapter" if self.kind == "adapter" else "model"
        return f"Upload {what} ({cards.describe_encoding(self.card_info.posenc)}) with hf_posenc"

    def operations(self, delete: Iterable[str] = ()) -> list[CommitOperationAdd | CommitOperationDelete]:
        """The commit operations: an addition per upload, then a deletion per path of ``delete`` that
        no upload replaces (the remote files of a model being overwritten)."""
        adds = [CommitOperationAdd(path, source) for path, source in self.uploads.items()]
        return adds + [CommitOperationDelete(path) for path in sorted(delete) if path not in self.uploads]

    def for_repo(self, repo_id: str) -> PushPlan:
        """This plan for ``repo_id`` (the id the Hub resolved a bare name to): the card's loading
        snippet names it."""
        if repo_id == self.repo_id:
            return self
        info = dataclasses.replace(self.card_info, repo_id=repo_id)
        card = cards.render_card(info)
        uploads = {**self.uploads, README: str(card).encode()}
        return dataclasses.replace(self, repo_id=repo_id, uploads=uploads, card=card, card_info=info)


@dataclass(frozen=True)
class PushResult:
    """What a push produced.

    Attributes:
        repo_id: The repo, with the namespace the Hub resolved.
        commit_oid: The new commit (on ``revision``, or on the pull request).
        commit_url: Web URL of that commit.
        pr_url: The pull request, when ``create_pr=True``.
        revision: The branch the commit was made on or against.
        files: Paths in the commit.
        card: The rendered card (``README.md``).
    """

    repo_id: str
    commit_oid: str
    commit_url: str
    pr_url: str | None
    revision: str
    files: tuple[str, ...]
    card: ModelCard


def resolve_token(token: str | bool | None) -> str:
    """The token to push with: the argument, else ``HF_TOKEN``, else the ``hf auth login`` token file.

    See https://huggingface.co/docs/huggingface_hub/quick-start#authentication.

    Raises:
        MissingTokenError: If none is found, or ``token=False``.
    """
    if isinstance(token, str) and token:
        return token
    if token is not False:
        found = get_token()
        if found:
            return found
    raise MissingTokenError(
        "No Hugging Face token found, and pushing needs a token with write access. Pass token=..., "
        "set the HF_TOKEN environment variable, or run `hf auth login` (https://huggingface.co/settings/tokens)."
    )


def push_to_hub(
    model_or_folder: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    base_model: str | None = None,
    results: EvalSummary | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
    results_method: str | None = None,
    training: Mapping[str, Any] | None = None,
    datasets: Sequence[str] = (),
    license: str | None = None,
    tags: Sequence[str] = (),
    plot: bool = True,
    overwrite: bool = False,
    endpoint: str | None = None,
) -> PushResult:
    """Push a converted model or a LoRA adapter, with its model card, in one commit.

    The arguments fill a :class:`CardOptions` and a :class:`CommitOptions`; the push is
    :func:`plan_push` then :func:`execute_push`.

    Args:
        model_or_folder: A model converted with hf_posenc, a ``peft.PeftModel`` on one, or a folder
            written by their ``save_pretrained``.
        repo_id: ``"namespace/name"``, or ``"name"`` for the token owner's namespace.
        token: Write token; defaults to ``HF_TOKEN`` or the ``hf auth login`` token.
        private: Create the repo private (ignored when it already exists, as on the Hub).
        revision: Branch to commit to (created from ``main`` if missing); default ``main``.
        create_pr: Open a pull request instead of committing to ``revision`` directly.
        commit_message: Commit title; a default names the encoding.
        commit_description: Commit body.
        base_model: Hub id of the model this was derived from, for the card's ``base_model``. For
            an adapter it is the converted base on the Hub, and it also replaces a local path in
            ``adapter_config.json``'s ``base_model_name_or_path`` so the adapter loads anywhere.
        results: Evaluation numbers for the card: an :class:`~hf_posenc.results.EvalSummary`, a
            recipe's results file (CSV/JSON), or long-format rows (see :func:`~hf_posenc.results.records_from_rows`).
        results_method: The row of a comparison (a recipe variant) that is this model; required
            when ``results`` holds several methods.
        training: Training budget shown in the card (steps, tokens, sequence length, ...).
        datasets: Hub dataset ids for the card metadata.
        license: License id for the card metadata.
        tags: Extra tags.
        plot: Add the perplexity-by-length plot (``ppl_by_length.png``) when results exist.
        overwrite: Replace a repo that holds a different model (its other files are deleted in the
            same commit).
        endpoint: Hub URL; defaults to ``HF_ENDPOINT`` (huggingface.co).

    Returns:
        :class:`PushResult`.

    Raises:
        MissingTokenError: No token.
        NotLoadableError: The folder would not load back with its encoding.
        UnconvertedBaseError: An adapter whose base model is not converted with hf_posenc.
        RepoConflictError: ``repo_id`` holds a different model and ``overwrite`` is False.
        PushFailedError: The upload failed; nothing was committed.
        ValueError: Bad arguments (the message names the argument and the allowed values).
    """
    commit = CommitOptions(revision=revision, create_pr=create_pr, message=commit_message,
                           description=commit_description, private=private, overwrite=overwrite)
    _check_repo_id(repo_id)
    api = HfApi(endpoint=(endpoint or constants.ENDPOINT).rstrip("/"), token=resolve_token(token))
    card = CardOptions(base_model=base_model, results=_summary(results, results_method), training=training,
                       datasets=tuple(datasets), license=license, tags=tuple(tags), plot=plot)
    # A model object is saved to a scratch folder that must outlive the commit: the plan uploads its files.
    with tempfile.TemporaryDirectory(prefix="hf_posenc_push_") as scratch:
        folder, live_model = _materialise(model_or_folder, Path(scratch) / "saved")
        base_config = (_adapter_base_config(folder, live_model, api, base_model)
                       if _folder_kind(folder) == "adapter" else None)
        plan = plan_push(folder, repo_id, card, base_config=base_config)
        return execute_push(plan, api, commit)


def plan_push(
    folder: str | os.PathLike[str],
    repo_id: str,
    card: CardOptions | None = None,
    *,
    base_config: Mapping[str, Any] | None = None,
) -> PushPlan:
    """Decide what pushing ``folder`` to ``repo_id`` commits, without any request.

    Args:
        folder: A folder written by ``save_pretrained``: a converted model (``config.json``) or a PEFT
            adapter (``adapter_config.json``).
        repo_id: ``"namespace/name"``, or ``"name"`` for the token owner's namespace.
        card: What the card says beyond the checkpoint; default: nothing more.
        base_config: For an adapter, its base model's config (``config.json`` as a dict); default:
            read from ``card.base_model`` or ``base_model_name_or_path`` when either is a local folder.

    Returns:
        :class:`PushPlan`.

    Raises:
        NotLoadableError: The folder would not load back with its encoding.
        UnconvertedBaseError: An adapter whose base model is not converted with hf_posenc, or whose
            base config is neither given nor local.
        ValueError: Not a ``save_pretrained`` folder, or a bad ``repo_id``.
    """
    card = card or CardOptions()
    _check_repo_id(repo_id)
    folder = _existing_folder(folder)
    if _folder_kind(folder) == "adapter":
        checkpoint = _adapter_checkpoint(folder, repo_id, card.base_model, base_config)
    else:
        checkpoint = _model_checkpoint(folder, repo_id, card.base_model)
    info = dataclasses.replace(
        checkpoint.info, training=dict(card.training) if card.training else None, results=card.results,
        datasets=list(card.datasets), license=card.license, extra_tags=list(card.tags),
    )
    extra: dict[str, bytes] = {}
    plot = _plot_png(card.results) if card.plot else None
    if plot is not None:
        extra[cards.PLOT_FILENAME] = plot
        info = dataclasses.replace(info, plot_file=cards.PLOT_FILENAME)
    rendered = cards.render_card(info)
    extra[README] = str(rendered).encode()
    # Our card replaces the README save_pretrained wrote (peft's metadata is merged into it).
    uploads: dict[str, Path | bytes] = {
        rel: checkpoint.overrides.get(rel, path) for rel, path in _folder_files(folder) if rel not in extra
    }
    uploads.update(extra)
    return PushPlan(repo_id=repo_id, kind=checkpoint.kind, uploads=uploads, card=rendered, card_info=info,
                    identity=checkpoint.identity)


def execute_push(plan: PushPlan, api: HfApi, options: CommitOptions | None = None) -> PushResult:
    """Commit ``plan`` to the Hub in one commit, creating the repo (and branch) if needed.

    Args:
        plan: From :func:`plan_push`.
        api: A ``huggingface_hub.HfApi`` with the endpoint and a write token.
        options: Where and how to commit; default: to ``main``.

    Returns:
        :class:`PushResult`.

    Raises:
        RepoConflictError: The repo holds a different model and ``options.overwrite`` is False.
        PushFailedError: The upload failed; nothing was committed.
    """
    options = options or CommitOptions()
    endpoint = api.endpoint.rstrip("/")
    try:
        plan = plan.for_repo(api.create_repo(plan.repo_id, private=options.private, exist_ok=True).repo_id)
        stale = _stale_remote_files(api, plan, options)
        if options.branch != "main" and not options.branch.startswith("refs/pr/"):
            api.create_branch(plan.repo_id, branch=options.branch, exist_ok=True)
        with _commit_urls_parsed_against(endpoint):
            commit = api.create_commit(
                plan.repo_id,
                plan.operations(delete=stale),
                commit_message=options.message or plan.default_message,
                commit_description=options.description,
                revision=options.revision,
                create_pr=options.create_pr,
            )
    except HubPushError:
        raise
    except Exception as err:
        raise _explain(err, plan.repo_id, endpoint) from err
    return PushResult(
        repo_id=plan.repo_id,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
        revision=options.branch,
        files=plan.paths,
        card=plan.card,
    )


# ------------------------------------------------------------------------------------ plan helpers
class _Checkpoint(NamedTuple):
    """What a folder says about itself: its kind, its card, its identity, and files to rewrite."""

    kind: str
    info: cards.CardInfo
    identity: dict[str, Any]
    overrides: dict[str, bytes]  # path in repo -> content replacing the local file


def _check_repo_id(repo_id: Any) -> None:
    if not isinstance(repo_id, str) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id; expected 'namespace/name' or 'name'")


def _summary(results: Any, method: str | None) -> EvalSummary | None:
    """``results`` in any accepted form as one summary, restricted to ``method`` when given."""
    if results is None or isinstance(results, EvalSummary):
        summary = results
    elif isinstance(results, str | os.PathLike):
        summary = load_results(results)
    elif isinstance(results, Sequence):
        summary = EvalSummary(records_from_rows(results))
    else:
        raise ValueError(f"results must be an EvalSummary, a .csv/.json path, or a list of rows; "
                         f"got {type(results).__name__}")
    return select_method(summary, method) if summary is not None and method is not None else summary


def _existing_folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"model_or_folder={str(path)!r} is not a folder; pass a model or a save_pretrained folder")
    return path


def _materialise(model_or_folder: Any, scratch: Path) -> tuple[Path, Any]:
    """The folder to upload, saving a model object first. Returns (folder, model object or None)."""
    if isinstance(model_or_folder, str | os.PathLike):
        return _existing_folder(model_or_folder), None
    if not hasattr(model_or_folder, "save_pretrained"):
        raise ValueError(
            f"model_or_folder must be a transformers/peft model or a folder path, not {type(model_or_folder).__name__}"
        )
    scratch.mkdir(parents=True)
    model_or_folder.save_pretrained(str(scratch))
    return scratch, model_or_folder


def _folder_kind(folder: Path) -> str:
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        return "adapter"
    if (folder / CONFIG_FILE).is_file():
        return "model"
    raise ValueError(f"{folder} has neither {CONFIG_FILE} (a model) nor {ADAPTER_CONFIG_FILE} (a PEFT adapter); "
                     "was it written by save_pretrained?")


def _folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(path in repo, local file) of every file worth uploading, sorted."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part in _SKIP_DIRS for part in rel.parts):
            yield rel.as_posix(), path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _identity(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    out = {}
    for key in keys:
        value = config.get(key)
        out[key] = sorted(value) if isinstance(value, list) and key in ("target_modules", "modules_to_save") else value
    return out


def _plot_png(summary: EvalSummary | None) -> bytes | None:
    """The perplexity-by-length plot of ``summary`` as PNG bytes; None without a metric to plot."""
    if summary is None or not any(METRICS[m][2] for m in summary.metric_names()):
        return None
    with tempfile.TemporaryDirectory(prefix="hf_posenc_plot_") as scratch:
        return plot_results(summary, Path(scratch) / cards.PLOT_FILENAME).read_bytes()


def _model_checkpoint(folder: Path, repo_id: str, base_model: str | None) -> _Checkpoint:
    config = _read_json(folder / CONFIG_FILE)
    info = cards.CardInfo(
        repo_id=repo_id,
        base_model=base_model,
        posenc=config.get(CONFIG_KEY),
        native=_check_loadable(config, folder),
        architecture=(config.get("architectures") or [None])[0],
    )
    return _Checkpoint("model", info, _identity(config, _MODEL_IDENTITY_KEYS), {})


def _check_loadable(config: Mapping[str, Any], folder: Path) -> bool:
    """Refuse folders that would load back without their encoding; return whether stock transformers
    loads them as they are (no remote code)."""
    posenc = config.get(CONFIG_KEY)
    if posenc is not None and not isinstance(posenc, Mapping):
        raise NotLoadableError(f"config.json 'posenc' must be a dict with a 'kind', got {posenc!r}")
    model_type = str(config.get("model_type", ""))
    ours = model_type.startswith(MODEL_TYPE_PREFIX)
    native = is_native_checkpoint(config)
    if native is None:  # never converted: stock, unless it names remote code of its own
        native = not ours and "auto_map" not in config
    elif native and ours:
        raise NotLoadableError(
            f"config.json records a native (stock) checkpoint but has hf_posenc's model_type {model_type!r}; "
            "it was edited by hand. Save the converted model again with hf_posenc, then push again."
        )
    elif not native and not ours and "auto_map" not in config:
        raise NotLoadableError(
            f"config.json records posenc kind={posenc.get('kind')!r} on the stock model_type {model_type!r} "
            "without auto_map: stock transformers would load it WITHOUT that encoding. Save the converted "
            "model with hf_posenc (its save_pretrained writes auto_map and the remote-code files), then push again."
        )
    if ours or "auto_map" in config:
        _check_remote_code(config, folder)
    return native


def _check_remote_code(config: Mapping[str, Any], folder: Path) -> None:
    """Refuse a config whose ``auto_map`` names code that is not in ``folder``."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, Mapping) or not auto_map:
        raise NotLoadableError(
            f"config.json has the custom model_type {config.get('model_type')!r} but no auto_map, so "
            "from_pretrained(..., trust_remote_code=True) cannot find its code. "
            "Save it with hf_posenc's save_pretrained."
        )
    for ref in auto_map.values():
        for item in ref if isinstance(ref, list) else [ref]:
            if not item or "--" in item:
                continue  # code hosted in another repo ("repo--module.Class"), or a missing tokenizer slot
            module = item.rsplit(".", 1)[0]
            if not (folder / f"{module.replace('.', '/')}.py").is_file():
                raise NotLoadableError(
                    f"config.json auto_map names {item!r} but {module}.py is not in {folder}; the pushed repo "
                    "could not be loaded with trust_remote_code=True. Save it with hf_posenc's save_pretrained."
                )


def _adapter_checkpoint(folder: Path, repo_id: str, base_model: str | None,
                        base_config: Mapping[str, Any] | None) -> _Checkpoint:
    adapter_cfg = _read_json(folder / ADAPTER_CONFIG_FILE)
    if base_config is None:
        base_config = _local_base_config(adapter_cfg, base_model)
    if base_config is None:
        raise UnconvertedBaseError(
            f"the adapter's base model {adapter_cfg.get('base_model_name_or_path')!r} is not a local folder; pass "
            "base_config=<its config.json as a dict> to plan_push, or push with push_to_hub, "
            "which reads it from the Hub."
        )
    overrides = {}
    if base_model and adapter_cfg.get("base_model_name_or_path") != base_model:
        # A local path means nothing to whoever loads the adapter; the Hub id does.
        adapter_cfg["base_model_name_or_path"] = base_model
        overrides[ADAPTER_CONFIG_FILE] = (json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n").encode()
    info = _adapter_card_info(repo_id, adapter_cfg, base_config, folder, base_model)
    return _Checkpoint("adapter", info, _identity(adapter_cfg, _ADAPTER_IDENTITY_KEYS), overrides)


def _base_candidates(adapter_cfg: Mapping[str, Any], base_model: str | None) -> list[str]:
    return [c for c in (base_model, adapter_cfg.get("base_model_name_or_path")) if c]


def _local_base_config(adapter_cfg: Mapping[str, Any], base_model: str | None) -> dict[str, Any] | None:
    """The base model's config when the adapter names it by a local folder; None otherwise."""
    for name in _base_candidates(adapter_cfg, base_model):
        if (Path(name) / CONFIG_FILE).is_file():
            return _read_json(Path(name) / CONFIG_FILE)
    return None


def _adapter_card_info(repo_id: str, adapter_cfg: Mapping[str, Any], base_config: Mapping[str, Any], folder: Path,
                       base_model: str | None) -> cards.CardInfo:
    posenc = base_config.get(CONFIG_KEY)
    base_name = base_model or adapter_cfg.get("base_model_name_or_path")
    if not isinstance(posenc, Mapping) or "kind" not in posenc:
        raise UnconvertedBaseError(
            f"the adapter's base model {base_name!r} was not converted with hf_posenc (its config has no 'posenc'). "
            "An hf_posenc adapter must be trained on, and pushed for, a converted base: convert the base with "
            "hf_posenc.convert, push it, and pass its Hub id as base_model."
        )
    hub_base = (base_name if isinstance(base_name, str) and _HUB_REPO_ID.fullmatch(base_name)
                and not Path(base_name).exists() else None)
    return cards.CardInfo(
        repo_id=repo_id,
        base_model=hub_base,
        posenc=dict(posenc),
        native=bool(is_native_checkpoint(base_config)),
        architecture=(base_config.get("architectures") or [None])[0],
        adapter={
            "peft_type": adapter_cfg.get("peft_type"),
            "r": adapter_cfg.get("r"),
            "lora_alpha": adapter_cfg.get("lora_alpha"),
            "target_modules": sorted(adapter_cfg.get("target_modules") or []),
            "modules_to_save": list(adapter_cfg.get("modules_to_save") or []),
        },
        extra_metadata=_peft_card_metadata(folder),
    )


def _peft_card_metadata(folder: Path) -> dict[str, Any]:
    """The card metadata peft's ``save_pretrained`` wrote (library_name, base_model:adapter tags, ...),
    less what our card decides itself."""
    if not (folder / README).is_file():
        return {}
    metadata = ModelCard.load(folder / README, ignore_metadata_errors=True).data.to_dict()
    ours = ("base_model", "model-index", "eval_results", "model_name")
    return {k: v for k, v in metadata.items() if v is not None and k not in ours}


# ---------------------------------------------------------------------------------- Hub helpers
def _adapter_base_config(folder: Path, live_model: Any, api: HfApi, base_model: str | None) -> dict[str, Any]:
    """The config of the adapter's base model: from the live model, a local folder, or the Hub."""
    if live_model is not None and hasattr(live_model, "get_base_model"):
        return live_model.get_base_model().config.to_dict()
    adapter_cfg = _read_json(folder / ADAPTER_CONFIG_FILE)
    local = _local_base_config(adapter_cfg, base_model)
    if local is not None:
        return local
    for name in _base_candidates(adapter_cfg, base_model):
        if _HUB_REPO_ID.fullmatch(name):
            return _hub_config(name, api)
    raise UnconvertedBaseError(
        f"the adapter's base model {adapter_cfg.get('base_model_name_or_path')!r} is neither a local folder nor a Hub "
        "repo id; pass base_model=<Hub id of the hf_posenc-converted base>."
    )


def _hub_config(repo_id: str, api: HfApi) -> dict[str, Any]:
    """``config.json`` of a Hub repo, read into a throwaway cache."""
    try:
        with tempfile.TemporaryDirectory() as cache:
            path = hf_hub_download(repo_id, CONFIG_FILE, endpoint=api.endpoint, token=api.token, cache_dir=cache)
            return _read_json(Path(path))
    except Exception as err:
        raise UnconvertedBaseError(
            f"cannot read the adapter's base model config ({repo_id!r} on {api.endpoint}): {err}. Pass "
            "base_model=<Hub id of the hf_posenc-converted base> so the adapter can be checked."
        ) from err


def _stale_remote_files(api: HfApi, plan: PushPlan, options: CommitOptions) -> list[str]:
    """Refuse to push over a different model; return the remote files to delete when overwriting it."""
    try:
        info = api.model_info(plan.repo_id, revision=options.branch)
    except RevisionNotFoundError:
        info = api.model_info(plan.repo_id)  # a new branch starts from main
    remote = {s.rfilename for s in info.siblings or []}
    differences = _differences_from_remote(api, plan, info.sha, remote)
    if differences and not options.overwrite:
        raise RepoConflictError(
            f"{plan.repo_id} (revision {info.sha[:8] if info.sha else options.branch}) "
            "already holds a different model:\n  - "
            + "\n  - ".join(differences)
            + "\nPush to another repo id, or pass overwrite=True (CLI: --overwrite) to replace it."
        )
    return sorted(p for p in remote if p != ".gitattributes") if differences else []


def _differences_from_remote(api: HfApi, plan: PushPlan, sha: str | None, remote: set[str]) -> list[str]:
    """How the model at ``sha`` differs from the plan's (empty: the same model, or an empty repo)."""
    adapter = plan.kind == "adapter"
    ours, theirs = (ADAPTER_CONFIG_FILE, CONFIG_FILE) if adapter else (CONFIG_FILE, ADAPTER_CONFIG_FILE)
    if ours in remote:
        with tempfile.TemporaryDirectory() as cache:
            path = hf_hub_download(plan.repo_id, ours, revision=sha, endpoint=api.endpoint, token=api.token,
                                   cache_dir=cache)
            remote_identity = _identity(_read_json(Path(path)), list(plan.identity))
        return [f"{k}: remote {remote_identity[k]!r} != local {v!r}"
                for k, v in plan.identity.items() if remote_identity[k] != v]
    if theirs in remote:
        held, pushed = ("full model", "PEFT adapter") if adapter else ("PEFT adapter", "full model")
        return [f"the repo holds a {held} ({theirs}), you are pushing a {pushed}"]
    return []


# huggingface_hub 1.x parses the commit URL a commit answer carries (CommitInfo.__post_init__ ->
# RepoUrl(url)) against the process-wide constants.ENDPOINT, not against the HfApi's endpoint; 2.x
# passes the HfApi's endpoint along (CommitInfo._endpoint). So on 1.x a push with endpoint= other than
# HF_ENDPOINT makes its commit on the server and then raises "Unable to retrieve user and repo ID from
# the passed HF ID", which would be reported as a failed push although the commit exists.
_ENDPOINT_SWAP = threading.Lock()


def _commit_info_takes_an_endpoint() -> bool:
    """Whether this huggingface_hub builds a commit's repo URL with the HfApi's own endpoint (2.x)."""
    return any(f.name == "_endpoint" for f in dataclasses.fields(CommitInfo))


@contextlib.contextmanager
def _commit_urls_parsed_against(endpoint: str) -> Iterator[None]:
    """Make the client parse the commit URLs ``endpoint`` answers with, on every supported release.

    Feature-detected: a client whose ``CommitInfo`` takes an endpoint needs nothing. An older one reads
    ``constants.ENDPOINT`` while building the result, so it is set to ``endpoint`` for the duration of
    the commit (under a lock, restored afterwards). Every request of the commit goes to ``endpoint``
    anyway; only code on another thread that reads ``constants.ENDPOINT`` meanwhile would see it.
    """
    if _commit_info_takes_an_endpoint() or constants.ENDPOINT.rstrip("/") == endpoint:
        yield
        return
    with _ENDPOINT_SWAP:
        saved = constants.ENDPOINT
        constants.ENDPOINT = endpoint
        try:
            yield
        finally:
            constants.ENDPOINT = saved


def _explain(err: Exception, repo_id: str, endpoint: str) -> HubPushError:
    """Turn a huggingface_hub / httpx error into a message that says what happened and what to do."""
    note = "No commit was created: the Hub applies a commit all at once or not at all."
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        return PushFailedError(f"The Hub at {endpoint} rejected the token (401) while pushing to {repo_id}: "
                               f"check HF_TOKEN / `hf auth login`. {note}")
    if isinstance(err, HfHubHTTPError) and status == 403:
        return PushFailedError(f"The token may not write to {repo_id} (403 Forbidden): "
                               f"use a write token of that namespace. {note}")
    if isinstance(err, HfHubHTTPError):
        return PushFailedError(f"The Hub at {endpoint} answered HTTP {status} while pushing to {repo_id}: "
                               f"{err}. {note}")
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        return PushFailedError(f"The Hub rejected the model card metadata: {err}. {note}")
    module = type(err).__module__
    if module.startswith(("httpx", "httpcore")) or isinstance(err, OSError | ConnectionError | RuntimeError):
        return PushFailedError(
            f"Network failure while pushing to {repo_id} at {endpoint}: {type(err).__name__}: {err}. {note} "
            "Run the push again; LFS files that already reached the server are not sent twice."
        )
    return PushFailedError(f"Push to {repo_id} failed: {type(err).__name__}: {err}. {note}")
