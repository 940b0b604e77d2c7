# SPDX-License-Identifier: Apache-2.0
"""
Kingma et al.'s Fig. 1a [1] across widths: test error of the 3-hidden-layer ReLU network on MNIST against the
hidden width, for Bernoulli dropout (p = 0.5 on the hidden units), Bernoulli-equivalent Gaussian dropout
(α = p/(1-p) fixed), and variational dropout A (correlated noise), A2 (A with the KL scaled by 1/3) and B
(independent noise), the Gaussian and variational ones trained with the local reparameterization trick. The
variational ones start from the Gaussian dropout they generalise, log α = log(p/(1-p)) (``--init-log-alpha``), and
learn α ≤ 1 from there.

    python -m benchmarks.fig1a --widths 100 500 1000 1250 --epochs 100      # the grid (days on a CPU)
    python -m benchmarks.fig1a --widths 100 --epochs 5 --methods A B        # a short run
    python -m benchmarks.fig1a --epochs 100 --estimate                      # CPU-time estimate of the grid
    python -m benchmarks.fig1a --epochs 100 --plot                          # the PNG, from the records
    python -m benchmarks.fig1a --epochs 100 --device cuda --jobs 8          # a GPU machine: 8 cells at a time

Every (width, method) cell is one run: its run folder (``runs/benchmarks/fig1a-<E>ep/w<W>-<method>``) is resumed
when interrupted, and its record ``benchmarks/results/fig1a/w<W>-<method>-<E>ep.json`` (command, versions, machine,
configuration, learning curve, final errors) is written when it ends; a cell whose record exists is skipped, so
rerunning the grid continues it. ``--jobs N`` trains N cells at once, each in its own process of this script with
its output in ``runs/benchmarks/fig1a-<E>ep/w<W>-<method>.log``. ``--plot`` draws test error against width, one
line per method, and the learning curves (``fig1a-<E>ep-curves.png``: test error against epoch per width), from the
records (needs matplotlib: ``pip install pyro-vdrop[plot]``). Needs the MNIST files (``--data-dir`` or
``$PYRO_VDROP_MNIST_DIR``) unless ``--dataset embedded``.

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
"""

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.paper import (
    RESULTS,
    epoch_logger,
    estimate_fit_seconds,
    hours,
    load_state,
    restore_rng_state,
    rng_state,
    save_state,
    write_record,
)
from pyro_vdrop.train import TrainConfig, environment, evaluate, fit, open_run, read_metrics
from pyro_vdrop.train.components import load_data, seeded_generator, select_device
from pyro_vdrop.train.config import LEARNED_ALPHA_GUIDES
from pyro_vdrop.train.errors import RunError

METHODS = ("bernoulli", "gaussian-dropout", "A", "A2", "B")
#: Not in the default grid: Bernoulli dropout also on the pixels, where ``gaussian-dropout`` (and A's initial α)
#: put noise: the input of every linear layer
EXTRA_METHODS = ("bernoulli-inputs",)
#: The methods trained as plain torch networks with ``nn.Dropout`` (:func:`train_bernoulli`), not with ``fit``
BERNOULLI_METHODS = ("bernoulli", "bernoulli-inputs")
#: The methods that learn α (their records say where it ended: ``log_alpha``)
LEARNED_ALPHA_METHODS = ("A", "A2", "B")
LABELS = {
    "bernoulli": "Bernoulli dropout p=0.5",
    "bernoulli-inputs": "Bernoulli dropout p=0.5, inputs too",
    "gaussian-dropout": "Gaussian dropout",
    "A": "variational dropout A",
    "A2": "variational dropout A2",
    "B": "variational dropout B",
}
WIDTHS = (100, 500, 1000, 1250)
#: Read off Kingma et al. (2015), Fig. 1a (approximate): variational dropout A about 1.4% at 100 hidden units,
#: A2 under 1% at 1250 units.
PAPER_NOTE = "Fig. 1a of Kingma et al. (2015), read off the plot: A ≈ 1.4% at 100 units; A2 < 1% at 1250 units"
PAPER = {"A": {100: 0.014}, "A2": {1250: 0.01}}


