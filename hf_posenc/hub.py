"""Push converted models and LoRA adapters to the Hugging Face Hub with a model card, in one commit.

:func:`push_to_hub` takes a model (converted with hf_posenc, or a ``peft.PeftModel`` around one) or a
folder written by ``save_pretrained``, renders its card (:mod:`hf_posenc.cards`), and uploads the
folder plus the card with a single :meth:`huggingface_hub.HfApi.create_commit`
(https://huggingface.co/docs/huggingface_hub/guides/upload#upload-files). The Hub applies a commit
atomically, so a push that fails (network error, rejected token, invalid metadata) leaves the repo as
it was. Before anything is uploaded the push checks:

* a token is available (argument, ``HF_TOKEN``, or ``hf auth login``);
* a full model will load with the same encoding elsewhere: either it is a stock checkpoint (native
  RoPE variants in ``rope_parameters``) or it carries ``auto_map`` and its remote-code files;
  a ``posenc`` entry on a stock ``model_type`` is refused, since stock transformers would silently
  load it without the encoding;
* an adapter's base model is an hf_posenc-converted model (otherwise ``PeftModel.from_pretrained``
  would silently drop the position weights kept in ``modules_to_save``);
* the target repo does not already hold a *different* model (pass ``overwrite=True`` to replace it).

``peft``'s own card metadata (``library_name: peft``, ``base_model:adapter:...`` tags) is merged into
the card rather than dropped, which ``PeftModel.push_to_hub`` would do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import cards

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
README = "README.md"

# Local-only clutter never worth uploading.
_SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}

# Config keys that identify which model a repo holds; a re-push that changes any of them is a
# different model and needs overwrite=True. Weights may change freely (a new fine-tune of the same model).
_MODEL_IDENTITY_KEYS = ("model_type", "architectures", "posenc", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_ADAPTER_IDENTITY_KEYS = ("peft_type", "base_model_name_or_path", "target_modules", "r", "modules_to_save")


_REPO_ID = re.compile(r"(?:\w[\w.-]*/)?\w[\w.-]*")


def missing_local_folder(source: str | os.PathLike) -> bool:
    """Whether ``source`` can only mean a local path (it is no Hub repo id) and nothing exists there.

    Loaders that take "a folder or a Hub id" otherwise report such a path as an invalid repo id.
    """
    text = os.fspath(source)
    return not Path(text).expanduser().exists() and not _REPO_ID.fullmatch(text)


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
    card: Any


def resolve_token(token: str | bool | None) -> str:
    """The token to push with: the argument, else ``HF_TOKEN``, else the ``hf auth login`` token file.

    See https://huggingface.co/docs/huggingface_hub/quick-start#authentication.

    Raises:
        MissingTokenError: If none is found, or ``token=False``.
    """
    if isinstance(token, str) and token:
        return token
    if token is not False:
        from huggingface_hub import get_token

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
    results: cards.EvalSummary | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | None = None,
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
        results: Evaluation numbers for the card: an :class:`~hf_posenc.cards.EvalSummary`, a
            recipe's results file (CSV/JSON), or long-format rows (see :func:`cards.records_from_rows`).
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
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

    if create_pr and revision is not None and revision.startswith("refs/pr/"):
        raise ValueError(f"revision={revision!r} is a pull request ref; with create_pr=True pass the target branch (or None for main)")
    if not isinstance(repo_id, str) or not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id; expected 'namespace/name' or 'name'")
    token = resolve_token(token)
    summary = _as_summary(results)
    if summary is not None and results_method is not None:
        summary = cards.select_method(summary, results_method)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)

    with tempfile.TemporaryDirectory(prefix="hf_posenc_push_") as scratch:
        folder, live_model = _materialise(model_or_folder, Path(scratch) / "saved")
        kind = _folder_kind(folder)
        overrides: dict[str, bytes] = {}  # path in repo -> content replacing the local file
        if kind == "adapter":
            adapter_cfg = _read_json(folder / ADAPTER_CONFIG_FILE)
            if base_model and adapter_cfg.get("base_model_name_or_path") != base_model:
                # A local path means nothing to whoever loads the adapter; the Hub id does.
                adapter_cfg["base_model_name_or_path"] = base_model
                overrides[ADAPTER_CONFIG_FILE] = (json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n").encode()
            base_config = _adapter_base_config(adapter_cfg, live_model, folder, api, token, base_model)
            info = _adapter_card_info(repo_id, adapter_cfg, base_config, folder, base_model)
            identity = _identity(adapter_cfg, _ADAPTER_IDENTITY_KEYS)
        else:
            config = _read_json(folder / CONFIG_FILE)
            native = _check_loadable(config, folder)
            info = cards.CardInfo(
                repo_id=repo_id,
                base_model=base_model,
                posenc=config.get("posenc"),
                native=native,
                original_encoding=_original_encoding(config),
                architecture=(config.get("architectures") or [None])[0],
            )
            identity = _identity(config, _MODEL_IDENTITY_KEYS)
        info.training = dict(training) if training else None
        info.results = summary
        info.datasets = list(datasets)
        info.license = license
        info.extra_tags = list(tags)

        extra_files: dict[str, bytes] = {}
        if summary is not None and plot and any(cards.METRICS[m][2] for m in summary.metric_names()):
            plot_path = cards.plot_results(summary, Path(scratch) / cards.PLOT_FILENAME)
            extra_files[cards.PLOT_FILENAME] = plot_path.read_bytes()
            info.plot_file = cards.PLOT_FILENAME
        card = cards.render_card(info)
        extra_files[README] = str(card).encode()

        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            requested, repo_id = repo_id, repo_url.repo_id  # the Hub fills in the namespace of a bare name
            info.repo_id = repo_id
            target = revision or "main"
            stale = _check_remote(api, repo_id, target, kind, identity, overwrite, endpoint, token)
            if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            if info.repo_id != requested:
                card = cards.render_card(info)  # the loading snippet must name the resolved repo id
                extra_files[README] = str(card).encode()

            operations: list[Any] = []
            paths = []
            for path in _folder_files(folder):
                rel = path.relative_to(folder).as_posix()
                if rel in extra_files:
                    continue  # our card replaces the one save_pretrained wrote (its metadata is merged in)
                content = overrides.get(rel)
                operations.append(CommitOperationAdd(rel, content if content is not None else str(path)))
                paths.append(rel)
            for rel, content in extra_files.items():
                operations.append(CommitOperationAdd(rel, content))
                paths.append(rel)
            operations += [CommitOperationDelete(p) for p in stale if p not in paths]
            message = commit_message or f"Upload {'LoRA adapter' if kind == 'adapter' else 'model'} ({cards.describe_encoding(info.posenc)}) with hf_posenc"
            with _commit_urls_parsed_against(endpoint):
                commit = api.create_commit(
                    repo_id,
                    operations,
                    commit_message=message,
                    commit_description=commit_description,
                    revision=revision,
                    create_pr=create_pr,
                )
        except HubPushError:
            raise
        except Exception as err:
            raise _explain(err, repo_id, endpoint) from err

    return PushResult(
        repo_id=repo_id,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
        revision=revision or "main",
        files=tuple(sorted(paths)),
        card=card,
    )


# --------------------------------------------------------------------------------------- helpers
# huggingface_hub 1.x parses the commit URL a commit answer carries (CommitInfo.__post_init__ ->
# RepoUrl(url)) against the process-wide constants.ENDPOINT, not against the HfApi's endpoint; 2.x
# passes the HfApi's endpoint along (CommitInfo._endpoint). So on 1.x a push with endpoint= other than
# HF_ENDPOINT makes its commit on the server and then raises "Unable to retrieve user and repo ID from
# the passed HF ID", which would be reported as a failed push although the commit exists.
_ENDPOINT_SWAP = threading.Lock()


def _commit_info_takes_an_endpoint() -> bool:
    """Whether this huggingface_hub builds a commit's repo URL with the HfApi's own endpoint (2.x)."""
    import dataclasses

    from huggingface_hub import CommitInfo

    return any(f.name == "_endpoint" for f in dataclasses.fields(CommitInfo))


@contextlib.contextmanager
def _commit_urls_parsed_against(endpoint: str) -> Iterator[None]:
    """Make the client parse the commit URLs ``endpoint`` answers with, on every supported release.

    Feature-detected: a client whose ``CommitInfo`` takes an endpoint needs nothing. An older one reads
    ``constants.ENDPOINT`` while building the result, so it is set to ``endpoint`` for the duration of
    the commit (under a lock, restored afterwards). Every request of the commit goes to ``endpoint``
    anyway; only code on another thread that reads ``constants.ENDPOINT`` meanwhile would see it.
    """
    from huggingface_hub import constants

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


def _as_summary(results: Any) -> cards.EvalSummary | None:
    if results is None or isinstance(results, cards.EvalSummary):
        return results
    if isinstance(results, (str, os.PathLike)):
        return cards.load_results(results)
    if isinstance(results, Sequence):
        return cards.EvalSummary(cards.records_from_rows(results))
    raise ValueError(f"results must be an EvalSummary, a .csv/.json path, or a list of rows; got {type(results).__name__}")


def _materialise(model_or_folder: Any, scratch: Path) -> tuple[Path, Any]:
    """The folder to upload, saving a model object first. Returns (folder, model object or None)."""
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder)
        if not folder.is_dir():
            raise ValueError(f"model_or_folder={str(folder)!r} is not a folder; pass a model or a save_pretrained folder")
        return folder, None
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
    raise ValueError(f"{folder} has neither {CONFIG_FILE} (a model) nor {ADAPTER_CONFIG_FILE} (a PEFT adapter); was it written by save_pretrained?")


def _folder_files(folder: Path) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(part in _SKIP_DIRS for part in path.relative_to(folder).parts):
            out.append(path)
    return out


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


def _is_native(config: Mapping[str, Any]) -> bool:
    """Stock transformers loads this checkpoint with its encoding: no custom code involved."""
    return "auto_map" not in config and not str(config.get("model_type", "")).startswith("hf_posenc")


def _own_layout(config: Mapping[str, Any]) -> str:
    """The native RoPE layout of the checkpoint's architecture (Cohere: interleaved), "half" if unknown."""
    from .architectures import ARCHITECTURES

    row = ARCHITECTURES.get(str(config.get("model_type", "")))
    return row.rope_layout if row is not None else "half"


