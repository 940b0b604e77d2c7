# SPDX-License-Identifier: Apache-2.0
"""The lazy Gaussian weight that :class:`~pyro_vdrop.poutine.LocalReparamMessenger` puts at a weight site."""

import inspect

import torch
import torch.nn.functional as F
from torch.distributions import Normal

from pyro_vdrop.distributions import CorrelatedVariationalDropoutNormal, TruncatedLogNormal, TruncatedLogNormalDropout
from pyro_vdrop.distributions.util import base_distribution

from .estimators import ESTIMATORS, FLIPOUT, LRT, MEAN, PER_EXAMPLE
from .lazy_ops import (
    UnsupportedOperation,
    _noise,
    conv_correlated,
    conv_flipout,
    conv_lrt,
    conv_mean,
    conv_per_example,
    conv_transpose_correlated,
    embedding_correlated,
    embedding_flipout,
    embedding_mean,
    embedding_per_example,
    linear_correlated,
    linear_flipout,
    linear_given_weights,
    linear_lrt,
    linear_lrt_weights,
    linear_mean,
    linear_per_example,
)

# Queries that reveal only metadata (shape, dtype, device), never the values of a weight.
_METADATA = {
    torch.Tensor.shape.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_cuda.__get__,
    torch.Tensor.layout.__get__,
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.__len__,
    torch.Tensor.get_device,
}
# Constructors that use only the metadata of their argument (e.g. the zero log-Jacobian of the
# identity transform that AutoNormal applies to a real-valued site).
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like}
_LINEAR = {F.linear}
_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.mm}
_TRANSPOSE = {torch.Tensor.t, torch.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.transpose}
_TRANSPOSE.add(torch.transpose)
_RESHAPE = {torch.Tensor.reshape, torch.reshape, torch.Tensor.view}
# torch's fused recurrent kernels (torch._VF.lstm, ...), met when a torch RNN gets a lazy weight
_RECURRENT_KERNELS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_CONV_TRANSPOSE = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
# linear views that select elements of a weight (each element at most once): they stay lazy Gaussians
_SLICE = {torch.Tensor.__getitem__, torch.Tensor.narrow, torch.narrow, torch.Tensor.index_select, torch.index_select}
_SPLIT = {torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split, torch.Tensor.unbind, torch.unbind}


class LazyWeightError(RuntimeError):
    """
    Raised when a lazy weight is used by an operation that the local reparameterization does not support, or
    used twice in one model run in a way whose noise cannot be shared.
    """


_SUPPORTED = (
    "F.linear, matmul/@, F.conv1d/2d/3d, F.conv_transpose1d/2d/3d, F.embedding and F.multi_head_attention_forward "
    "(after transposes, reshapes, slicing, narrow, index_select, chunk or split) are supported, and adding a lazy "
    "bias to a batch of pre-activations"
)


def _op_name(func):
    name = getattr(func, "__name__", repr(func))
    if name == "__get__":
        # property getters (``w.T``, ``w.mT``) show up as method-wrappers of a getset descriptor
        owner = getattr(func, "__self__", None)
        name = getattr(owner, "__name__", name)
    return name