def record_path(results, width, method, epochs) -> Path:
    return Path(results) / "fig1a" / f"w{width}-{method}-{epochs}ep.json"


def config_for(args, width, method) -> TrainConfig:
    return TrainConfig(
        model="mlp",
        width=width,
        dataset=args.dataset,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        guide="gaussian-dropout" if method in BERNOULLI_METHODS else method,
        dropout_p=args.p,
        estimator="lrt",
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_warmup=args.kl_warmup,
        pretrain_epochs=0,
        init_log_alpha=args.init_log_alpha if method in LEARNED_ALPHA_GUIDES else None,
        seed=args.seed,
        device=args.device,
    )


def resolve_init_log_alpha(args):
    """Sets ``args.init_log_alpha`` to log(p/(1-p)), Gaussian dropout's α for ``args.p``, unless it was given."""
    if args.init_log_alpha is None:
        args.init_log_alpha = math.log(args.p / (1 - args.p))
    return args


def train_bernoulli(config: TrainConfig, run_dir: Path, *, progress: bool, inputs: bool = False) -> dict:
    """
    Plain training of the same network with ``nn.Dropout(p)`` after every hidden ReLU (Srivastava et al. 2014's
    Bernoulli dropout on the hidden units), and with ``inputs`` on the pixels too (the input of every linear
    layer, where the Gaussian-dropout guide puts its noise); Adam with the run's learning-rate schedule; test
    error per epoch. Checkpointed after every epoch in ``run_dir/bernoulli.pt`` and resumed from it.
    """
    from pyro_vdrop import nn as vnn

    device = select_device(config.device)
    torch.manual_seed(config.seed)
    base = vnn.mnist_mlp(config.width)
    layers = [torch.nn.Dropout(config.dropout_p)] if inputs else []
    for m in base.children():
        layers.append(m)
        if isinstance(m, torch.nn.ReLU):
            layers.append(torch.nn.Dropout(config.dropout_p))
    net = torch.nn.Sequential(*layers).to(device)
    x, y, xt, yt = load_data(config, device=device)
    n, b = x.shape[0], config.batch_size
    steps = -(-n // b) * config.epochs
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(1.0 - s / steps, 0.0) if config.lr_decay == "linear" else 1.0
    )
    path = run_dir / "bernoulli.pt"
    history, epoch, elapsed = [], 0, 0.0
    if path.is_file():
        state = load_state(path)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        restore_rng_state(state, device)
        history, epoch, elapsed = json.loads(state["history"]), int(state["epoch"]), float(state["elapsed"])
    while epoch < config.epochs:
        t0 = time.perf_counter()
        net.train()
        order = torch.randperm(n, generator=seeded_generator(config.seed, epoch))
        total = 0.0
        for i in range(0, n, b):
            idx = order[i : i + b]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * idx.shape[0]
        net.eval()
        with torch.no_grad():
            test_error = sum(
                (net(xt[i : i + 1000]).argmax(-1) != yt[i : i + 1000]).sum().item() for i in range(0, len(xt), 1000)
            ) / len(xt)
        epoch += 1
        seconds = time.perf_counter() - t0
        elapsed += seconds
        history.append({"epoch": epoch, "loss": total / n, "test_error": test_error, "epoch_time": seconds})
        save_state(
            path,
            {
                "net": net.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                **rng_state(device),
                "history": json.dumps(history),
                "epoch": epoch,
                "elapsed": elapsed,
            },
        )
        if progress:
            print(f"  bernoulli w{config.width} epoch {epoch}/{config.epochs}: test error {test_error:.4f}", flush=True)
    return {"test_error": history[-1]["test_error"], "time": elapsed, "metrics": history}


