# SPDX-License-Identifier: Apache-2.0
"""
The ``pyro-vdrop`` command: train, evaluate and report on variational-dropout networks.

::

    pyro-vdrop fit                                  # LeNet-300-100, sparse VD + LRT, embedded MNIST (~1 min)
    pyro-vdrop fit --dataset mnist --epochs 200 --kl-warmup 15 --kl-warmup-start 5 --out runs/lenet300
    pyro-vdrop fit --out runs/lenet300 --resume     # continue an interrupted run exactly
    pyro-vdrop fit --nproc 2                        # data-parallel in 2 local processes (torch.distributed)
    torchrun --nproc_per_node 2 -m pyro_vdrop.cli fit   # the same, started by torchrun
    pyro-vdrop evaluate --run runs/lenet300         # error, NLL, Brier, ECE (θ, pruned, MC); OOD check
    pyro-vdrop report --run runs/lenet300           # report.md: log α, curves, masks, reliability, entropy
    pyro-vdrop convert --run runs/old               # a checkpoint of an older pyro-vdrop in today's format
    pyro-vdrop export --run runs/lenet300 --out lenet300.pt   # the pruned network, dead units removed

Errors (bad options, missing data, a run directory that does not fit or is in use) are printed on stderr and the
command exits with status 2 without touching existing files; a file that cannot be written (a full disk) exits
with status 1, the last checkpoint intact. The work is done by :mod:`pyro_vdrop.train`.
"""

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from pyro_vdrop.train import DEVICES, PRUNE_THRESHOLD, Rank0Error, RunError, TrainConfig
from pyro_vdrop.train.config import VALUE_KINDS

_EXIT_ERROR = 2
_EXIT_IO_ERROR = 1
_EXIT_INTERRUPTED = 130
_POSITIVE_INT = "positive_int"


def _parse(kind: str):
    """An argparse ``type`` for a value of ``kind`` (a key of :data:`~pyro_vdrop.train.config.VALUE_KINDS`): the
    same test as :class:`TrainConfig`'s."""
    test, words = VALUE_KINDS[kind]
    convert = int if kind.endswith("_int") else float

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value

    parse.__name__ = kind  # argparse names the type in some messages
    return parse


