# SPDX-License-Identifier: Apache-2.0

import torch
from pyro.distributions import TorchDistribution
from pyro.distributions.util import broadcast_shape
from torch.distributions import constraints

from .util import check_kl_approx, safe_log_abs


class ImproperLogUniform(TorchDistribution):
    r"""
    The improper, scale-invariant log-uniform prior on the real line [1, §4],

    .. math::

        p(w) \propto \frac{1}{|w|}, \qquad \log p(w) = -\log |w| ,

    i.e. :math:`\log |w|` is uniform on the whole real line. It is the prior under
    which Gaussian dropout is exact variational inference: the KL divergence from a
    variational-dropout posterior :math:`q(w) = \mathcal{N}(\theta, \alpha\theta^2)`
    depends on :math:`\alpha` alone, and is registered with
    :func:`torch.distributions.kl.kl_divergence` (see :mod:`pyro_vdrop.distributions.kl`).

    The prior is improper: it has no normalising constant and cannot be sampled.
    Use it as the prior of weight sites together with a variational-dropout guide
    (:class:`~pyro_vdrop.infer.AutoVariationalDropout`) or any guide whose site
    distributions are :class:`~pyro.distributions.Normal`, and an ELBO that uses the
    analytic KL (:class:`~pyro.infer.TraceMeanField_ELBO`)::

        self.fc.weight = PyroSample(ImproperLogUniform().expand([10, 784]).to_event(2))

    .. warning:: Hron, Matthews and Ghahramani (2018) show that with this prior the
        true posterior is generally improper and that sparsity under it is not a
        Bayesian Occam effect; read the KL as a regulariser. See the README's
        "Caveats".

    :param torch.Size batch_shape: The batch shape (usually set with :meth:`expand`).
    :param torch.Size event_shape: The event shape (usually set with ``.to_event()``).
    :param str kl_approx: The approximation used by the registered KL divergence
        when the guide's distribution does not choose one: ``"molchanov"`` (default)
        or ``"kingma"``; see :func:`~pyro_vdrop.distributions.log_uniform_kl`.
    :param torch.dtype dtype: The dtype of the weights (default: torch's default dtype). The prior
        has no tensor parameters to take it from; initialisation strategies such as
        :func:`~pyro_vdrop.infer.init_to_fan_in` create values with it.
    :param torch.device device: The device of the weights (default: torch's default device).

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        batch_shape=torch.Size(),
        event_shape=torch.Size(),
        *,
        kl_approx="molchanov",
        dtype=None,
        device=None,
        validate_args=None,
    ):
        self.kl_approx = check_kl_approx(kl_approx)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"ImproperLogUniform: dtype must be a floating-point torch.dtype or None, got {dtype!r}")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ImproperLogUniform, _instance)
        new.kl_approx = self.kl_approx
        new.dtype = self.dtype
        new.device = self.device
        super(ImproperLogUniform, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        r"""
        :math:`-\log|w|`, summed over the event dims. At ``w = 0``, where the density is infinite,
        :math:`|w|` is clamped at the smallest normal number of its dtype (about 87.3 for float32,
        708.4 for float64), so that a weight sample that happens to be exactly 0 (which float32
        sampling of a large layer does produce now and then) gives a large finite value rather
        than ``inf`` and a crash.
        """
        if self._validate_args:
            self._validate_sample(value)
        log_p = -safe_log_abs(value)
        if self.event_dim:
            log_p = log_p.sum(tuple(range(-self.event_dim, 0)))
        shape = broadcast_shape(log_p.shape, self.batch_shape)
        return log_p.expand(shape)

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "ImproperLogUniform is an improper prior (p(w) ∝ 1/|w| has no normalising constant) and cannot be "
            "sampled. Use it as the prior of a weight site with a variational-dropout guide, e.g. "
            "pyro_vdrop.infer.AutoVariationalDropout(model), and train with TraceMeanField_ELBO; to draw "
            "weights or predictions, sample from the guide with pyro_vdrop.infer.Predictive(model, guide=guide, ...) "
            "(pyro.infer.Predictive first samples the model from its prior, which fails on this prior), and "
            "initialise autoguides with init_loc_fn=pyro_vdrop.infer.init_to_fan_in. A PyroModule[nn.LSTM/GRU/RNN] "
            "samples every weight's prior whenever one weight is set or the module is moved: use "
            "pyro_vdrop.nn.LSTM/GRU/RNN for recurrent layers with this prior."
        )

    def rsample(self, sample_shape=torch.Size()):
        return self.sample(sample_shape)

    def __repr__(self):
        return (
            f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)}, "
            f"kl_approx={self.kl_approx!r})"
        )


__all__ = ["ImproperLogUniform"]