def log_alpha_summary(run_dir) -> dict:
    """
    The learned α of a variational-dropout cell, per weight site: the mean log α in force (after the cap) over the
    site's weights, the share of its weights at the cap (α = 1, Gaussian dropout's p = 0.5), and the cap.
    """
    session, _ = open_run(run_dir, device="cpu")
    guide = session.guide
    cap = guide.max_log_alpha
    with torch.no_grad():
        return {
            name: {
                "mean": value.mean().item(),
                "at_cap": None if cap is None else (value >= cap - 1e-3).double().mean().item(),
                "cap": cap,
            }
            for name, value in guide.log_alpha().items()
        }


def add_log_alpha(path: Path) -> None:
    """Adds :func:`log_alpha_summary` to a variational-dropout cell's record written without it, from its run."""
    record = json.loads(path.read_text())
    run_dir = Path(record.get("run_dir", ""))
    if record.get("method") not in LEARNED_ALPHA_METHODS or "log_alpha" in record:
        return
    if not (run_dir / "checkpoint.pt").is_file():
        print(f"  (no learned α in the record and no run at {run_dir} to read it from)", flush=True)
        return
    record["log_alpha"] = log_alpha_summary(run_dir)
    write_record(path, record)
    print(f"  added the learned α from {run_dir}", flush=True)


def run_cell(args, width, method, command) -> dict:
    config = config_for(args, width, method)
    run_dir = Path(args.run_root) / f"fig1a-{args.epochs}ep{args.suffix}" / f"w{width}-{method}"
    if method in BERNOULLI_METHODS:
        run_dir.mkdir(parents=True, exist_ok=True)
        result = train_bernoulli(config, run_dir, progress=not args.no_progress, inputs=method == "bernoulli-inputs")
        figures = {"test_error": result["test_error"], "test_error_mc": None, "test_nll_mc": None}
        summary, metrics = {"time": result["time"]}, result["metrics"]
    else:
        resume = (run_dir / "checkpoint.pt").is_file()
        summary = fit(
            config,
            run_dir,
            resume=resume,
            overwrite=not resume,
            progress=False,
            callback=None if args.no_progress else epoch_logger(f"fig1a w{width} {method}"),
            command=command,
        )
        result = evaluate(run_dir, num_samples=args.num_samples)
        figures = {k: result[k] for k in ("test_error", "test_error_mc", "test_nll_mc")}
        if method in LEARNED_ALPHA_METHODS:
            figures["log_alpha"] = log_alpha_summary(run_dir)
        metrics = read_metrics(run_dir)
    return {
        "benchmark": "fig1a",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        "width": width,
        "method": method,
        "label": LABELS[method],
        "epochs": args.epochs,
        "config": config.to_dict(),
        "run_dir": str(run_dir),
        "paper": PAPER_NOTE,
        **figures,
        "training_time_s": summary["time"],
        "metrics": metrics,
    }


def collect(results, epochs, suffix="") -> dict:
    """``{method: {width: record}}`` of the cell records for ``epochs``."""
    out = {}
    for path in sorted((Path(results) / "fig1a").glob(f"w*-*-{epochs}ep{suffix}.json")):
        r = json.loads(path.read_text())
        out.setdefault(r["method"], {})[r["width"]] = r
    return out


def plot(results, epochs, out, suffix="") -> Path:
    """Test error (%) against hidden width, one line per method, like [1, Fig. 1a]."""
    from pyro_vdrop.train.report import _import_pyplot

    plt = _import_pyplot()
    cells = collect(results, epochs, suffix)
    if not cells:
        raise FileNotFoundError(f"no fig1a records for {epochs} epochs in {Path(results) / 'fig1a'}")
    fig, ax = plt.subplots(figsize=(5, 4))
    for method in METHODS + EXTRA_METHODS:
        if method in cells:
            widths = sorted(cells[method])
            ax.plot(widths, [100 * cells[method][w]["test_error"] for w in widths], "o-", label=LABELS[method])
    ax.set_xlabel("hidden units per layer")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"MNIST, 3 hidden layers, {epochs} epochs")
    ax.grid(alpha=0.3)
    ax.legend()
    return _write_png(plt, fig, out)


