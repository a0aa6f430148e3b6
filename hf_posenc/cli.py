"""``hf-posenc`` command line: convert, info, compare, recipes, push.

Examples::

    hf-posenc convert ./my-llama --posenc alibi --out ./my-llama-alibi
    hf-posenc convert model.gguf --posenc rope --param rope_type=yarn --param factor=4 --out ./yarn
    hf-posenc info ./my-llama-alibi
    hf-posenc compare recipes/configs/compare_quick.yaml --out runs/quick
    hf-posenc compare quick --out runs/quick          # a shipped preset by name
    hf-posenc recipes                                 # list presets, recipe scripts, metrics
    hf-posenc recipes cp quick ./my-configs
    hf-posenc push ./my-llama-alibi user/my-llama-alibi
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from . import presets, registry
from .architectures import MODEL_TYPE_PREFIX
from .config import CONFIG_KEY, PosEncConfig
from .convert import convert, is_native_checkpoint
from .experiments.context_extension import compare
from .hub import HubPushError, push_to_hub
from .loading import check_source, load_model, load_tokenizer
from .modeling import TASKS
from .staged_folder import staged_folder

logger = logging.getLogger("hf_posenc")


def parse_params(pairs: list[str]) -> dict:
    """``["factor=4", "layers=[0, 2]"]`` -> ``{"factor": 4, "layers": [0, 2]}`` (values parsed as YAML).

    Raises:
        ValueError: A pair without ``=``.
    """
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {pair!r}.")
        params[key.strip()] = yaml.safe_load(value)
    return params


def cmd_convert(args: argparse.Namespace) -> int:
    posenc = PosEncConfig(kind=args.posenc, **parse_params(args.param))  # fails before any loading
    check_source(args.model)
    out = Path(args.out)
    # Written beside --out and swapped in whole: a failure or kill never leaves a mix of two models' files.
    with staged_folder(out, overwrite=args.overwrite) as partial, \
            tqdm(total=3, desc="hf-posenc convert", unit="step") as bar:
        bar.set_postfix_str(f"loading {args.model}")
        model = load_model(args.model, args.dtype, args.attn_implementation, args.task)
        bar.update()
        bar.set_postfix_str(f"converting to {posenc.kind}")
        convert(model, posenc)
        bar.update()
        bar.set_postfix_str(f"saving to {out}")
        model.save_pretrained(partial)
        if args.tokenizer:
            _save_tokenizer(args.model, partial)
        bar.update()
    print(describe(out))
    return 0


def _save_tokenizer(source: str, out: Path) -> None:
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as error:  # a model without a tokenizer is still a valid conversion
        logger.warning("No tokenizer saved (%s).", error)
        return
    tokenizer.save_pretrained(out)


def describe(folder: str | Path) -> str:
    """A human-readable summary of the encoding of a saved model or adapter folder."""
    folder = Path(folder)
    lines = [f"{folder}:"]
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        data = _read_json(adapter)
        lines.append(f"  PEFT adapter ({data.get('peft_type')}) for {data.get('base_model_name_or_path')}")
        lines.append(f"  target_modules: {data.get('target_modules')}; modules_to_save: {data.get('modules_to_save')}")
        return "\n".join(lines)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has neither config.json nor adapter_config.json.")
    config = _read_json(config_file)
    model_type = config.get("model_type", "?")
    lines.append(f"  model_type: {model_type} ({', '.join(config.get('architectures') or [])})")
    native = is_native_checkpoint(config)
    rope = f"RoPE {json.dumps(config['rope_parameters'])}" if config.get("rope_parameters") else None
    if native is None:
        lines.append(f"  encoding: the architecture's own{': ' + rope if rope else ''} (not converted by hf_posenc)")
    elif native:
        lines.append(f"  encoding: {rope} (native)")
        lines.append("  loads with: stock transformers (no plug-in needed)")
    else:
        lines.append(f"  encoding: {json.dumps(config[CONFIG_KEY])}")
        if model_type.startswith(MODEL_TYPE_PREFIX):
            lines.append("  loads with: import hf_posenc (or trust_remote_code=True with hf_posenc installed); "
                         "stock transformers refuses it")
        else:  # not written by hf_posenc's save_pretrained: nothing would apply the encoding
            lines.append(f"  loads with: stock transformers, WITHOUT this encoding "
                         f"({model_type!r} is a stock model type)")
    lines.append(f"  max_position_embeddings: {config.get('max_position_embeddings', config.get('n_positions'))}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    """A JSON object file, or one line naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Fix or re-save {path}: it is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise ValueError(f"Fix or re-save {path}: it holds a JSON {type(data).__name__}, not an object.")
    return data