def _check_loadable(config: Mapping[str, Any], folder: Path) -> bool:
    """Refuse folders that would load back without their encoding; return whether they are stock."""
    posenc = config.get("posenc")
    if posenc is not None and not isinstance(posenc, Mapping):
        raise NotLoadableError(f"config.json 'posenc' must be a dict with a 'kind', got {posenc!r}")
    if _is_native(config):
        # A stock checkpoint may only record a RoPE variant that rope_parameters expresses; anything
        # else would be loaded by plain transformers as the unconverted model, silently.
        if posenc is not None and not (posenc.get("kind") == "rope" and posenc.get("layers") is None
                                       and posenc.get("layout") in (None, _own_layout(config))):
            raise NotLoadableError(
                f"config.json records posenc kind={posenc.get('kind')!r} on the stock model_type "
                f"{config.get('model_type')!r} without auto_map: stock transformers would load it WITHOUT that "
                "encoding. Save the converted model with hf_posenc (its save_pretrained writes auto_map and the "
                "remote-code files), then push again."
            )
        return True
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, Mapping) or not auto_map:
        raise NotLoadableError(
            f"config.json has the custom model_type {config.get('model_type')!r} but no auto_map, so "
            "from_pretrained(..., trust_remote_code=True) cannot find its code. Save it with hf_posenc's save_pretrained."
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
    return False


def _original_encoding(config: Mapping[str, Any]) -> str | None:
    original = (config.get("posenc") or {}).get("original") if isinstance(config.get("posenc"), Mapping) else None
    return original if isinstance(original, str) else None


def _adapter_base_config(
    adapter_cfg: Mapping[str, Any], live_model: Any, folder: Path, api: Any, token: str, base_model: str | None
) -> dict[str, Any]:
    """The config of the adapter's base model, from the live model, a local folder, or the Hub."""
    if live_model is not None and hasattr(live_model, "get_base_model"):
        return live_model.get_base_model().config.to_dict()
    candidates = [c for c in (base_model, adapter_cfg.get("base_model_name_or_path")) if c]
    for name in candidates:
        local = Path(name)
        if (local / CONFIG_FILE).is_file():
            return _read_json(local / CONFIG_FILE)
    for name in candidates:
        if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            from huggingface_hub import hf_hub_download

            try:
                with tempfile.TemporaryDirectory() as cache:
                    path = hf_hub_download(name, CONFIG_FILE, endpoint=api.endpoint, token=token, cache_dir=cache)
                    return _read_json(Path(path))
            except Exception as err:
                raise UnconvertedBaseError(
                    f"cannot read the adapter's base model config ({name!r} on {api.endpoint}): {err}. Pass "
                    "base_model=<Hub id of the hf_posenc-converted base> so the adapter can be checked."
                ) from err
    raise UnconvertedBaseError(
        f"the adapter's base model {adapter_cfg.get('base_model_name_or_path')!r} is neither a local folder nor a Hub "
        "repo id; pass base_model=<Hub id of the hf_posenc-converted base>."
    )


def _adapter_card_info(repo_id: str, adapter_cfg: Mapping[str, Any], base_config: Mapping[str, Any], folder: Path, base_model: str | None) -> cards.CardInfo:
    posenc = base_config.get("posenc")
    base_name = base_model or adapter_cfg.get("base_model_name_or_path")
    if not isinstance(posenc, Mapping) or "kind" not in posenc:
        raise UnconvertedBaseError(
            f"the adapter's base model {base_name!r} was not converted with hf_posenc (its config has no 'posenc'). "
            "An hf_posenc adapter must be trained on, and pushed for, a converted base: convert the base with "
            "hf_posenc.convert, push it, and pass its Hub id as base_model."
        )
    # Keep peft's card metadata (library_name, base_model:adapter tags, ...) that save_pretrained wrote.
    extra: dict[str, Any] = {}
    if (folder / README).is_file():
        from huggingface_hub import ModelCard

        with_meta = ModelCard.load(folder / README, ignore_metadata_errors=True)
        extra = {k: v for k, v in with_meta.data.to_dict().items() if v is not None}
    hub_base = base_name if isinstance(base_name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base_name) and not Path(base_name).exists() else None
    return cards.CardInfo(
        repo_id=repo_id,
        base_model=hub_base,
        posenc=dict(posenc),
        native=_is_native(base_config),
        architecture=(base_config.get("architectures") or [None])[0],
        adapter={
            "peft_type": adapter_cfg.get("peft_type"),
            "r": adapter_cfg.get("r"),
            "lora_alpha": adapter_cfg.get("lora_alpha"),
            "target_modules": sorted(adapter_cfg.get("target_modules") or []),
            "modules_to_save": list(adapter_cfg.get("modules_to_save") or []),
        },
        extra_metadata={k: v for k, v in extra.items() if k not in ("base_model", "model-index", "eval_results", "model_name")},
    )


def _check_remote(api: Any, repo_id: str, revision: str, kind: str, identity: dict[str, Any], overwrite: bool, endpoint: str, token: str) -> list[str]:
    """Refuse to push over a different model; return remote files to delete when overwriting."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        info = api.model_info(repo_id, revision=revision)
    except RevisionNotFoundError:
        info = api.model_info(repo_id)  # a new branch starts from main
    remote = {s.rfilename for s in info.siblings or []}
    ours = ADAPTER_CONFIG_FILE if kind == "adapter" else CONFIG_FILE
    theirs = CONFIG_FILE if kind == "adapter" else ADAPTER_CONFIG_FILE
    differences: list[str] = []
    if ours in remote:
        with tempfile.TemporaryDirectory() as cache:
            path = hf_hub_download(repo_id, ours, revision=info.sha, endpoint=endpoint, token=token, cache_dir=cache)
            remote_identity = _identity(_read_json(Path(path)), list(identity))
        differences = [f"{k}: remote {remote_identity[k]!r} != local {identity[k]!r}" for k in identity if remote_identity[k] != identity[k]]
    elif theirs in remote:
        differences = [f"the repo holds a {'full model' if kind == 'adapter' else 'PEFT adapter'} ({theirs}), you are pushing a {'PEFT adapter' if kind == 'adapter' else 'full model'}"]
    if differences and not overwrite:
        raise RepoConflictError(
            f"{repo_id} (revision {info.sha[:8] if info.sha else revision}) already holds a different model:\n  - "
            + "\n  - ".join(differences)
            + "\nPush to another repo id, or pass overwrite=True (CLI: --overwrite) to replace it."
        )
    if differences:
        return sorted(p for p in remote if p != ".gitattributes")
    return []


def _explain(err: Exception, repo_id: str, endpoint: str) -> HubPushError:
    """Turn a huggingface_hub / httpx error into a message that says what happened and what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    note = "No commit was created: the Hub applies a commit all at once or not at all."
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status == 401:
        return PushFailedError(f"The Hub at {endpoint} rejected the token (401) while pushing to {repo_id}: check HF_TOKEN / `hf auth login`. {note}")
    if isinstance(err, HfHubHTTPError) and status == 403:
        return PushFailedError(f"The token may not write to {repo_id} (403 Forbidden): use a write token of that namespace. {note}")
    if isinstance(err, HfHubHTTPError):
        return PushFailedError(f"The Hub at {endpoint} answered HTTP {status} while pushing to {repo_id}: {err}. {note}")
    if isinstance(err, ValueError) and "Invalid metadata in README.md" in str(err):
        return PushFailedError(f"The Hub rejected the model card metadata: {err}. {note}")
    module = type(err).__module__
    if module.startswith(("httpx", "httpcore")) or isinstance(err, (OSError, ConnectionError, RuntimeError)):
        return PushFailedError(
            f"Network failure while pushing to {repo_id} at {endpoint}: {type(err).__name__}: {err}. {note} "
            "Run the push again; LFS files that already reached the server are not sent twice."
        )
    return PushFailedError(f"Push to {repo_id} failed: {type(err).__name__}: {err}. {note}")


# ------------------------------------------------------------------------------------------- CLI
def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``hf-posenc push DIR REPO_ID`` arguments to ``parser`` (used by :mod:`hf_posenc.cli`)."""
    parser.add_argument("folder", help="folder written by save_pretrained (a converted model or a PEFT adapter)")
    parser.add_argument("repo_id", help="'namespace/name' on the Hub")
    parser.add_argument("--token", default=None, help="write token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("-m", "--commit-message", default=None)
    parser.add_argument("--base-model", default=None, help="Hub id of the base model (for adapters: the converted base)")
    parser.add_argument("--results", default=None, help="recipe results table (.csv or .json) for the card")
    parser.add_argument("--results-method", default=None, help="the row (recipe variant) of --results that is this model")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id (repeatable)")
    parser.add_argument("--license", default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace a repo that holds a different model")
    parser.add_argument("--no-plot", action="store_true", help="do not add the perplexity-by-length plot")
    return parser


def run_push(args: argparse.Namespace) -> int:
    """Run ``hf-posenc push`` from parsed arguments; prints the commit URL. Returns the exit code."""
    result = push_to_hub(
        args.folder,
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        base_model=args.base_model,
        results=args.results,
        results_method=args.results_method,
        datasets=args.dataset,
        license=args.license,
        overwrite=args.overwrite,
        plot=not args.no_plot,
    )
    print(result.pr_url or result.commit_url)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_posenc.hub DIR REPO_ID [...]``: the push command on its own; errors exit 1 with the message."""
    parser = add_push_arguments(argparse.ArgumentParser(prog="hf-posenc push", description=push_to_hub.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return run_push(args)
    except (HubPushError, ValueError, OSError) as err:
        print(f"error: {err}", file=__import__("sys").stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