def _write_png(plt, fig, out) -> Path:
    from pyro_vdrop.train.report import _save_figure

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, out)
    plt.close(fig)
    return out


def plot_curves(results, epochs, out, suffix="") -> Path:
    """The learning curves behind the figure: test error (%) against epoch, one panel per width, a line per method."""
    from pyro_vdrop.train.report import _import_pyplot

    plt = _import_pyplot()
    cells = collect(results, epochs, suffix)
    if not cells:
        raise FileNotFoundError(f"no fig1a records for {epochs} epochs in {Path(results) / 'fig1a'}")
    widths = sorted({w for row in cells.values() for w in row})
    fig, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths), 3.5), squeeze=False, sharey=True)
    for ax, width in zip(axes[0], widths):
        for method in METHODS + EXTRA_METHODS:
            record = cells.get(method, {}).get(width)
            if record is not None:
                curve = record["metrics"]
                ax.plot([m["epoch"] for m in curve], [100 * m["test_error"] for m in curve], label=LABELS[method])
        ax.set_title(f"{width} hidden units")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test error (%)")
    axes[0][0].legend(fontsize="small")
    return _write_png(plt, fig, out)


def table_text(cells, widths) -> str:
    lines = [f"| {'method':<24} |" + "".join(f" {f'w={w}':>8} |" for w in widths)]
    lines.append(f"|{'-' * 26}|" + f"{'-' * 10}|" * len(widths))
    for method in (*METHODS, *(m for m in EXTRA_METHODS if m in cells)):
        row = cells.get(method, {})
        cells_text = "".join(f" {100 * row[w]['test_error']:>6.2f} % |" if w in row else f" {'–':>8} |" for w in widths)
        lines.append(f"| {LABELS[method]:<24} |" + cells_text)
    return "\n".join(lines)


def cell_argv(argv, width, method) -> list[str]:
    """The command-line arguments ``argv`` of a grid run, narrowed to one cell and one job."""
    out, skip = [], False
    for a in argv:
        if a in ("--widths", "--methods", "--jobs"):
            skip = True
            continue
        if a.split("=", 1)[0] in ("--widths", "--methods", "--jobs"):
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return [*out, "--widths", str(width), "--methods", method, "--jobs", "1"]