class LazyWeight(torch.Tensor):
    r"""
    A Gaussian weight that is never sampled: the value of a weight site inside
    :func:`~pyro_vdrop.poutine.local_reparam`.

    It has the shape, dtype and device of the weight, and carries the weight's factorized
    Gaussian posterior. A supported linear operation (``F.linear``, ``@``/``matmul``,
    ``F.conv1d/2d/3d``, transposes and reshapes) returns a sample of its *output*
    (the pre-activation) instead of the output for one weight sample [1, §2.3]:

    .. math::

        \gamma = \mathrm{op}(x, \mu), \qquad \delta = \mathrm{op}(x^2, \sigma^2), \qquad
        b = \gamma + \sqrt{\delta} \odot \zeta, \quad \zeta \sim \mathcal{N}(0, I)

    (``"lrt"``), or a Flipout sample [2] :math:`\mathrm{op}(x, \mu) + \mathrm{op}(x \odot s, \sigma
    \odot \epsilon) \odot r` with random signs :math:`r, s` per example (``"flipout"``). With the
    correlated posterior (:class:`~pyro_vdrop.distributions.CorrelatedVariationalDropoutNormal`,
    "variational dropout A" [1, §3.3]) the noise shared by a weight's input (output) units is drawn
    as Gaussian noise :math:`\xi \sim \mathcal{N}(1, \alpha)` on the op's input (output), once per
    example: this is exact for either estimator.

    ``F.conv_transpose1d/2d/3d`` work alike; ``F.embedding`` (see :func:`lazy_embedding`) draws one weight per
    example (dim 0 of the indices) at the looked-up rows; ``F.multi_head_attention_forward`` (see
    :func:`lazy_multi_head_attention_forward`) runs its projections as lazy linear ops. Slices that pick each
    element at most once (basic indexing, boolean masks and index lists without repeats, ``narrow``,
    ``index_select``, ``chunk``, ``split``, ``unbind``) are lazy weights too: a slice is an independent part of a
    factorized Gaussian.

    Every other use of the tensor (elementwise maths, reading its values, a repeated index) raises a
    :class:`LazyWeightError` naming the site and the operation, unless the handler was created
    with ``fallback=True``, in which case one ordinary weight sample is drawn for the site.
    An autoguide's auxiliary value (``auxiliary=True``) that the guide transforms before handing it
    to the model (e.g. ``exp`` for a positive site) becomes one ordinary sample at that transform,
    and the guide's site then gets its ordinary log-density.

    **Weight tying.** After :meth:`start_run` (the handler calls it when the model's site receives the
    weight) every use of the weight in that model run sees the same weight per example: a second
    ``F.linear``/``matmul`` use (e.g. ``W.t()`` in a decoder) reuses the first use's Flipout perturbation
    and signs or correlated noise, and for LRT and ``"per-example"`` uses per-example weight samples that
    agree with the first use's output (drawn by Matheron's rule, :func:`~pyro_vdrop.poutine.lazy_ops.
    linear_lrt_weights`), so the joint law of the outputs is exact. Tied uses that cannot share their noise
    (a convolution, an embedding lookup, a reshaped weight, inputs of another batch shape, an ordinary sample
    after a noisy use) raise a :class:`LazyWeightError` naming the site and both operations. Uses of disjoint
    slices of a weight (the query and key/value parts of a packed attention projection) are independent; a
    slice used twice is tied like the whole weight; slices that overlap partly raise.

    Semantics: every leading index of a linear op's input is an example with its own,
    independent weight noise; for convolutions LRT noise is independent per output element
    (the marginal of every output is exact, as in [1]), Flipout and correlated noise per example.

    **References**

    [1] Kingma, Salimans, Welling. "Variational Dropout and the Local
        Reparameterization Trick." NeurIPS 2015.
    [2] Wen, Vicol, Ba, Tran, Grosse. "Flipout: Efficient Pseudo-Independent Weight
        Perturbations on Mini-Batches." ICLR 2018.
    """

    @staticmethod
    def __new__(
        cls,
        loc,
        scale=None,
        noise_scale=None,
        *,
        site,
        estimator,
        distribution,
        fallback,
        auxiliary,
        moments=None,
        noise_loc=None,
        noise_bounds=None,
    ):
        self = torch.Tensor._make_subclass(cls, loc.detach(), False)
        self._loc = loc
        # independent noise: the standard deviation and variance of every weight, each computed on first use
        # (from ``moments``, a distribution with ``scale`` and ``variance``, or from the other one), so that
        # LRT needs no standard deviation and Flipout no variance
        self._std = scale
        self._var = None
        self._moments = moments
        self._noise_scale = noise_scale  # correlated noise: sqrt(alpha), broadcastable to loc
        # log-normal noise (structured Bayesian pruning): mu and sigma of log s (sigma in _noise_scale), (a, b)
        self._noise_loc = noise_loc
        self._noise_bounds = noise_bounds
        self.site = site
        self.estimator = estimator
        self.distribution = distribution
        self.fallback = fallback
        self.auxiliary = auxiliary
        self.kl_scale = 1.0
        self.kl_mask = None
        self._sample = None
        self._parent = None
        self._view_fn = None
        # weight tying (kept on the root): whether uses are tracked as one model run, and the first noisy use of
        # each region of the weight (a view's elements; views of disjoint elements are independent weights)
        self._tracking = False
        self._ties = []
        self._probe = None
        # auxiliary values: whether the value reached a site unchanged, or an ordinary sample was drawn
        # for the guide's transform
        self._delivered = False
        self._guide_sampled = False
        return self

    def __init__(self, *args, **kwargs):
        # Everything happens in __new__ (torch.Tensor.__init__ takes no arguments).
        pass

    @classmethod
    def from_distribution(cls, fn, *, site, estimator, fallback=False, auxiliary=False):
        """
        Makes the lazy weight of a site from its (guide) distribution, or returns ``None`` when
        the distribution is not a factorized Gaussian the local reparameterization understands.

        :param fn: The site's distribution: a :class:`~torch.distributions.Normal` (including
            :class:`~pyro_vdrop.distributions.VariationalDropoutNormal`) or a
            :class:`~pyro_vdrop.distributions.CorrelatedVariationalDropoutNormal`, optionally
            wrapped in ``.to_event(n)``.
        :rtype: LazyWeight or None
        """
        base = base_distribution(fn, torch.distributions.Independent)
        if not isinstance(base, (Normal, CorrelatedVariationalDropoutNormal, TruncatedLogNormalDropout)):
            return None
        if base.batch_shape != fn.batch_shape + fn.event_shape:
            return None
        kwargs = dict(site=site, estimator=estimator, distribution=fn, fallback=fallback, auxiliary=auxiliary)
        if isinstance(base, TruncatedLogNormalDropout):
            bounds = (base.low, base.high)
            return cls(base.loc, noise_scale=base.noise_scale, noise_loc=base.noise_loc, noise_bounds=bounds, **kwargs)
        if isinstance(base, CorrelatedVariationalDropoutNormal) and base.noise_shape != base.batch_shape:
            return cls(base.loc, noise_scale=(0.5 * base.noise_log_alpha).exp(), **kwargs)
        # a Normal, or a correlated posterior with nothing shared (independent noise)
        return cls(base.loc, moments=base, **kwargs)

    def __repr__(self, *, tensor_contents=None):
        return f"LazyWeight(site={self.site!r}, shape={tuple(self.shape)}, estimator={self.estimator!r})"

    @property
    def is_correlated(self) -> bool:
        """Whether the weight has correlated noise (:attr:`noise_scale`) rather than independent noise."""
        return self._noise_scale is not None

    @property
    def loc(self) -> torch.Tensor:
        """The mean of every weight (differentiable: the guide's parameter, or its transpose or reshape)."""
        return self._loc

    @property
    def root(self) -> "LazyWeight":
        """The lazy weight of the site itself, of which this one is a transpose or reshape (or itself)."""
        lazy = self
        while lazy._parent is not None:
            lazy = lazy._parent
        return lazy

    @property
    def noise_scale(self) -> torch.Tensor | None:
        """
        Correlated noise: :math:`\\sqrt\\alpha` of each noise variable (:math:`\\sigma` of :math:`\\log s` for
        log-normal noise), broadcastable to :attr:`loc`; else None.
        """
        return self._noise_scale

    @property
    def noise_fn(self):
        """
        Log-normal noise (:class:`~pyro_vdrop.distributions.TruncatedLogNormalDropout`): the map from standard
        normals of the noise's shape to noise samples; None for Gaussian noise (:math:`1 + \\sqrt\\alpha\\,\\epsilon`).
        """
        if self._noise_loc is None:
            return None
        low, high = (torch.full_like(self._noise_loc, b) for b in self._noise_bounds)
        noise = TruncatedLogNormal(self._noise_loc, self._noise_scale, low, high, validate_args=False)
        return noise.from_standard_normal

    @property
    def scale(self) -> torch.Tensor | None:
        """The standard deviation of every weight (independent noise), or None (correlated noise)."""
        if self._std is None and not self.is_correlated:
            if self._moments is not None:
                self._std = self._moments.scale
            elif self._parent is not None:
                self._std = self._view_fn(self._parent.scale)
        return self._std

    @property
    def variance(self) -> torch.Tensor | None:
        """The variance of every weight (independent noise), or None (correlated noise)."""
        if self._var is None and not self.is_correlated:
            if self._moments is not None:
                self._var = self._moments.variance
            elif self._parent is not None:
                self._var = self._view_fn(self._parent.variance)
            else:
                self._var = self._std * self._std
        return self._var

    # ----- transforms of the parameters (linear reshapes of the weight) -----

    def _derive(self, fn):
        """A lazy weight for ``fn(weight)``, where ``fn`` is a linear reshape (transpose, reshape, view)."""
        # the moments of independent noise are derived from the parent's on first use
        new = LazyWeight(
            fn(self._loc),
            None,
            None if self._noise_scale is None else fn(self._noise_scale),
            noise_loc=None if self._noise_loc is None else fn(self._noise_loc),
            noise_bounds=self._noise_bounds,
            site=self.site,
            estimator=self.estimator,
            distribution=self.distribution,
            fallback=self.fallback,
            auxiliary=self.auxiliary,
        )
        new._parent = self
        new._view_fn = fn
        return new

    def start_run(self) -> None:
        """
        Starts a model run: every later use of the weight (and of its transposes and reshapes) is one use of a
        single weight, whose noise the uses share (see *Weight tying* above). Earlier uses are forgotten, and
        so is an ordinary sample drawn for ``fallback=True`` (not one drawn for the guide's transform).
        """
        root = self.root
        root._tracking = True
        root._ties = []
        root._delivered = True
        if not root._guide_sampled:
            root._sample = None

    def mark_delivered(self) -> None:
        """Records that an autoguide passed this auxiliary value on unchanged (its transform is the identity)."""
        self.root._delivered = True

    @property
    def guide_sampled(self) -> bool:
        """Whether an ordinary sample was drawn for the guide's transform of this (auxiliary) value."""
        return self.root._guide_sampled

    def materialize(self):
        """One ordinary reparameterized sample of the weight (cached, so that every use agrees)."""
        root = self.root
        if root._sample is None:
            root._sample = root.distribution.rsample()
        if root is self:
            return root._sample
        return _replay_views(self, root._sample)

    # ----- dispatch -----

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        if func in _METADATA or func in _LIKE:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        lazies = [a for a in _flat(args, kwargs) if isinstance(a, LazyWeight)]
        if any(lazy.auxiliary and not lazy.root._delivered for lazy in lazies):
            # an autoguide's transform of its auxiliary value (exp, sigmoid, slicing, ...): the site is not a
            # weight with real support, so it becomes one ordinary sample (with its log-density in the guide)
            return _fallback_or_raise(func, args, kwargs, lazies, "")
        try:
            if func in _LINEAR:
                return _dispatch_linear(*args, **kwargs)
            if func in _CONV:
                return _dispatch_conv(_CONV[func], *args, **kwargs)
            if func in _MATMUL:
                return _dispatch_matmul(func, *args, **kwargs)
            if func in _TRANSPOSE:
                return _dispatch_transpose(func, *args, **kwargs)
            if func in _RESHAPE:
                return _dispatch_reshape(func, *args, **kwargs)
            if func in _ADD:
                return _dispatch_add(func, *args, **kwargs)
            if func in _SLICE or func in _SPLIT:
                return _dispatch_view(func, *args, **kwargs)
            if func is F.embedding:
                return _dispatch_embedding(*args, **kwargs)
            if func in _CONV_TRANSPOSE:
                return _dispatch_conv_transpose(_CONV_TRANSPOSE[func], *args, **kwargs)
            if func is F.multi_head_attention_forward:
                return lazy_multi_head_attention_forward(*args, **kwargs)
        except UnsupportedOperation as e:
            reason = str(e)
        else:
            reason = "only " + _SUPPORTED
            if _op_name(func) in _RECURRENT_KERNELS:
                reason += "; for recurrent layers use pyro_vdrop.nn.LSTM/GRU/RNN (bayesianize does), which run the "
                reason += "recurrence with one weight per sequence"
        return _fallback_or_raise(func, args, kwargs, lazies, reason)


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


