# SPDX-License-Identifier: Apache-2.0

from .correlated_variational_dropout_normal import CorrelatedVariationalDropoutNormal


class GroupVariationalDropoutNormal(CorrelatedVariationalDropoutNormal):
    r"""
    The posterior of group (structured) variational dropout: one multiplicative noise variable per group of
    weights (an input or output unit of a linear layer, an input or output channel of a convolution),

    .. math::

        w_{ij} = \theta_{ij} z_g, \qquad q(z_g) = \mathcal{N}(1, \alpha_g), \qquad p(z_g) \propto 1/|z_g| ,

    where :math:`\theta` is a point estimate (a parameter without a prior, as the weights of structured Bayesian
    pruning [2] and of the group formulation of Bayesian compression [3]) and :math:`z_g` is latent, with the
    improper log-uniform prior of variational dropout [1]. Sampling is that of
    :class:`CorrelatedVariationalDropoutNormal` (one noise variable shared along the size-1 dims of
    ``log_alpha``); under :func:`~pyro_vdrop.poutine.local_reparam` the noise is drawn exactly on the layer's
    inputs (outputs) per example. What differs is the KL, registered against
    :class:`~pyro_vdrop.distributions.ImproperLogUniform`: the KL of the group model,

    .. math::

        \mathrm{KL}(q \,\|\, p) = \sum_g \mathrm{KL}\big(\mathcal{N}(1, \alpha_g) \,\|\, p(z) \propto 1/|z|\big)
            = \sum_g k(\log\alpha_g) ,

    *once per group* (:math:`k` is :func:`~pyro_vdrop.distributions.log_uniform_kl`, the same function of
    :math:`\log\alpha` as for one weight, since the KL from :math:`\mathcal{N}(\mu, \alpha\mu^2)` to the
    scale-invariant prior does not depend on :math:`\mu`). With it the ELBO
    :math:`\mathbb{E}_q \log p(y \mid x, \theta \odot z) - \sum_g k(\log\alpha_g)` is the ELBO of the model
    above, up to the additive constant of the improper prior (and the error of the fit :math:`k`). By scale
    invariance the site's prior :math:`p(w) \propto 1/|w|` of each weight is exactly the law of
    :math:`\theta z` under :math:`p(z) \propto 1/|z|`; the site's ``ImproperLogUniform`` is read as that prior
    of the shared noise. The registered KL spreads each group's term evenly over its weights (``k / n_g``
    per weight, for a group of :math:`n_g` weights), so that it has the site's shape and sums to the group KL.

    Compared with :class:`CorrelatedVariationalDropoutNormal` (variational dropout A [1, §3.3], the same
    sampling with the *marginal* KL of every weight, which grows with the group's size and is the KL of no
    model: Hron et al. [4] show the KL of the degenerate joint to a per-weight log-uniform prior is infinite),
    this is A with :math:`\alpha` per unit made into a pruning method: a group with large :math:`\alpha_g`
    (:math:`\log\alpha_g > 3`) carries no signal and its whole column (channel) is removed.

    :meth:`log_prob` is the mean-field surrogate of :class:`CorrelatedVariationalDropoutNormal`; use
    :class:`~pyro.infer.TraceMeanField_ELBO`, which uses the registered KL.

    :param torch.Tensor loc: :math:`\theta`.
    :param torch.Tensor log_alpha: :math:`\log\alpha` per group, its shape (right-aligned against ``loc``) the
        shape of the shared noise, e.g. ``(1, in)`` for input units of a linear weight ``(out, in)``.
    :param str kl_approx: The KL fit (``"molchanov"`` or ``"kingma"``); ``None`` defers to the prior's.
    :param tuple log_alpha_clip: Optional ``(low, high)`` bounds on :math:`\log\alpha` inside the KL only.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
    [2] Neklyudov, Molchanov, Ashukha, Vetrov. "Structured Bayesian Pruning via Log-Normal Multiplicative
        Noise." NeurIPS 2017.
    [3] Louizos, Ullrich, Welling. "Bayesian Compression for Deep Learning." NeurIPS 2017.
    [4] Hron, Matthews, Ghahramani. "Variational Bayesian dropout: pitfalls and fixes." ICML 2018.
    """

    @property
    def group_size(self) -> int:
        """The number of weights sharing one noise variable."""
        return self.batch_shape.numel() // self.noise_shape.numel()


__all__ = ["GroupVariationalDropoutNormal"]