def run_parallel(args, argv, cells) -> list[str]:
    """
    Runs ``cells`` (``(width, method)`` pairs) as ``args.jobs`` concurrent processes of this script, one cell each
    (each resumable and writing its own record), with their output in ``<run root>/fig1a-<E>ep/w<W>-<method>.log``.
    Returns the cells that failed.
    """
    import signal
    import subprocess

    def interrupted(signum, frame):  # a SIGTERM stops the cells too, as Ctrl-C does, instead of orphaning them
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    logs = Path(args.run_root) / f"fig1a-{args.epochs}ep{args.suffix}"
    logs.mkdir(parents=True, exist_ok=True)
    queue, running, failed = list(cells), {}, []
    try:
        while queue or running:
            while queue and len(running) < args.jobs:
                width, method = queue.pop(0)
                log = open(logs / f"w{width}-{method}.log", "a")
                cmd = [sys.executable, "-m", "benchmarks.fig1a", *cell_argv(argv, width, method)]
                running[f"w{width}-{method}"] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
                print(f"fig1a w{width} {method}: started (log {log.name})", flush=True)
            time.sleep(0.2)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[name]
                    print(f"fig1a {name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}")
                    if proc.returncode != 0:
                        failed.append(name)
    finally:  # interrupted: stop the cells still running (each resumes from its checkpoint on the next run)
        signal.signal(signal.SIGTERM, previous)
        for proc, log in running.values():
            proc.terminate()
            proc.wait()
            log.close()
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="hidden units per layer")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS + EXTRA_METHODS,
        default=list(METHODS),
        help="methods (default: the paper's five; bernoulli-inputs: Bernoulli dropout on the pixels too)",
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--p", type=float, default=0.5, help="dropout rate (Bernoulli; Gaussian's equivalent)")
    parser.add_argument(
        "--init-log-alpha",
        type=float,
        default=None,
        help="initial log alpha of A, A2, B (default log(p/(1-p)): the Gaussian dropout they generalise)",
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-warmup", type=float, default=0.0, help="epochs of KL warm-up (paper: none)")
    parser.add_argument("--num-samples", type=int, default=10, help="draws of the MC predictive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", choices=("mnist", "embedded"), default="mnist")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $PYRO_VDROP_MNIST_DIR)")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    parser.add_argument("--run-root", default="runs/benchmarks", help="parent of the run folders")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the records (cells under fig1a/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where to train")
    parser.add_argument("--jobs", type=int, default=1, help="cells trained at once, each in its own process")
    parser.add_argument("--estimate", action="store_true", help="print the grid's CPU-time estimate and exit")
    parser.add_argument("--plot", action="store_true", help="only draw the PNG from the records")
    parser.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if not 0 < args.p < 1:
        parser.error(f"--p must be in (0, 1), got {args.p}")
    resolve_init_log_alpha(args)
    args.suffix = "" if args.dataset == "mnist" else "-embedded"
    torch.set_num_threads(args.threads)
    png = Path(args.results) / f"fig1a-{args.epochs}ep{args.suffix}.png"
    curves = png.with_name(f"fig1a-{args.epochs}ep{args.suffix}-curves.png")
    if args.plot:
        print(f"wrote {plot(args.results, args.epochs, png, args.suffix)}")
        print(f"wrote {plot_curves(args.results, args.epochs, curves, args.suffix)}")
        return 0
    command = shlex.join(["python", "-m", "benchmarks.fig1a", *argv])
    if args.estimate:
        total = 0.0
        for width in args.widths:
            for method in args.methods:
                path = record_path(args.results, width, method, args.epochs)
                if path.with_name(path.stem + args.suffix + ".json").is_file():
                    continue
                # Bernoulli dropout is a plain network: about a third of a Gaussian-dropout step
                e = estimate_fit_seconds(
                    config_for(args, width, "gaussian-dropout" if method in BERNOULLI_METHODS else method)
                )
                seconds = e["seconds"] / (3 if method in BERNOULLI_METHODS else 1)
                total += seconds
                print(f"fig1a w{width} {method}: {1e3 * e['seconds_per_step']:.0f} ms/step, about {hours(seconds)}")
        print(f"fig1a grid, {args.epochs} epochs, cells without a record: about {hours(total)} in all", flush=True)
        return 0
    pending = []
    for width in args.widths:
        for method in args.methods:
            path = record_path(args.results, width, method, args.epochs)
            path = path.with_name(path.stem + args.suffix + ".json")
            if path.is_file():
                print(f"fig1a w{width} {method}: record {path} exists, skipped", flush=True)
                add_log_alpha(path)
            else:
                pending.append((width, method, path))
    if args.jobs > 1:
        failed = run_parallel(args, argv, [(w, m) for w, m, _ in pending])
        if failed:
            print(f"fig1a: {len(failed)} cell(s) failed: {', '.join(failed)} (see their logs)", flush=True)
            return 1
    else:
        for width, method, path in pending:
            print(f"fig1a w{width} {method}: training {args.epochs} epochs", flush=True)
            record = run_cell(args, width, method, command)
            write_record(path, record)
            print(f"fig1a w{width} {method}: test error {100 * record['test_error']:.2f} %; wrote {path}", flush=True)
    print(f"\nFig. 1a, {args.epochs} epochs, MNIST ({PAPER_NOTE})")
    print(table_text(collect(args.results, args.epochs, args.suffix), args.widths))
    try:
        print(f"wrote {plot(args.results, args.epochs, png, args.suffix)}")
        print(f"wrote {plot_curves(args.results, args.epochs, curves, args.suffix)}")
    except RunError as e:  # matplotlib missing
        print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
