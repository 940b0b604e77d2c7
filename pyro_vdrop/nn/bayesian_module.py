# SPDX-License-Identifier: Apache-2.0
"""The model made by :func:`~pyro_vdrop.nn.bayesianize`: a torch network with random weights and a likelihood."""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

LIKELIHOODS = ("categorical", "normal")


class BayesianModule(PyroModule):
    r"""
    Base class of the models returned by :func:`~pyro_vdrop.nn.bayesianize`; not constructed directly.

    A model is the converted torch network itself (``isinstance(model, type(net))`` holds and its sample sites
    and parameters keep the network's module paths, e.g. ``"fc1.weight"``), with a :meth:`forward` that adds
    the likelihood of the observations:

    .. math::

        y_i \mid x_i, w \sim \mathrm{Categorical}(\mathrm{softmax}(f_w(x_i)))
        \quad\text{or}\quad \mathcal{N}(f_w(x_i), \sigma^2),
        \qquad i = 1, \dots, N,

    inside ``pyro.plate("data", size=N, subsample=torch.arange(M))`` for a minibatch of :math:`M` of the :math:`N`
    training points, so the data term of the ELBO is scaled by :math:`N/M` and the KL counted once [1, §1].

    Attributes: ``random_sites`` (the weight sites, in module order), ``likelihood``, ``num_data``,
    ``deterministic_modules`` (modules with parameters that were left deterministic).

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("BayesianModule is not constructed directly; use pyro_vdrop.nn.bayesianize(module)")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """
        Runs the network on the minibatch ``x`` and observes ``y`` at the site ``"obs"``.

        Posterior predictive draws with :class:`pyro_vdrop.infer.Predictive` (Pyro's ``Predictive`` first
        samples the model from its prior, which the improper prior cannot do), sequential rather than
        ``parallel=True`` (torch layers take one weight sample at a time)::

            predictive = pyro_vdrop.infer.Predictive(model, guide=guide, num_samples=100,
                                                     return_sites=["obs", "_RETURN"])   # "_RETURN": logits / means

        :param torch.Tensor x: A minibatch of inputs, batch dimension first (what the torch network takes).
        :param torch.Tensor y: Observations: int64 class labels of shape ``(M,)`` (categorical), or targets
            of the network's output shape ``(M, ...)`` (normal); None to sample them at ``"obs"``.
        :returns: the network's output — the logits (categorical) or the mean (normal).
        :rtype: torch.Tensor
        """
        out = super().forward(x)
        batch_size = out.shape[0]
        size = self.num_data if self.num_data is not None else batch_size
        if batch_size > size:
            raise ValueError(
                f"the minibatch has {batch_size} data points but num_data={size}; num_data must be the size of the "
                "whole training set (pass num_data=None to bayesianize to use the batch size)"
            )
        # The minibatch is already drawn (by the data loader): pass its indices, so that the plate does not draw a
        # random permutation of all N indices on every step (``subsample_size=`` would; ~0.5 ms for N = 60,000).
        subsample = torch.arange(batch_size, device=out.device)
        with pyro.plate("data", size=size, subsample=subsample):
            if self.likelihood == "categorical":
                if out.dim() != 2:
                    raise ValueError(
                        f"likelihood='categorical' needs network outputs (logits) of shape (M, classes), got "
                        f"{tuple(out.shape)}"
                    )
                pyro.sample("obs", dist.Categorical(logits=out), obs=y)
            else:
                if y is not None and y.shape != out.shape:
                    raise ValueError(
                        f"likelihood='normal' needs y of the network's output shape {tuple(out.shape)}, got "
                        f"{tuple(y.shape)}; reshape the targets (e.g. y.unsqueeze(-1) for one output)"
                    )
                pyro.sample("obs", dist.Normal(out, self.obs_scale).to_event(out.dim() - 1), obs=y)
        return out

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """
        The weights of the torch network the model was made from, one tensor per random site; since
        :class:`~pyro.nn.PyroSample` replaces those parameters, this is how a guide starts from a pretrained
        network::

            guide = AutoNormal(model, init_loc_fn=init_to_value(values=model.initial_weights()))

        :returns: ``{site name: tensor}`` (copies, on the model's device and dtype).
        """
        template = self.__dict__["_bayesianize_template"]
        return {name: template.get_parameter(name).detach().clone() for name in self.random_sites}

    def to_deterministic(self) -> torch.nn.Module:
        """
        A plain torch copy of the original network (same class, no Pyro), holding the original weights and
        the model's current deterministic parameters and buffers; used by :func:`~pyro_vdrop.nn.prune`.
        """
        import copy

        net = copy.deepcopy(self.__dict__["_bayesianize_template"])
        state = net.state_dict()
        own = self.state_dict()
        for key in state:
            if key in own and key not in self.random_sites:
                state[key] = own[key]
        net.load_state_dict(state)
        net.train(self.training)
        return net

    def __reduce__(self):
        # pickling (torch.save(model)): rebuild the same kind of model class around the original torch class
        state = getattr(self, "__getstate__", self.__dict__.copy)()
        return _New, (type(self)._torch_class,), state

    def _apply(self, fn, recurse=True):
        # keep the stored original network on the model's device and dtype (.to(), .double(), .cuda(), ...)
        super()._apply(fn, recurse)
        self.__dict__["_bayesianize_template"]._apply(fn)
        return self


def bayesian_class(module_class: type) -> type:
    """The class of a model made from an instance of the torch class ``module_class``."""
    return type(
        f"Bayesian{module_class.__name__}",
        (BayesianModule, PyroModule[module_class]),
        {"_torch_class": module_class, "__module__": __name__},
    )


class _New:
    """Unpickling helper: an empty model of the class made for ``module_class`` (as Pyro does for PyroModule)."""

    def __init__(self, module_class):
        self.__class__ = bayesian_class(module_class)


__all__ = ["BayesianModule"]