_SELECT = (
    "choose the sites that the handler makes lazy with local_reparam(sites=[...]) (it selects: sites left out "
    "stay ordinary samples)"
)


def _fallback_or_raise(func, args, kwargs, lazies, reason):
    name = _op_name(func)
    pending = [lazy for lazy in lazies if lazy.auxiliary and not lazy.root._delivered]
    strict = [lazy for lazy in lazies if not lazy.fallback and not (lazy.auxiliary and not lazy.root._delivered)]
    if strict:
        lazy = strict[0]
        raise LazyWeightError(
            f"local_reparam: the weight of site {lazy.site!r} has no sampled value, and the operation {name!r} is "
            f"not supported on it ({reason}). Use the weight only in the supported linear ops, "
            f"{_SELECT}, or pass local_reparam(fallback=True) to draw one ordinary weight sample for such uses."
        )
    for lazy in lazies:
        root = lazy.root
        if root._tracking and root._ties and root._sample is None:
            raise _tied_error(lazy, name, "an ordinary weight sample cannot agree with the noise of the first use")
    for lazy in pending:
        lazy.root._guide_sampled = True
    # Explicit fallback (opt-in), or an autoguide's transform: use one ordinary weight sample per site.
    args = _replace(args)
    kwargs = {k: _replace(v) for k, v in kwargs.items()}
    return func(*args, **kwargs)