def _add_config_options(fit: argparse.ArgumentParser) -> None:
    """One option per field of :class:`TrainConfig`, from its metadata (help, choices, kind of value, group).

    They default to None so that an explicitly given option can be told from a default (``--resume`` checks them
    against the run); :class:`TrainConfig` supplies the defaults and validates again."""
    groups = {}
    for field in dataclasses.fields(TrainConfig):
        meta = field.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], fit.add_argument_group(meta["group"]))
        kwargs = {"help": meta["help"] + ("" if field.default is None else f" (default: {field.default})")}
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["kind"] is not None:
            kwargs["type"] = _parse(meta["kind"])
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        group.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pyro-vdrop`` (sub-commands ``fit``, ``evaluate``, ``report``, ``convert``,
    ``export``)."""
    from pyro_vdrop import __version__

    parser = argparse.ArgumentParser(
        prog="pyro-vdrop",
        description="Variational dropout and the local reparameterization trick for Pyro: train, evaluate, report.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_fit_parser, _add_evaluate_parser, _add_report_parser, _add_convert_parser, _add_export_parser):
        add(commands)
    return parser


def _add_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="DIR", required=True, help="a run directory written by 'pyro-vdrop fit'")


def _add_threshold_argument(parser: argparse.ArgumentParser) -> None:
    help = f"pruning threshold on log α (default: the run's guide's, {PRUNE_THRESHOLD}; 0 for --guide sbp: SNR < 1)"
    parser.add_argument("--threshold", type=_parse("finite_number"), default=None, help=help)


def _add_fit_parser(commands) -> None:
    fit = commands.add_parser(
        "fit",
        help="train a network with variational dropout",
        description="Train a network with variational dropout on MNIST. Without options: LeNet-300-100, sparse VD "
        "(additive parameterization) with the local reparameterization trick on the embedded MNIST subset, "
        "about a minute on 2 CPU cores. Checkpoints and metrics go to --out after every epoch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_options(fit)
    run = fit.add_argument_group("run directory")
    run.add_argument(
        "--out", metavar="DIR", help="run directory for checkpoints and metrics (default: runs/<model>-<guide>-<time>)"
    )
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    threads = "torch CPU threads (per process; default: torch's, or the CPUs divided by --nproc)"
    run.add_argument("--threads", type=_parse(_POSITIVE_INT), metavar="N", help=threads)
    par = fit.add_argument_group(
        "several processes",
        "Data-parallel training with torch.distributed (gloo on CPU, nccl on CUDA): --batch-size stays the global "
        "minibatch, each process takes an equal share of it, and process 0 writes the run directory. Start the "
        "processes with --nproc, or with 'torchrun --nproc_per_node N -m pyro_vdrop.cli fit ...'.",
    )
    nproc = "train in N local processes (default: 1)"
    par.add_argument("--nproc", type=_parse(_POSITIVE_INT), metavar="N", help=nproc)


def _add_evaluate_parser(commands) -> None:
    ev = commands.add_parser(
        "evaluate",
        help="test error and calibration of a run (θ, pruned, Monte Carlo predictive), out-of-distribution check",
        description="Test error, NLL, Brier score and expected calibration error of a trained run with the "
        "posterior means θ, with the weights of log α > --threshold pruned, and with the Monte Carlo posterior "
        "predictive; and the predictive's entropy and mutual information on rotated, pixel-noised and "
        "uniform-noise images (out of distribution, no download). Written to evaluation.json.",
    )
    _add_run_argument(ev)
    draws = "posterior draws (default: 10)"
    ev.add_argument("--num-samples", type=_parse(_POSITIVE_INT), default=10, metavar="S", help=draws)
    _add_threshold_argument(ev)
    seed = "seed of the Monte Carlo draws (default: 0)"
    ev.add_argument("--seed", type=_parse("non_negative_int"), default=0, help=seed)
    ev.add_argument("--device", choices=DEVICES, help="where to compute (default: the run's)")
    ev.add_argument("--data-dir", metavar="DIR", help="folder of the MNIST IDX files (default: the run's)")
    ev.add_argument("--threads", type=_parse(_POSITIVE_INT), metavar="N", help="torch CPU threads (default: torch's)")


def _add_report_parser(commands) -> None:
    rep = commands.add_parser(
        "report",
        help="report.md with log α histograms, training curves and first-layer masks (needs matplotlib)",
        description="Write report.md and PNG figures into the run directory: log α histogram per layer, test "
        "error / sparsity / ELBO curves, and the kept-weight masks of the first layer. Needs matplotlib "
        "(pip install 'pyro-vdrop[plot]').",
    )
    _add_run_argument(rep)
    units = "units shown in the mask grid (default: 100)"
    rep.add_argument("--max-units", type=_parse(_POSITIVE_INT), default=100, help=units)
    _add_threshold_argument(rep)


def _add_convert_parser(commands) -> None:
    conv = commands.add_parser(
        "convert",
        help="rewrite a run's checkpoint of an older pyro-vdrop in the current format",
        description="Rewrite the checkpoint of a run written by an older pyro-vdrop (checkpoint format 1, which "
        "pickled constraint objects and numpy arrays) in the current format, which plain "
        "torch.load(weights_only=True) reads. pyro-vdrop reads both formats safely; the old file is kept as "
        "checkpoint.pt.format1.",
    )
    _add_run_argument(conv)


def _add_export_parser(commands) -> None:
    exp = commands.add_parser(
        "export",
        help="write the pruned network with its dead units removed: smaller layers, the same predictions",
        description="Prune a run's network at --threshold, remove every unit that no kept weight connects (smaller "
        "Linear/Conv layers; the next layer's inputs, biases and BatchNorm statistics sliced to match, the "
        "constant output of a unit without inputs folded into the next bias) and write it with torch.save as plain "
        "data: the layers' description and their tensors, loadable with torch.load(weights_only=True) or "
        "pyro_vdrop.nn.load_compressed. Prints the units kept per layer, the parameters, the file size and the CPU "
        "latency at batch 1 and 100 against the dense pruned network, and both networks' test error.",
    )
    _add_run_argument(exp)
    exp.add_argument("--out", metavar="FILE", required=True, help="the file to write (e.g. model.pt)")
    sparse = "store only the kept weights (compressed sparse rows) where that is smaller: the file shrinks with them"
    exp.add_argument("--sparse", action="store_true", help=sparse)
    _add_threshold_argument(exp)
    exp.add_argument("--threads", type=_parse(_POSITIVE_INT), metavar="N", help="torch CPU threads (default: torch's)")


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def _torchrun_world_size() -> int:
    """The number of processes that torchrun (or another launcher) started, from ``WORLD_SIZE``; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RunError(
            f"the environment variable WORLD_SIZE must be an integer; got {os.environ['WORLD_SIZE']!r}"
        ) from None


