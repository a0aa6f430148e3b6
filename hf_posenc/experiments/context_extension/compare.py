"""The comparison grid: one base model, every encoding, one fine-tuning budget each, one report.

For each variant: load the base fresh -> convert to the variant's encoding -> (optionally) LoRA
fine-tune under Accelerate -> merge -> evaluate by length -> save the variant's record. The runs go
through the experiments' one resumable grid (:mod:`hf_posenc.experiments.grid`): finished variants are
skipped on a re-run when their settings are unchanged (their record carries a fingerprint of everything
that produced it), so an interrupted comparison resumes where it stopped.

``hf-posenc compare`` and ``recipes/compare.py`` both run :func:`compare_command`.

Sequence parallelism (``train.sp_size > 1``, DeepSpeed Ulysses: :mod:`.sequence_parallel`): the comparison itself
is launched on the processes that share each window (``accelerate launch --config_file
recipes/accelerate/sequence_parallel.yaml recipes/compare.py CONFIG --out DIR``). Every rank runs the same grid in
the same order: the main process reads the finished records and tells the others which runs are pending; each
fine-tune is the collective Ulysses step of all ranks; then every rank evaluates the merged model (the same weights
on every rank), so that no rank waits inside a collective for the length of an evaluation, which the process
group's timeout bounds (DeepSpeed's default 10 min, torch's 30; one variant of the SmolLM2 preset evaluates for
20-25 min on CPU); only the main process writes checkpoint stamps, adapters, records, the log and the report.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ... import parallel
from .. import grid
from ..config import ConfigError, declared_names, encoding_dict, fingerprint_settings, load_config
from ..intervals import merge_seeds
from . import sequence_parallel
from .config import CompareConfig, TrainConfig, VariantConfig
from .data import eval_stream, load_texts
from .evaluation import evaluate_context, non_overlapping
from .models import apply_encoding, load_model, load_tokenizer, resolve
from .report import default_assets_dir, update_readme, write_report
from .training import finetune_lora, make_accelerator

logger = logging.getLogger(__name__)


def _fingerprint(cfg: CompareConfig, variant: VariantConfig, keep: Collection[str] = ()) -> str:
    """Hash of every setting that changes a variant's record (``keep``: see :func:`fingerprint_settings`)."""
    payload = {
        "variant": fingerprint_settings(variant, keep),
        "train": fingerprint_settings(cfg.variant_train(variant), keep) if variant.finetune else None,
        "lora": fingerprint_settings(cfg.variant_lora(variant), keep) if variant.finetune else None,
        "model": fingerprint_settings(cfg.model, keep),
        "data": fingerprint_settings(cfg.data, keep),
        "eval": fingerprint_settings(cfg.eval, keep),
    }
    return grid.fingerprint(payload)


def _earlier_fingerprints(cfg: CompareConfig, variant: VariantConfig) -> tuple[str, ...]:
    """The fingerprints earlier code wrote for the same settings: between a setting's arrival and its
    :data:`~hf_posenc.experiments.config.SINCE_RECORDED` declaration, records carried it at its default; before
    the :data:`~hf_posenc.experiments.config.OPERATIONAL` declaration, they carried those settings as set."""
    names = sorted(declared_names(cfg) | declared_names(variant))
    subsets = (kept for size in range(1, len(names) + 1) for kept in itertools.combinations(names, size))
    return tuple(dict.fromkeys(_fingerprint(cfg, variant, kept) for kept in subsets))