def _replace(a):
    if isinstance(a, LazyWeight):
        return a.materialize()
    if isinstance(a, (list, tuple)):
        return type(a)(_replace(x) for x in a)
    return a


# ----- view bookkeeping for the fallback -----


def _tied_error(lazy, op, reason, tie=None):
    first = (tie if tie is not None else lazy.root._ties[0])["op"]
    return LazyWeightError(
        f"local_reparam: the weight of site {lazy.site!r} is used twice in one model run, by {first!r} and then "
        f"{op!r}, and the second use cannot share the first use's noise ({reason}); independent noise per use "
        "would be a different model. Tied weights are supported in F.linear and matmul/@ (also transposed) with "
        "inputs of the same batch shape; views of disjoint parts of a weight (slices, chunk, split) are "
        f"independent and need no sharing. Otherwise give each use its own site, or {_SELECT}."
    )


def _region(w):
    """
    The root's element (flat index) at every element of the view ``w``, in ``w``'s layout; None for the root itself
    (all elements in the root's layout: no index tensor is built for the common case of a weight used whole).
    """
    root = w.root
    if w is root:
        return None
    if root._probe is None:
        root._probe = torch.arange(root.numel(), device=root.device).reshape(root.shape)
    return _replay_views(w, root._probe)


def _full_region(root, region):
    if region is not None:
        return region
    if root._probe is None:
        root._probe = torch.arange(root.numel(), device=root.device).reshape(root.shape)
    return root._probe


def _overlap(root, a, b):
    if a is None or b is None:  # the whole weight overlaps every part of it
        return True
    mask = torch.zeros(root.numel(), dtype=torch.bool, device=root.device)
    mask[a.reshape(-1)] = True
    return bool(mask[b.reshape(-1)].any())


def _find_use(w, op):
    """
    The earlier use, in this model run, of the elements of the view ``w``: ``(tie, transposed, region)``, where
    ``tie`` is None if none of ``w``'s elements was used yet (an independent part of the weight), and
    ``transposed`` says whether ``w`` is that use's view (False), its transpose (True), or neither (None: a
    reshape or a partial overlap, whose noise cannot be matched).
    """
    root = w.root
    region = _region(w)
    hits = [tie for tie in root._ties if _overlap(root, tie["region"], region)]
    if not hits:
        return None, False, region
    tie = hits[0]
    if len(hits) > 1:
        raise _tied_error(w, op, "it overlaps several earlier uses of parts of the weight", tie)
    if tie["region"] is None and region is None:
        return tie, False, region
    first, region_t = _full_region(root, tie["region"]), _full_region(root, region)
    if first.shape == region_t.shape and torch.equal(first, region_t):
        return tie, False, region
    if (
        first.dim() == 2
        and region_t.dim() == 2
        and first.shape == region_t.shape[::-1]
        and torch.equal(first.t(), region_t)
    ):
        return tie, True, region
    return tie, None, region


def _record_use(w, tie, region):
    tie["region"] = region
    w.root._ties.append(tie)
    return tie


def _record_untied_use(w, op, kind, reason):
    """Records a use whose noise is not shared (a convolution, a lookup); raises if its elements were used before."""
    tie, _, region = _find_use(w, op)
    if tie is not None:
        raise _tied_error(w, op, reason, tie)
    _record_use(w, {"op": op, "kind": kind}, region)


def _swap(t, transposed):
    return t.transpose(-1, -2) if transposed else t


def _replay_views(lazy, sample):
    ops = []
    while lazy._parent is not None:
        ops.append(lazy._view_fn)
        lazy = lazy._parent
    for fn in reversed(ops):
        sample = fn(sample)
    return sample


def _view(lazy, fn):
    return lazy._derive(fn)


# ----- transposes and reshapes -----


def _dispatch_transpose(func, self, *args, **kwargs):
    if not isinstance(self, LazyWeight):
        raise UnsupportedOperation("only the weight itself may be transposed")
    if func in (torch.Tensor.T.__get__, torch.Tensor.t, torch.t):
        if self.dim() > 2:
            raise UnsupportedOperation(".T / .t() of a weight with more than 2 dims")
        return _view(self, lambda t: t.t() if t.dim() == 2 else t)
    if func is torch.Tensor.mT.__get__:
        return _view(self, lambda t: t.mT)
    return _view(self, lambda t: t.transpose(*args, **kwargs))


def _dispatch_reshape(func, self, *args, **kwargs):
    if not isinstance(self, LazyWeight):
        raise UnsupportedOperation("only the weight itself may be reshaped")
    if self.is_correlated:
        raise UnsupportedOperation("reshaping a weight with correlated noise would break the noise sharing")
    if func is torch.Tensor.view:
        if len(args) == 1 and isinstance(args[0], torch.dtype):
            raise UnsupportedOperation("view as another dtype reinterprets the weight's bits")
        return _view(self, lambda t: t.reshape(*args, **kwargs))
    return _view(self, lambda t: t.reshape(*args, **kwargs))


# ----- linear maps -----


def _check_weight(w, ndim, op):
    if w.dim() != ndim:
        raise UnsupportedOperation(f"{op} needs a weight with {ndim} dims, got shape {tuple(w.shape)}")