def _fit(args, argv) -> None:
    import torch.distributed as dist

    from pyro_vdrop import train

    given = {name: getattr(args, name) for name in _CONFIG_FIELDS if getattr(args, name) is not None}
    command = "pyro-vdrop " + shlex.join(argv)
    if args.resume:
        if args.out is None:
            raise RunError("--resume needs --out DIR, the run to continue")
        config = None
    else:
        try:
            config = TrainConfig.for_dataset(**given)  # the data set's recipe where no option is given
        except ValueError as e:
            raise RunError(str(e)) from e
    nproc, torchrun = args.nproc or 1, _torchrun_world_size() > 1
    if torchrun and args.nproc is not None:
        raise RunError("--nproc starts its own processes: under torchrun leave it out (--nproc_per_node sets them)")
    if config is not None:
        train.check_batch_size(config.batch_size, nproc)  # before starting processes
    out = args.out
    if out is None:
        out = Path("runs") / f"{config.model}-{config.guide}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = dict(
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        command=command,
        overrides=given if args.resume else None,
    )
    if nproc > 1:
        summary = train.launch(train.fit, config, out, nproc=nproc, threads=args.threads, **options)
    elif torchrun:
        with train.process_group():
            if args.out is None:  # the processes may have started in different seconds: take process 0's name
                choice = [out]
                dist.broadcast_object_list(choice, src=0)
                out = choice[0]
            summary = train.fit(config, out, **options)
            if dist.get_rank() != 0:
                return
    else:
        summary = train.fit(config, out, **options)
    print(
        f"pyro-vdrop fit: {summary['model']}, {summary['guide']} guide, {summary['estimator']} estimator, "
        f"{summary['dataset']} ({summary['num_train']} train / {summary['num_test']} test), "
        f"{summary['epochs']} epochs in {summary['time']:.1f} s"
        + (f", {summary['nproc']} processes" if summary["nproc"] > 1 else "")
    )
    print(f"  test error (θ)          {_percent(summary['test_error'])}")
    threshold = summary.get("threshold", PRUNE_THRESHOLD)
    print(
        f"  test error (pruned)     {_percent(summary['test_error_pruned'])}   (weights with log α > {threshold:g} "
        "removed)"
    )
    print(
        f"  compression             {summary['compression']:.1f}×   (sparsity {_percent(summary['sparsity'])}, "
        f"{summary['kept']:,} of {summary['weights']:,} weights kept)"
    )
    units = summary.get("units") or {}
    if units:
        kept = ", ".join(f"{c['inputs_kept']}/{c['inputs']}" for c in units.values())
        print(f"  input units kept        {kept}   (per layer: {', '.join(units)})")
    print(f"  run directory           {summary['run']}")


def _evaluate(args) -> None:
    from pyro_vdrop import train

    result = train.evaluate(
        args.run,
        num_samples=args.num_samples,
        threshold=args.threshold,
        device=args.device,
        data_dir=args.data_dir,
        seed=args.seed,
    )
    print(
        f"pyro-vdrop evaluate: {result['run']} (epoch {result['epoch']} of {result['epochs']}), "
        f"{result['num_test']} test images"
    )
    print(f"  {'':<34} {'error':>8} {'NLL':>7} {'Brier':>7} {'ECE':>7}   (ECE: {result['ece_bins']} equal-width bins)")
    for label, suffix in (
        ("θ network", ""),
        (f"pruned (log α > {result['threshold']:g})", "_pruned"),
        (f"MC predictive (S={result['num_samples']})", "_mc"),
    ):
        figures = [result[f"test_{name}{suffix}"] for name in ("nll", "brier", "ece")]
        print(f"  {label:<34} {_percent(result[f'test_error{suffix}']):>8} " + " ".join(f"{v:7.4f}" for v in figures))
    kept = f"({result['kept']:,} of {result['weights']:,} weights kept)"
    compression = f"{result['compression']:.1f}×"
    print(f"  {'compression':<34} {compression:>8}   {kept}")
    shifts = result["ood"]["shifts"]
    print(
        f"  out of distribution: MC predictive, {shifts['test']['num_examples']} images per set; entropy H and mutual\n"
        "  information MI in nats; AUROC of telling the set from the test images by MI and by H (0.5: chance)"
    )
    print(f"  {'set':<16} {'accuracy':>9} {'entropy':>8} {'MI':>8} {'AUROC(MI)':>10} {'AUROC(H)':>9}")
    for name, row in shifts.items():
        accuracy = "—" if row["accuracy"] is None else _percent(row["accuracy"])
        aurocs = [row.get(f"auroc_{k}") for k in ("mutual_information", "entropy")]
        aurocs = ["—" if v is None else f"{v:.3f}" for v in aurocs]
        print(
            f"  {name:<16} {accuracy:>9} {row['entropy']:8.4f} {row['mutual_information']:8.4f} "
            f"{aurocs[0]:>10} {aurocs[1]:>9}"
        )
    print(f"  written to {Path(args.run) / train.EVALUATION_FILE}")
    _say_in_progress("evaluate", result["in_progress"])