def _setup_logging(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / "compare.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("hf_posenc")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


def run_variant(cfg: CompareConfig, variant: VariantConfig, source, tokenizer, held_out, get_train_texts,
                out_dir: Path, progress: bool, run_name: str | None = None, accelerator=None) -> dict[str, Any]:
    """Produce one run's record (see ``results.json`` in the module docs of ``report``).

    ``run_name`` names its folder under ``variants/`` (default: the variant's name; ``name@seedN`` for one
    seed of several). ``accelerator``: the launch's, under sequence parallelism (every rank runs this; the
    main one writes); None: one process, an ``Accelerator`` per fine-tune.
    """
    from accelerate.utils import set_seed

    run_name = run_name or variant.name
    writes = accelerator is None or accelerator.is_main_process
    workdir = out_dir / "variants" / run_name
    fingerprint = _fingerprint(cfg, variant)
    # Nothing in workdir changes before the model has loaded: a run that fails to start leaves the
    # finished run's adapter and stamp as they were.
    model = load_model(source, cfg.model.dtype)
    # New position tables and LoRA weights are random: seed per variant so a resumed comparison
    # recomputes a variant exactly as a fresh one would.
    set_seed(cfg.variant_train(variant).seed)
    model = apply_encoding(model, variant.posenc)
    stats: dict[str, Any] = {"train_tokens": 0, "seconds": 0.0}
    new_adapter = None
    curve: list[dict[str, Any]] = []
    if variant.finetune:
        from peft import PeftModel

        train_cfg = cfg.variant_train(variant)
        on_step = None
        if cfg.eval.curve_every:
            on_step = _curve_recorder(curve, held_out[: cfg.eval.curve_tokens], cfg.base_length, cfg.eval.curve_every,
                                      train_cfg)
            on_step(0, model)
        if accelerator is None:
            accelerator = make_accelerator(train_cfg)  # single process: the grid runs its variants in turn
            trained, stats = finetune_lora(accelerator, model, tokenizer, get_train_texts(), cfg.variant_lora(variant),
                                           train_cfg, _checkpoint_folder(workdir, fingerprint), progress=progress,
                                           desc=f"finetune {run_name}", on_step=on_step)
        else:
            trained, stats = _finetune_shared(accelerator, model, tokenizer, get_train_texts(), cfg, variant, train_cfg,
                                              workdir, fingerprint, progress, run_name, on_step)
        if isinstance(trained, PeftModel):
            # Beside the last run's adapter until this run's record is complete (see below).
            new_adapter = workdir / ".adapter.partial"
            if writes:
                shutil.rmtree(new_adapter, ignore_errors=True)
                trained.save_pretrained(str(new_adapter))
            model = trained.merge_and_unload()
        else:  # attention trained in full: nothing to merge (and no adapter to keep)
            model = trained.eval()
        accelerator.free_memory()
        stats["seq_len"] = train_cfg.seq_len
    started = time.time()
    with torch.no_grad():
        evaluation = evaluate_context(model, tokenizer, held_out, cfg.eval, progress=progress,
                                      desc=f"evaluate {run_name}")
    if new_adapter is not None and writes:  # the run is complete: its adapter replaces the last run's
        shutil.rmtree(workdir / "adapter", ignore_errors=True)
        new_adapter.replace(workdir / "adapter")
        (workdir / "fingerprint").write_text(fingerprint)  # the settings the adapter beside it came from
    return {
        "name": variant.name,
        "posenc": encoding_dict(variant.posenc),
        "finetuned": variant.finetune,
        **({"seed": cfg.variant_train(variant).seed} if run_name != variant.name else {}),
        "train_tokens": int(stats["train_tokens"]),
        "perplexity": evaluation["perplexity"],
        "passkey": evaluation["passkey"],
        "passkey_by_depth": evaluation["passkey_by_depth"],
        "loss_by_position": evaluation["loss_by_position"],
        **({"ruler": evaluation["ruler"]} if "ruler" in evaluation else {}),
        **({"curve": curve} if curve else {}),
        "train": {k: v for k, v in stats.items() if k != "train_tokens"},
        "eval_seconds": round(time.time() - started, 1),
        "fingerprint": fingerprint,
    }


def _finetune_shared(accelerator, model, tokenizer, texts: list[str], cfg: CompareConfig, variant: VariantConfig,
                     train_cfg: TrainConfig, workdir: Path, fingerprint: str, progress: bool, run_name: str,
                     on_step: Callable[[int, Any], None] | None):
    """:func:`finetune_lora` under sequence parallelism, on every rank of the launch: the main process prepares
    the checkpoint folder before any rank looks for a checkpoint in it, and Ulysses' registration is undone after
    the fine-tune (the next variant registers its own; the evaluation attends with the plain function)."""
    folder = _checkpoint_folder(workdir, fingerprint) if accelerator.is_main_process else workdir / "checkpoints"
    accelerator.wait_for_everyone()
    try:
        with parallel.ulysses_scope(model):
            return finetune_lora(accelerator, model, tokenizer, texts, cfg.variant_lora(variant), train_cfg, folder,
                                 progress=progress and accelerator.is_main_process, desc=f"finetune {run_name}",
                                 on_step=on_step)
    finally:
        accelerator.free_memory()


def _checkpoint_folder(workdir: Path, fingerprint: str) -> Path:
    """The run's mid-run checkpoint folder (``train.checkpoint_every``), emptied when its checkpoints were
    written under other settings (they could not be resumed from) and stamped with this run's fingerprint.

    Called once the fine-tune really starts. The stamp lives inside the folder it describes; folders written
    before it moved there are described by the stamp beside them (``workdir/fingerprint``).
    """
    folder = workdir / "checkpoints"
    stamp = folder / "fingerprint"
    legacy = workdir / "fingerprint"
    written_under = stamp.read_text() if stamp.is_file() else legacy.read_text() if legacy.is_file() else None
    if folder.exists() and written_under != fingerprint:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint)
    return folder