def _sample_like(lazy, shape, op="add"):
    """A sample of a (small, bias-like) lazy tensor, independent for every index of ``shape``."""
    root = lazy.root
    if root._sample is not None:
        return lazy.materialize()
    if root._tracking:
        tie, transposed, region = _find_use(lazy, op)
        if tie is None:
            sample = _draw_like(lazy, shape)
            _record_use(lazy, {"op": op, "kind": "bias", "shape": tuple(shape), "sample": sample}, region)
            return sample
        if tie["kind"] == "bias" and transposed is False and tie["shape"] == tuple(shape):
            return tie["sample"]
        raise _tied_error(lazy, op, "a bias is shared only when added twice to outputs of the same shape", tie)
    return _draw_like(lazy, shape)


def _draw_like(lazy, shape):
    loc = lazy.loc
    if lazy.is_correlated:
        lead = tuple(shape[: len(shape) - loc.dim()])
        noise = torch.randn(lead + tuple(lazy.noise_scale.shape), dtype=loc.dtype, device=loc.device)
        return loc * _noise(lazy.noise_scale, noise, lazy.noise_fn)
    return loc + lazy.scale * torch.randn(shape, dtype=loc.dtype, device=loc.device)


def _add_bias(out, bias, channel_dim, op="bias"):
    if bias is None:
        return out
    if isinstance(bias, LazyWeight):
        # one bias sample per example (cheap: examples x units); shared across spatial positions
        lead = out.shape[: channel_dim + 1] if channel_dim >= 0 else out.shape
        b = _sample_like(bias, lead, op)
        return out + b.reshape(b.shape + (1,) * (out.dim() - b.dim()))
    if channel_dim >= 0 and out.dim() > channel_dim + 1:
        bias = bias.reshape(bias.shape + (1,) * (out.dim() - channel_dim - 1))
    return out + bias


def lazy_linear(x, w, bias=None, *, op="linear"):
    r"""
    A sample of ``F.linear(x, W, bias)`` for a lazy weight ``W`` of shape ``(out, in)``, independent
    for every leading index of ``x`` (and, after :meth:`LazyWeight.start_run`, the same weight per
    example as the weight's earlier uses in the run).

    :param torch.Tensor x: Inputs of shape ``(..., in)``.
    :param LazyWeight w: The lazy weight.
    :param bias: ``None``, a tensor, or a lazy bias of shape ``(out,)``.
    :param str op: The operation's name, for error messages.
    :rtype: torch.Tensor
    """
    _check_weight(w, 2, "linear")
    if isinstance(x, LazyWeight):
        raise UnsupportedOperation("both operands are lazy")
    if w.root._sample is not None:  # an ordinary sample was drawn (fallback=True): every use sees it
        return F.linear(x, w.materialize(), bias)
    if w.root._tracking and (w.is_correlated or w.estimator != MEAN):
        plain_bias, bias = (bias, None) if torch.is_tensor(bias) and not isinstance(bias, LazyWeight) else (None, bias)
        return _add_bias(_tracked_linear(x, w, plain_bias, op), bias, -1)
    if w.is_correlated:
        return _add_bias(linear_correlated(x, w.loc, w.noise_scale, noise_fn=w.noise_fn), bias, -1)
    # a plain bias is fused into the mean's matmul (addmm)
    plain_bias, bias = (bias, None) if torch.is_tensor(bias) and not isinstance(bias, LazyWeight) else (None, bias)
    if w.estimator == PER_EXAMPLE:
        out = linear_per_example(x, w.loc, w.scale, plain_bias)
    elif w.estimator == MEAN:
        out = linear_mean(x, w.loc, plain_bias)
    elif w.estimator == LRT:
        out = linear_lrt(x, w.loc, w.variance, plain_bias)
    else:
        out = linear_flipout(x, w.loc, w.scale, plain_bias)
    return _add_bias(out, bias, -1)


def _tracked_linear(x, w, bias, op):
    """``F.linear(x, w, bias)`` for a weight whose uses in a model run share one weight per example."""
    lead = x.shape[:-1]
    tie, transposed, region = _find_use(w, op)
    if tie is None:
        # the first use of these elements; its orientation is the reference for later uses
        return _first_linear(x, w, bias, op, lead, region)
    if tie["kind"] not in ("lrt", "flipout", "per-example", "correlated"):
        raise _tied_error(w, op, f"the first use was not a linear op ({tie['kind']})", tie)
    if transposed is None:
        raise _tied_error(w, op, "a reshaped or partly overlapping view's noise cannot be matched across uses", tie)
    if tie["lead"] != lead:
        raise _tied_error(
            w,
            op,
            f"the inputs' batch shapes differ: {tuple(tie['lead'])} and {tuple(lead)}, so uses cannot be "
            "matched example by example",
            tie,
        )
    if tie["kind"] == "flipout":
        r, s = tie["sign_out"], tie["sign_in"]  # in the site's orientation
        sign_in, sign_out = (r, s) if transposed else (s, r)
        perturbation = _swap(tie["perturbation"], transposed)
        return linear_flipout(x, w.loc, None, bias, perturbation=perturbation, sign_in=sign_in, sign_out=sign_out)
    if tie["kind"] == "correlated":
        return _add_plain(linear_correlated(x, w.loc, w.noise_scale, _swap(tie["noise"], transposed), w.noise_fn), bias)
    if "weights" not in tie:  # LRT: per-example weights that agree with the first use's output
        first = tie["view"]
        ws = linear_lrt_weights(tie["x"], first.loc, first.scale, first.variance, tie["noise"])
        tie["weights"] = _swap(ws, tie["transposed"])
    return linear_given_weights(x, _swap(tie["weights"], transposed), bias)


def _add_plain(out, bias):
    return out if bias is None else out + bias


