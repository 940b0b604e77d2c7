# SPDX-License-Identifier: Apache-2.0
"""
Exports a run of ``pyro-vdrop fit`` to ArviZ and checks it with ``az.summary`` and ``az.loo``.

    pyro-vdrop fit --out runs/lenet300
    python examples/arviz_lenet300.py --run runs/lenet300
"""

import argparse
import warnings

import arviz as az

import pyro_vdrop as vd
from pyro_vdrop.train import open_run


def main(args):
    session, _ = open_run(args.run)
    x, y = session.x_test, session.y_test
    with vd.local_reparam():  # predictive draws with per-example pre-activation noise
        idata = vd.to_inference_data(
            session.model, session.guide, x, y, num_samples=args.num_samples, chains=2, var_names=["fc3.weight"]
        )
    print(idata)
    print(az.summary(idata, var_names=["fc3.weight"], kind="stats").head(6))
    print(idata["variational"][["num_weights", "num_pruned", "sparsity"]].to_dataframe())
    with warnings.catch_warnings():
        # draws from a variational fit give a few high Pareto k; the table below reports them
        warnings.filterwarnings("ignore", message=".*Pareto distribution.*")
        print(az.loo(idata))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run directory written by pyro-vdrop fit")
    parser.add_argument("--num-samples", type=int, default=100, help="draws per chain")
    main(parser.parse_args())