def _curve_recorder(curve: list[dict[str, Any]], tokens: torch.Tensor, length: int, every: int, train_cfg):
    """An ``on_step`` callback that appends ``{"step", "train_tokens", "perplexity"}`` (at ``length``, over
    ``tokens`` in non-overlapping windows) to ``curve`` at step 0 and every ``every`` steps."""
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * train_cfg.seq_len

    def record(step: int, model) -> None:
        if step % every and step != train_cfg.steps:
            return
        was_training = model.training
        model.eval()
        nll, _ = non_overlapping(model, tokens, length, batch_size=4)
        model.train(was_training)
        curve.append({"step": step, "train_tokens": step * tokens_per_step,
                      "perplexity": math.exp(math.fsum(nll) / len(nll))})

    return record


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def timing_summary(paths: dict[str, Path]) -> str:
    """One line on how long a finished comparison took and under what machine load (for the CLI)."""
    if "json" not in paths:  # nothing recorded (e.g. a report written by other means)
        return "finished"
    results = json.loads(Path(paths["json"]).read_text())
    seconds, machine = results["seconds"], results.get("machine", {})
    total = seconds["total_this_run"]
    # A resumed run times only what it computed: say so, or "2 s" reads as the cost of the whole grid.
    reused = (f"; {seconds['runs_reused']} of {seconds['runs_reused'] + seconds['runs_computed']} runs reused "
              "from an earlier run of this folder, not timed here") if seconds.get("runs_reused") else ""
    return (f"finished in {int(total // 60)} min {total % 60:.0f} s{reused} (base model {seconds['base_model']:.0f} s; "
            f"{machine.get('cpus')} CPUs, load average {machine.get('load_average_start')} at the start, "
            f"{machine.get('load_average_end')} at the end)")