def _first_linear(x, w, bias, op, lead, region):
    """
    The first use of (a part of) a weight in a model run: draws its noise explicitly and records it on the site's
    root, in this use's orientation (the reference for later uses).
    """
    loc, transposed = w.loc, False
    tie = {"op": op, "lead": lead, "transposed": transposed}
    if w.is_correlated:
        noise = torch.randn(lead + w.noise_scale.shape, dtype=x.dtype, device=x.device)
        out = _add_plain(linear_correlated(x, loc, w.noise_scale, noise, w.noise_fn), bias)
        tie.update(kind="correlated", noise=_swap(noise, transposed))
    elif w.estimator == LRT:
        noise = torch.randn(lead + loc.shape[:1], dtype=x.dtype, device=x.device)
        out = linear_lrt(x, loc, w.variance, bias, noise)
        tie.update(kind="lrt", view=w, x=x, noise=noise)
    elif w.estimator == PER_EXAMPLE:
        ws = loc + w.scale * torch.randn(lead + loc.shape, dtype=loc.dtype, device=loc.device)
        out = linear_given_weights(x, ws, bias)
        tie.update(kind="per-example", weights=_swap(ws, transposed))
    else:
        perturbation = w.scale * torch.randn_like(loc)
        sign_in = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(0.5).mul_(2).sub_(1)
        sign_out = torch.empty(lead + loc.shape[:1], dtype=x.dtype, device=x.device).bernoulli_(0.5).mul_(2).sub_(1)
        out = linear_flipout(x, loc, None, bias, perturbation=perturbation, sign_in=sign_in, sign_out=sign_out)
        # kept in the site's orientation: sign_out multiplies the site's rows, sign_in its columns
        if transposed:
            sign_in, sign_out = sign_out, sign_in
        tie.update(kind="flipout", perturbation=_swap(perturbation, transposed), sign_in=sign_in, sign_out=sign_out)
    _record_use(w, tie, region)
    return out


def _dispatch_linear(input, weight, bias=None):
    if not isinstance(weight, LazyWeight):
        if isinstance(bias, LazyWeight):
            return _add_bias(F.linear(input, weight), bias, -1)
        raise UnsupportedOperation("the input of F.linear cannot be lazy")
    return lazy_linear(input, weight, bias)


def _dispatch_matmul(func, a, b, **kwargs):
    if kwargs:
        raise UnsupportedOperation(f"keyword arguments {sorted(kwargs)}")
    op = _op_name(func)
    if func is torch.Tensor.__rmatmul__:
        a, b = b, a
    if isinstance(a, LazyWeight) and isinstance(b, LazyWeight):
        raise UnsupportedOperation("both operands are lazy")
    if isinstance(b, LazyWeight):
        if b.dim() == 1:  # x @ w with w of shape (in,)
            return lazy_linear(a, _view(b, lambda t: t.unsqueeze(0)), op=op).squeeze(-1)
        _check_weight(b, 2, "matmul")
        return lazy_linear(a, _view(b, lambda t: t.t()), op=op)
    # W @ x: examples are the columns of x
    if a.dim() == 1:
        raise UnsupportedOperation("a 1-dim lazy vector on the left of matmul")
    _check_weight(a, 2, "matmul")
    if b.dim() == 1:
        return lazy_linear(b, a, op=op)
    return lazy_linear(b.transpose(-1, -2), a, op=op).transpose(-1, -2)


def _dispatch_add(func, a, b, **kwargs):
    if kwargs:
        raise UnsupportedOperation(f"keyword arguments {sorted(kwargs)}")
    if isinstance(a, LazyWeight) == isinstance(b, LazyWeight):
        raise UnsupportedOperation("exactly one operand of the addition may be lazy")
    lazy, other = (a, b) if isinstance(a, LazyWeight) else (b, a)
    if not torch.is_tensor(other):
        raise UnsupportedOperation("a lazy bias can only be added to a tensor of pre-activations")
    shape = torch.broadcast_shapes(lazy.shape, other.shape)
    if shape == lazy.shape or sum(s > 1 for s in lazy.shape) > 1:
        raise UnsupportedOperation(
            "only a bias-like lazy tensor (one non-singleton dim) can be added to a batch of pre-activations"
        )
    return other + _sample_like(lazy, shape, _op_name(func))


def _expand_param(x, n):
    if isinstance(x, int):
        return (x,) * n
    return tuple(x)


def lazy_conv(nd, x, w, bias=None, stride=1, padding=0, dilation=1, groups=1):
    r"""
    A sample of ``F.conv{nd}d(x, W, bias, stride, padding, dilation, groups)`` for a lazy weight ``W``
    of shape ``(out, in/groups, *kernel)``: :math:`\gamma = \mathrm{conv}(x, \mu)`,
    :math:`\delta = \mathrm{conv}(x^2, \sigma^2)` (LRT), Flipout with signs per example and channel,
    or correlated noise per example and input (output) channel.

    :rtype: torch.Tensor
    """
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return _lazy_conv_any(conv, conv_correlated, f"conv{nd}d", nd, x, w, bias, kw)


def _lazy_conv_any(conv, correlated, op, nd, x, w, bias, kw):
    """A sample of ``conv(x, W, bias, **kw)`` for a convolution or a transposed convolution (``conv``)."""
    _check_weight(w, nd + 2, op)
    if isinstance(x, LazyWeight):
        raise UnsupportedOperation("both operands are lazy")
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    root = w.root
    if root._tracking and (w.is_correlated or w.estimator != MEAN) and root._sample is None:
        _record_untied_use(w, op, "conv", "a convolution's noise is not shared with other uses")
    if root._sample is not None:  # an ordinary sample was drawn (fallback=True): every use sees it
        out = conv(x, w.materialize(), None, **kw)
    elif w.is_correlated:
        out = correlated(conv, x, w.loc, w.noise_scale, noise_fn=w.noise_fn, **kw)
    elif w.estimator == MEAN:
        out = conv_mean(conv, x, w.loc, **kw)
    elif w.estimator == PER_EXAMPLE:
        out = conv_per_example(conv, x, w.loc, w.scale, **kw)
    elif w.estimator == LRT:
        out = conv_lrt(conv, x, w.loc, w.variance, **kw)
    else:
        out = conv_flipout(conv, x, w.loc, w.scale, **kw)
    out = _add_bias(out, bias, 1)
    return out.squeeze(0) if unbatched else out


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _dispatch_conv(nd, *args, **kwargs):
    return _dispatch_any_conv(
        _CONV_ARGS, (F.conv1d, F.conv2d, F.conv3d)[nd - 1], lazy_conv, f"conv{nd}d", "a convolution", nd, args, kwargs
    )