def cmd_info(args: argparse.Namespace) -> int:
    print(describe(args.folder))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    compare.command_from_args(args)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    if args.action == "cp":
        target = presets.copy(args.name, args.dest, overwrite=args.overwrite)
        print(f"copied {args.name} to {target}")
        hint = presets.run_hint(presets.find(args.name), target)
        if hint:
            print(f"run it with: {hint}")
    elif args.action == "path":
        print(presets.find(args.name).path)
    else:
        recipes = presets.catalogue()
        names = [r.name + (f" ({', '.join(r.aliases)})" if r.aliases else "") for r in recipes]
        width = max(len(n) for n in names)
        print(f"{'NAME':<{width}}  {'KIND':<10}  DESCRIPTION")
        for name, recipe in zip(names, recipes):
            print(f"{name:<{width}}  {recipe.kind:<10}  {recipe.description}")
        print(f"\nfrom {presets.recipes_dir()}; copy one with `hf-posenc recipes cp NAME DIR`, "
              "run a compare preset with `hf-posenc compare NAME --out DIR`")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    result = push_to_hub(
        args.folder,
        args.repo_id,
        token=args.token,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        commit_description=args.commit_description,
        base_model=args.base_model,
        results=args.results,
        results_method=args.results_method,
        datasets=args.dataset,
        license=args.license,
        tags=args.tag,
        overwrite=args.overwrite,
        plot=not args.no_plot,
    )
    print(result.pr_url or result.commit_url)
    return 0


def _add_push_parser(sub) -> None:
    push = sub.add_parser("push", help="push a converted model or adapter folder to the Hub with a model card")
    push.add_argument("folder", help="folder written by save_pretrained (a converted model or a PEFT adapter)")
    push.add_argument("repo_id", help="'namespace/name' on the Hub")
    push.add_argument("--token", default=None, help="write token (default: HF_TOKEN or `hf auth login`)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("-m", "--commit-message", default=None)
    push.add_argument("--commit-description", default=None)
    push.add_argument("--base-model", default=None, help="Hub id of the base model (for adapters: the converted base)")
    push.add_argument("--results", default=None, help="recipe results table (.csv or .json) for the card")
    push.add_argument("--results-method", default=None, help="the row (recipe variant) of --results that is this model")
    push.add_argument("--dataset", action="append", default=[], help="Hub dataset id (repeatable)")
    push.add_argument("--license", default=None)
    push.add_argument("--tag", action="append", default=[], help="extra card tag (repeatable)")
    push.add_argument("--overwrite", action="store_true", help="replace a repo that holds a different model")
    push.add_argument("--no-plot", action="store_true", help="do not add the perplexity-by-length plot")
    push.set_defaults(func=cmd_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-posenc", description="Swap the positional encoding of HF models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert", help="convert a model to another positional encoding and save it")
    convert.add_argument("model", help="local folder, Hub id (online), or a .gguf file")
    convert.add_argument("--posenc", required=True, choices=registry.kinds(), help="the new encoding")
    convert.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                         help="encoding parameter (repeatable), e.g. rope_type=yarn, factor=4, layers=[0,2]")
    convert.add_argument("--out", required=True, help="output folder")
    convert.add_argument("--dtype", default="auto", help="torch dtype to load in (auto, float32, bfloat16, ...)")
    convert.add_argument("--attn-implementation", choices=["eager", "sdpa"], default=None)
    convert.add_argument("--task", choices=list(TASKS), default=None,
                         help="the head to load and save (its Auto class), e.g. sequence-classification; "
                              "default: the architecture the checkpoint names")
    convert.add_argument("--no-tokenizer", dest="tokenizer", action="store_false", help="do not copy the tokenizer")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace a non-empty --out (written beside it, then swapped in whole)")
    convert.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="print the encoding of a saved model or adapter")
    info.add_argument("folder")
    info.set_defaults(func=cmd_info)

    compare_parser = sub.add_parser("compare", help="run a context-extension comparison grid (recipes/compare.py)")
    compare.add_command_arguments(compare_parser)
    compare_parser.set_defaults(func=cmd_compare)

    recipes = sub.add_parser("recipes", help="list the shipped presets and recipes, copy one, or print its path")
    recipes.set_defaults(func=cmd_recipes, action="ls")
    recipes_sub = recipes.add_subparsers(dest="action")
    recipes_sub.add_parser("ls", help="list them (the default)")
    copy = recipes_sub.add_parser("cp", help="copy a preset, recipe script, accelerate config or metric to edit it")
    copy.add_argument("name", help="e.g. quick, compare_tiny, finetune_lora, multi_gpu, token_perplexity")
    copy.add_argument("dest", help="folder to copy into (created if missing)")
    copy.add_argument("--overwrite", action="store_true", help="replace an existing copy")
    path = recipes_sub.add_parser("path", help="print where a recipe is installed, e.g. for `accelerate launch`")
    path.add_argument("name")

    _add_push_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `compare CONFIG --out DIR a.b=1`: argparse leaves KEY=VALUE words after an option unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "compare" and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    # User errors (bad arguments, missing files, Hub refusals) are one message each, as the Python API
    # raises them; --verbose shows the traceback as well.
    except (ValueError, OSError, HubPushError) as error:
        if args.verbose:
            raise
        print(f"hf-posenc {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