def run_compare(config_path: str | Path, out_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                progress: bool = True) -> dict[str, Path]:
    """Run (or resume) the comparison described by a YAML config and write its report.

    Args:
        config_path: A :class:`~hf_posenc.context_extension.config.CompareConfig` YAML file
            (e.g. ``recipes/configs/compare_quick.yaml``) or the name of a shipped compare preset
            (``"quick"``, ``"tiny"``, ``"smollm2"``; see :mod:`hf_posenc.presets`).
        out_dir: Output folder: ``results.json``, ``results.csv``, ``results.md``, the two plots,
            ``compare.log``, ``variants/<name>.json`` (one finished record per variant) and ``config.json``
            (the settings of the written report: a run that fails or is interrupted leaves the last one).
        overrides: ``key.sub=value`` changes to the config.
        progress: Show progress bars.

    Returns:
        Paths of the written files (keys ``json``, ``csv``, ``markdown``, ``perplexity_plot``,
        ``passkey_plot``); none on the processes other than the main one of a sequence-parallel launch
        (``train.sp_size > 1``; see the module docs), which writes.

    Raises:
        hf_posenc.context_extension.config.ConfigError: invalid config, or ``train.sp_size`` that this launch
            cannot run (:func:`shared_train_settings`; before anything runs).
        FileNotFoundError: ``config_path`` is neither a file nor a preset name.
    """
    cfg = load_config(CompareConfig, config_path, overrides)
    shared_train = shared_train_settings(cfg)
    accelerator = None  # one process; under sequence parallelism the launch's, for every fine-tune
    if shared_train is not None:
        accelerator = _shared_accelerator(cfg, shared_train)
        progress = progress and accelerator.is_main_process
    writes = accelerator is None or accelerator.is_main_process
    main_first = accelerator.main_process_first if accelerator is not None else nullcontext
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(out_dir) if writes else None
    try:
        started = time.time()
        load_at_start = _load_average()
        # config.json is written with the report it describes (below); until then the log says what runs.
        logger.info("compare config: %s", json.dumps(cfg.model_dump(mode="json")))
        with main_first():  # the builtin base is built once, by the main process, and cached
            source = resolve(cfg.model, cfg.data.held_out_percent, progress=progress)
        if shared_train is not None:
            _check_heads(source, shared_train)
        base_seconds = round(time.time() - started, 1)
        tokenizer = load_tokenizer(source)
        with main_first():
            held_out = eval_stream(load_texts(cfg.data, cfg.data.eval_split), tokenizer, cfg.eval.stream_tokens())
        train_texts: list[str] = []

        def get_train_texts() -> list[str]:
            if not train_texts:
                train_texts.extend(load_texts(cfg.data, cfg.data.train_split))
            return train_texts

        if accelerator is not None:  # read now, main process first, rather than inside a collective step
            with main_first():
                get_train_texts()

        curve_reference = None
        if cfg.eval.curve_every:
            # The curves' yardstick: the base model itself on the curves' tokens (the table's ppl@L is
            # measured on more tokens, so it is not comparable with a curve point).
            base = load_model(source, cfg.model.dtype).eval()
            nll, _ = non_overlapping(base, held_out[: cfg.eval.curve_tokens], cfg.base_length, batch_size=4)
            curve_reference = {"perplexity": math.exp(math.fsum(nll) / len(nll)), "tokens": cfg.eval.curve_tokens}
            del base
        runs = [(variant, run) for variant in cfg.selected_variants() for run in cfg.variant_runs(variant)]
        cells = [grid.Cell(run_name, _fingerprint(cfg, run), run, _earlier_fingerprints(cfg, run))
                 for _, (run_name, run) in runs]

        def compute(cell: grid.Cell) -> dict[str, Any]:
            return run_variant(cfg, cell.spec, source, tokenizer, held_out, get_train_texts, out_dir, progress,
                               run_name=cell.name, accelerator=accelerator)

        def log_record(cell: grid.Cell, record: dict[str, Any]) -> None:
            logger.info("run %s: %s", cell.name, json.dumps(record["perplexity"]))

        grid_args = {"on_record": log_record, "indent": 2, "progress": progress,
                     "desc": "runs" if cfg.seeds else "variants"}
        if accelerator is None:
            done = grid.run_grid(cells, compute, out_dir / "variants", **grid_args)
        else:
            done = _shared_grid(accelerator, cells, compute, out_dir / "variants", **grid_args)
            if done is None:  # not the main process: it computed the pending runs with the others; the main one writes
                accelerator.wait_for_everyone()
                accelerator.end_training()
                return {}
        records = []
        for variant in cfg.selected_variants():
            seeded = [done.records[run_name] for run_name, _ in cfg.variant_runs(variant)]
            records.append(merge_seeds(seeded) if len(seeded) > 1 else seeded[0])
        results = {
            "base_model": source.label,
            "train_length": cfg.base_length,
            "variants": records,
            **({"seeds": cfg.seeds} if cfg.seeds else {}),
            **({"curve_reference": curve_reference} if curve_reference else {}),
            "eval": cfg.eval.model_dump(mode="json"),
            "seconds": {"base_model": base_seconds, "total_this_run": round(time.time() - started, 1),
                        "runs_computed": done.computed, "runs_reused": done.reused},
            # What the timings were measured under: a shared machine can be several times slower.
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_average_start": load_at_start, "load_average_end": _load_average()},
        }
        build_info = Path(source.path) / "build_info.json"
        if build_info.is_file():
            results["base_model_build"] = json.loads(build_info.read_text())
        paths = write_report(results, out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        if accelerator is not None:
            accelerator.wait_for_everyone()
            accelerator.end_training()
        return paths
    finally:
        if handler is not None:
            logging.getLogger("hf_posenc").removeHandler(handler)
            handler.close()


#: How ``recipes/compare.py`` is launched when its fine-tunes share windows (``N``: ``train.sp_size``).
SHARED_LAUNCH = ("accelerate launch --config_file recipes/accelerate/sequence_parallel.yaml --num_processes {n} "
                 "recipes/compare.py CONFIG --out DIR")


def shared_train_settings(cfg: CompareConfig) -> TrainConfig | None:
    """The ``train`` settings of the comparison's fine-tunes when they share windows between processes
    (``train.sp_size > 1``), or None when the comparison runs in one process. Checked before anything runs.

    Raises:
        ConfigError: ``sp_size > 1`` in a single process, a launch of several processes without it (each would
            run the whole grid), or fine-tuned runs that differ in what one DeepSpeed launch fixes for all its
            fine-tunes (``sp_size``, ``batch_size``, ``grad_accum``, ``mixed_precision``).
    """
    runs = [(name, cfg.variant_train(run)) for variant in cfg.selected_variants() if variant.finetune
            for name, run in cfg.variant_runs(variant)]
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by every torch.distributed launcher
    shared = [(name, train) for name, train in runs if train.sp_size > 1]
    if not shared:
        if processes > 1:
            raise ConfigError(
                f"this comparison was launched on {processes} processes but no fine-tuned variant sets train.sp_size, "
                f"so each process would run the whole grid; allowed: one process (python recipes/compare.py CONFIG "
                f"--out DIR), or train.sp_size={processes} under {SHARED_LAUNCH.format(n=processes)}.")
        return None
    name, first = shared[0]
    if processes == 1:
        raise ConfigError(
            f"train.sp_size={first.sp_size} (variant {name!r}) shares each window between {first.sp_size} processes, "
            f"but this comparison runs in one; allowed: train.sp_size=1, or {SHARED_LAUNCH.format(n=first.sp_size)}.")
    for other, train in runs:
        for key in ("sp_size", "batch_size", "grad_accum", "mixed_precision"):
            if getattr(train, key) != getattr(first, key):
                raise ConfigError(
                    f"train.{key} is {getattr(train, key)} in variant {other!r} but {getattr(first, key)} in "
                    f"{name!r}: under sequence parallelism the fine-tunes share one DeepSpeed launch, which fixes "
                    f"it for all; allowed: {getattr(first, key)} in every fine-tuned variant.")
    return first


def _shared_accelerator(cfg: CompareConfig, train: TrainConfig):
    """The launch's ``Accelerator`` for every fine-tune of a sequence-parallel comparison, its launch checked
    against every fine-tuned run (the finetune recipe's checks; as config errors)."""
    try:
        accelerator = make_accelerator(train)
        for variant in cfg.selected_variants():
            if variant.finetune:
                sequence_parallel.check_launch(accelerator, cfg.variant_train(variant))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return accelerator


def _check_heads(source, train: TrainConfig) -> None:
    """Refuse, before anything runs, a base whose attention heads ``train.sp_size`` ranks cannot share."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    try:
        sequence_parallel.check_model(config, train)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _shared_grid(accelerator, cells: Sequence[grid.Cell], compute: Callable[[grid.Cell], dict[str, Any]],
                 folder: Path, **grid_args) -> grid.GridRun | None:
    """:func:`grid.run_grid` on every rank of a sequence-parallel launch.

    The main process reads and writes the records; it sends the names of the pending runs to the others, and
    every rank computes them in that order (a fine-tune is a collective step of all ranks), so the ranks agree
    on the pending runs even if a record appears while they start.

    Returns:
        The grid's run on the main process; None on the others.
    """
    from accelerate.utils import broadcast_object_list

    def in_step(pending: Sequence[grid.Cell]) -> Iterator[tuple[grid.Cell, dict[str, Any]]]:
        broadcast_object_list([[cell.name for cell in pending]])
        for cell in pending:
            yield cell, compute(cell)

    if accelerator.is_main_process:
        return grid.run_grid(cells, compute, folder, mapper=in_step, **grid_args)
    names = broadcast_object_list([None])[0]
    by_name = {cell.name: cell for cell in cells}
    for name in names:
        compute(by_name[name])
    return None


def add_command_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``hf-posenc compare`` and ``recipes/compare.py``: one command with two entry points, so
    both take the same options (:func:`command_from_args` runs it)."""
    parser.add_argument("config", help="a compare YAML, or a shipped preset name (quick, tiny, smollm2; "
                                       "`hf-posenc recipes` lists them)")
    parser.add_argument("--out", required=True, help="output folder (finished variants are reused)")
    parser.add_argument("--readme", help="Markdown file whose compare section is replaced by the results")
    parser.add_argument("--readme-assets", help="where --readme copies the outputs (default: "
                                                 "recipes/results/<out name> beside a root README, "
                                                 "else results/<out name> next to it)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars, the log lines only (for nohup and CI logs)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def command_from_args(args: argparse.Namespace) -> dict[str, Path]:
    """:func:`compare_command` with the arguments :func:`add_command_arguments` parsed."""
    return compare_command(args.config, args.out, args.overrides, progress=not args.no_progress,
                           readme=args.readme, readme_assets=args.readme_assets)


def compare_command(config: str | Path, out_dir: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    progress: bool = True, readme: str | Path | None = None,
                    readme_assets: str | Path | None = None) -> dict[str, Path]:
    """What ``hf-posenc compare`` and ``recipes/compare.py`` do: run the comparison, print its table, the
    written files and the timing, and optionally put the results into a README.

    Args:
        config, out_dir, overrides, progress: See :func:`run_compare`.
        readme: A Markdown file whose compare section (between the markers) is replaced by the results.
        readme_assets: Where the outputs are copied for the README's links (default: see
            :func:`.report.default_assets_dir`; run folders are usually git-ignored).

    Returns:
        The paths :func:`run_compare` returned.
    """
    paths = run_compare(config, out_dir, overrides, progress=progress)
    if not paths:  # a process of a sequence-parallel launch other than the main one, which prints
        return paths
    print(paths["markdown"].read_text())
    for key, path in paths.items():
        print(f"{key}: {path}")
    print(timing_summary(paths))
    if readme:
        readme = Path(readme)
        assets = Path(readme_assets) if readme_assets else default_assets_dir(readme, Path(out_dir))
        update_readme(readme, paths, assets_dir=assets)
        print(f"updated {readme} (outputs copied to {assets})")
    return paths