def _dispatch_any_conv(names, conv, lazy_fn, op, what, nd, args, kwargs):
    """A convolution or transposed convolution (``conv``) with a lazy weight (``lazy_fn``) or a lazy bias only."""
    bound = _bind(names, op, args, kwargs)
    x, w = bound.pop("input"), bound.pop("weight")
    if not isinstance(w, LazyWeight):
        b = bound.pop("bias", None)
        if isinstance(b, LazyWeight) and not isinstance(x, LazyWeight):
            out = conv(x if x.dim() == nd + 2 else x.unsqueeze(0), w, None, **bound)
            out = _add_bias(out, b, 1)
            return out if x.dim() == nd + 2 else out.squeeze(0)
        raise UnsupportedOperation(f"the input of {what} cannot be lazy")
    return lazy_fn(nd, x, w, **bound)


# ----- views: slices of a weight -----


def _basic_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice)) for p in parts)


def _dispatch_view(func, self, *args, **kwargs):
    if not isinstance(self, LazyWeight) or any(isinstance(a, LazyWeight) for a in _flat(args, kwargs)):
        raise UnsupportedOperation("only the weight itself may be sliced, by indices that are not lazy")
    if self.is_correlated:
        raise UnsupportedOperation(
            "a slice of a weight with correlated noise would share noise variables with the other slices"
        )
    if func is torch.Tensor.__getitem__ and not _basic_index(args[0]):
        # advanced indexing: a view is a Gaussian with independent elements only if no element is picked twice
        picked = torch.arange(self.numel(), device=self.device).reshape(self.shape)[args[0]]
        if picked.unique().numel() != picked.numel():
            raise UnsupportedOperation("an index that picks an element twice makes a view with dependent elements")
    if func in (torch.Tensor.index_select, torch.index_select):
        index = kwargs["index"] if "index" in kwargs else args[1]
        if index.unique().numel() != index.numel():
            raise UnsupportedOperation("an index that picks a slice twice makes a view with dependent elements")
    if func in _SPLIT:
        with torch._C.DisableTorchFunctionSubclass():
            count = len(func(self, *args, **kwargs))
        return tuple(_view(self, lambda t, i=i: func(t, *args, **kwargs)[i]) for i in range(count))
    return _view(self, lambda t: func(t, *args, **kwargs))


# ----- F.embedding -----


def lazy_embedding(indices, w, padding_idx=None, *, op="embedding"):
    r"""
    A sample of ``F.embedding(indices, W)`` for a lazy weight ``W`` of shape ``(rows, dim)``: one weight per
    example, where the examples are dim 0 of ``indices`` (``(batch, length)`` token ids: a sequence is an
    example; every index of a 1-dim ``indices`` is an example), sampled only at the rows the example looks up.
    A row that an example looks up twice is one draw, so the result is exactly that of
    ``F.embedding(indices[n], W_n)`` with :math:`W_n \sim q` for every example :math:`n`:

    - ``"lrt"`` and ``"per-example"``: :math:`\mu_r + \sigma_r \odot \epsilon_{n,r}` for the looked-up rows
      :math:`r` (the looked-up rows are the pre-activations, so the LRT and a weight per example coincide);
    - ``"flipout"``: :math:`\mu_r + \Delta W_r \odot r_{n,r} s_n` with one perturbation per call and random
      signs per example and row (:math:`r`) and per example and column (:math:`s`);
    - correlated noise: :math:`\mu_r \odot \xi` with :math:`\xi \sim \mathcal{N}(1, \alpha)` per example and
      row (column, layer);
    - ``"mean"``: :math:`\mu_r`.

    For sequence-first indices ``(length, batch)``, transpose them first (``embedding(tokens.t())``): dim 0 is
    the example. ``padding_idx`` stops the gradient of the padding row's lookups, as in torch.

    :param torch.Tensor indices: Integer indices of any shape.
    :param LazyWeight w: The lazy weight.
    :param int padding_idx: The padding row, or None.
    :rtype: torch.Tensor
    """
    _check_weight(w, 2, op)
    if isinstance(indices, LazyWeight):
        raise UnsupportedOperation("the indices cannot be lazy")
    if indices.dtype not in (torch.int32, torch.int64):
        raise UnsupportedOperation(f"indices must be int64 or int32, got {indices.dtype}")
    root = w.root
    if root._sample is not None:  # an ordinary sample was drawn (fallback=True): every use sees it
        return F.embedding(indices, w.materialize(), padding_idx)
    if root._tracking and (w.is_correlated or w.estimator != MEAN):
        _record_untied_use(w, op, "embedding", "an embedding lookup's noise is not shared with other uses")
    indices = indices.long()
    if w.is_correlated:
        out = embedding_correlated(indices, w.loc, w.noise_scale, noise_fn=w.noise_fn)
    elif w.estimator == MEAN:
        out = embedding_mean(indices, w.loc)
    elif w.estimator == FLIPOUT:
        out = embedding_flipout(indices, w.loc, w.scale)
    else:
        out = embedding_per_example(indices, w.loc, w.scale)
    if padding_idx is not None:
        pad = padding_idx if padding_idx >= 0 else w.shape[0] + padding_idx
        out = torch.where((indices == pad).unsqueeze(-1), out.detach(), out)
    return out