def _report(args) -> None:
    from pyro_vdrop import train

    holder = train.run_in_progress(args.run)
    path = train.write_report(args.run, max_units=args.max_units, threshold=args.threshold)
    print(f"pyro-vdrop report: wrote {path} and its figures")
    _say_in_progress("report", holder)


def _say_in_progress(command: str, holder: str | None) -> None:
    if holder is not None:
        print(
            f"pyro-vdrop {command}: note: the run is still being trained ({holder}); these are the figures of "
            "its last checkpoint",
            file=sys.stderr,
        )


def _convert(args) -> None:
    from pyro_vdrop import train

    path = train.convert_checkpoint(args.run)
    print(f"pyro-vdrop convert: {path} is in checkpoint format {train.CHECKPOINT_VERSION} (an older one is kept)")


def _export(args) -> None:
    from pyro_vdrop import train

    result = train.export_run(args.run, args.out, sparse=args.sparse, threshold=args.threshold)
    widths = "-".join(map(str, result["widths"]))
    print(f"pyro-vdrop export: wrote {result['out']}")
    print(f"  {'':<24} {'dense (pruned)':>16} {'exported':>16}")
    print(f"  {'units':<24} {widths:>16} {'-'.join(map(str, result['exported_widths'])):>16}")
    print(f"  {'parameters':<24} {result['parameters']:>16,} {result['exported_parameters']:>16,}")
    print(f"  {'file size':<24} {result['dense_bytes'] / 1e3:>13.1f} kB {result['exported_bytes'] / 1e3:>13.1f} kB")
    for batch, t in result["latency"].items():
        label = f"CPU latency, batch {batch}"
        print(f"  {label:<24} {1e3 * t['dense']:>13.3f} ms {1e3 * t['exported']:>13.3f} ms")
    label = f"test error ({result['num_test']})"
    print(f"  {label:<24} {_percent(result['test_error_pruned']):>16} {_percent(result['test_error_exported']):>16}")
    print(
        f"  (log α > {result['threshold']:g} pruned; exported weights stored "
        f"{'as sparse rows where smaller' if result['sparse'] else 'densely'}; latency: median of "
        f"{result['repeats']} calls; largest logit difference {result['max_abs_difference']:.2g})"
    )
    _say_in_progress("export", result["in_progress"])


def main(argv: list[str] | None = None) -> int:
    """
    Runs ``pyro-vdrop`` with the arguments ``argv`` (default ``sys.argv[1:]``).

    :returns: The exit status: 0 on success; 2 (after a message on stderr) for bad options, missing data or a
        run directory that does not fit or is in use; 1 when a file cannot be read or written (e.g. a full disk;
        the last checkpoint stays intact); 130 when interrupted.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) and (getattr(args, "nproc", None) or 1) == 1:  # else set in each process
        torch.set_num_threads(args.threads)
    try:
        if args.command == "fit":
            _fit(args, argv)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "report":
            _report(args)
        elif args.command == "export":
            _export(args)
        else:
            _convert(args)
    except RunError as e:
        if not isinstance(e, Rank0Error):  # else process 0 of a torchrun run reports it
            print(f"pyro-vdrop {args.command}: error: {e}", file=sys.stderr)
        return _EXIT_ERROR
    except OSError as e:  # a file that cannot be written or read: the files written before are intact
        print(f"pyro-vdrop {args.command}: I/O error: {e}", file=sys.stderr)
        return _EXIT_IO_ERROR
    except KeyboardInterrupt:
        if args.command == "fit" and os.environ.get("RANK", "0") == "0":  # under torchrun: process 0 says it
            print(
                "pyro-vdrop fit: interrupted; the last completed epoch is checkpointed: continue with "
                f"'pyro-vdrop fit --out DIR --resume{f' --nproc {args.nproc}' if args.nproc else ''}'",
                file=sys.stderr,
            )
        return _EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