_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def _bind(names, op, args, kwargs):
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names or k in bound:
            raise UnsupportedOperation(f"unexpected keyword argument {k!r} of {op}")
        bound[k] = v
    return bound


def _dispatch_embedding(*args, **kwargs):
    bound = _bind(_EMBEDDING_ARGS, "F.embedding", args, kwargs)
    x, w = bound["input"], bound["weight"]
    if not isinstance(w, LazyWeight):
        raise UnsupportedOperation("the indices of F.embedding cannot be lazy")
    if bound.get("max_norm") is not None:
        raise UnsupportedOperation(
            "max_norm renormalizes the weight's rows in place; a weight that is never sampled has none"
        )
    if bound.get("scale_grad_by_freq"):
        raise UnsupportedOperation("scale_grad_by_freq is not supported")
    if bound.get("sparse"):
        raise UnsupportedOperation("sparse gradients are not supported (the gradients reach the guide's parameters)")
    return lazy_embedding(x, w, bound.get("padding_idx"))


# ----- F.conv_transpose1d/2d/3d -----


def lazy_conv_transpose(nd, x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    r"""
    A sample of ``F.conv_transpose{nd}d(x, W, bias, stride, padding, output_padding, groups, dilation)`` for a
    lazy weight ``W`` of shape ``(in, out/groups, *kernel)``: :math:`\gamma = \mathrm{conv^T}(x, \mu)`,
    :math:`\delta = \mathrm{conv^T}(x^2, \sigma^2)` (LRT: independent noise per output element, every output's
    marginal exact), Flipout with signs per example and channel, an explicit weight per example, or correlated
    noise per example and input (output) channel.

    :rtype: torch.Tensor
    """
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    kw = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups)
    return _lazy_conv_any(conv, conv_transpose_correlated, f"conv_transpose{nd}d", nd, x, w, bias, kw)


_CONV_TRANSPOSE_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _dispatch_conv_transpose(nd, *args, **kwargs):
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    op = f"conv_transpose{nd}d"
    return _dispatch_any_conv(
        _CONV_TRANSPOSE_ARGS, conv, lazy_conv_transpose, op, "a transposed convolution", nd, args, kwargs
    )


# ----- F.multi_head_attention_forward -----

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MHA_PLAIN = ("query", "key", "value", "bias_k", "bias_v", "attn_mask", "key_padding_mask", "static_k", "static_v")


def lazy_multi_head_attention_forward(*args, **kwargs):
    r"""
    ``F.multi_head_attention_forward`` (what :class:`~torch.nn.MultiheadAttention` calls) with lazy projection
    weights or biases: the input projections are computed as torch computes them (self-attention: one
    ``F.linear`` of the packed ``in_proj_weight``; otherwise its ``split``/``chunk`` slices, or the separate
    ``q/k/v_proj_weight``), each a sample from the lazy weight's estimator with independent noise per token
    (every leading index of a linear op's input is an example); the attention itself is torch's own code, called
    with the projected values and identity projections (exact: three extra :math:`E \times E` matmuls); the
    output projection is a lazy ``F.linear`` again. Lazy queries, keys, values, masks, ``bias_k``/``bias_v`` or
    static keys raise.

    :returns: ``(attn_output, attn_output_weights)``, as torch.
    """
    try:
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    except TypeError as e:
        raise UnsupportedOperation(f"F.multi_head_attention_forward: {e}") from e
    bound.apply_defaults()
    p = bound.arguments
    for name in _MHA_PLAIN:
        if isinstance(p[name], LazyWeight):
            raise UnsupportedOperation(f"a lazy {name}")
    query, key, value, embed_dim = p["query"], p["key"], p["value"], p["embed_dim_to_check"]
    b = p["in_proj_bias"]
    if not p["use_separate_proj_weight"]:
        w = p["in_proj_weight"]
        if w is None:
            raise UnsupportedOperation("use_separate_proj_weight is False but in_proj_weight is None")
        if key is value and query is key:  # self-attention: one projection of the packed weight
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        elif key is value:
            w_q, w_kv = w.split([embed_dim, 2 * embed_dim])
            b_q, b_kv = (None, None) if b is None else b.split([embed_dim, 2 * embed_dim])
            q = F.linear(query, w_q, b_q)
            k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
        else:
            w_q, w_k, w_v = w.chunk(3)
            b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    else:
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        q = F.linear(query, p["q_proj_weight"], b_q)
        k = F.linear(key, p["k_proj_weight"], b_k)
        v = F.linear(value, p["v_proj_weight"], b_v)
    eye = torch.eye(embed_dim, dtype=q.dtype, device=q.device)
    out, weights = F.multi_head_attention_forward(
        q,
        k,
        v,
        embed_dim,
        p["num_heads"],
        None,
        None,
        p["bias_k"],
        p["bias_v"],
        p["add_zero_attn"],
        p["dropout_p"],
        eye,
        None,
        training=p["training"],
        key_padding_mask=p["key_padding_mask"],
        need_weights=p["need_weights"],
        attn_mask=p["attn_mask"],
        is_causal=p["is_causal"],
        use_separate_proj_weight=True,
        q_proj_weight=eye,
        k_proj_weight=eye,
        v_proj_weight=eye,
        static_k=p["static_k"],
        static_v=p["static_v"],
        average_attn_weights=p["average_attn_weights"],
    )
    return F.linear(out, p["out_proj_weight"], p["out_proj_bias"]), weights


__all__ = [
    "ESTIMATORS",
    "LazyWeight",
    "LazyWeightError",
    "UnsupportedOperation",
    "lazy_conv",
    "lazy_conv_transpose",
    "lazy_embedding",
    "lazy_linear",
    "lazy_multi_head_attention_forward",
]
