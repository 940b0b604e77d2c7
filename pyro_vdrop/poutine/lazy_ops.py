# SPDX-License-Identifier: Apache-2.0
r"""
The kernels behind :class:`~pyro_vdrop.poutine.LazyWeight`: one function per estimator and linear op, each a
sample of the op's output for a Gaussian weight, on plain tensors (the weight's mean and the moment that the
estimator needs) so that new ops and layers can reuse them.

For a linear op :math:`\mathrm{op}(x, W)` and :math:`W \sim \mathcal{N}(\mu, \sigma^2)` elementwise:

- ``*_lrt``: the local reparameterization trick [1, §2.3],
  :math:`\mathrm{op}(x, \mu) + \sqrt{\mathrm{op}(x^2, \sigma^2)} \odot \zeta`;
- ``*_flipout``: Flipout [2], :math:`\mathrm{op}(x, \mu) + \mathrm{op}(x \odot s, \sigma \odot \epsilon) \odot r`
  with random signs :math:`r, s` per example;
- ``*_per_example``: an explicit weight sample per example;
- ``*_mean``: the posterior mean, no noise;
- ``*_correlated``: noise shared by a weight's input (output) units, drawn as Gaussian noise
  :math:`\xi \sim \mathcal{N}(1, \alpha)` on the op's input (output), once per example [1, §3.3].

The convolution kernels take the convolution function (``F.conv1d/2d/3d``, or ``F.conv_transpose1d/2d/3d``,
whose weight is ``(in, out/groups, *kernel)``) and a batched input ``(N, C, ...)``. The embedding kernels take
the indices and sample the looked-up rows, one weight per example (dim 0 of the indices).
An unsupported layout raises :class:`UnsupportedOperation`.

**References**

[1] Kingma, Salimans, Welling. "Variational Dropout and the Local Reparameterization Trick." NeurIPS 2015.
[2] Wen, Vicol, Ba, Tran, Grosse. "Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches."
    ICLR 2018.
"""

import torch
import torch.nn.functional as F


class UnsupportedOperation(Exception):
    """A lazy weight is used in a way that the kernels cannot sample exactly; the message says why."""


def _rademacher(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(0.5).mul_(2).sub_(1)


def _sqrt(delta):
    # tiny keeps the gradient of sqrt finite where an example's inputs are all zero; in place: ``delta`` is
    # the fresh output of a linear op, whose backward does not need it
    return delta.add_(torch.finfo(delta.dtype).tiny).sqrt_()


# ----- F.linear: x of shape (..., in), weight of shape (out, in) -----


def linear_mean(x, loc, bias=None):
    """``F.linear(x, loc, bias)``: the posterior mean, no noise."""
    return F.linear(x, loc, bias)


class _LinearLRT(torch.autograd.Function):
    r"""
    An LRT sample of ``F.linear`` as one autograd node:

    .. math::

        b = x\mu^\top + \beta + \sqrt{x^2 (\sigma^2)^\top + \text{tiny}} \odot \zeta ,

    with a backward pass that reuses what the forward pass computed: for an output gradient :math:`g`,
    :math:`h = g \odot \zeta / (2\sqrt\delta)` is the gradient of :math:`\delta`, and

    .. math::

        \partial_x = g\mu + 2x \odot (h\sigma^2), \quad \partial_\mu = g^\top x, \quad
        \partial_{\sigma^2} = h^\top x^2, \quad \partial_\beta = \textstyle\sum g ,

    where autograd of the formula records six nodes (two linears, the square, the square root and the noise).
    Gradients that no input needs are not computed. The backward pass is itself differentiable (it recomputes
    from the inputs when a graph is being built).
    """

    @staticmethod
    def forward(ctx, x, loc, variance, bias, noise):
        gamma = F.linear(x, loc, bias)
        std = _sqrt(F.linear(x * x, variance))
        # x² is not kept (autograd of the formula keeps it for the matmul's backward): recomputed in the backward
        # pass, one elementwise pass over the input, bitwise the same values
        ctx.save_for_backward(x, loc, variance, std, noise)
        ctx.has_bias = bias is not None
        return torch.addcmul(gamma, std, noise)

    @staticmethod
    def backward(ctx, grad):
        x, loc, variance, std, noise = ctx.saved_tensors
        needs_x, needs_loc, needs_var, needs_bias, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # double backward: differentiable ops on the inputs
            std = F.linear(x * x, variance).add(torch.finfo(x.dtype).tiny).sqrt()
            h = grad * noise / (2 * std)
        else:
            h = (grad * noise).div_(std).mul_(0.5)  # the gradient of delta, as autograd of sqrt gives it
        grad_x = grad_loc = grad_var = grad_bias = None
        if needs_x:
            grad_x = torch.addcmul(grad @ loc, x, h @ variance, value=2.0)
        if needs_loc or needs_var:
            g2 = grad.reshape(-1, grad.shape[-1])
            h2 = h.reshape(-1, h.shape[-1])
            if needs_loc:
                grad_loc = g2.t() @ x.reshape(-1, x.shape[-1])
            if needs_var:
                xx = x * x
                grad_var = h2.t() @ xx.reshape(-1, xx.shape[-1])
        if needs_bias and ctx.has_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_loc, grad_var, grad_bias, None


def linear_lrt(x, loc, variance, bias=None, noise=None, *, fused=False):
    r"""
    An LRT sample of ``F.linear(x, W, bias)``, independent for every leading index of ``x``.

    :param noise: The standard normal :math:`\zeta`, of the output's shape (drawn if ``None``).
    :param bool fused: One autograd node with a hand-written backward (:class:`_LinearLRT`: the same values and
        noise, gradients equal to float rounding) instead of autograd of the formula (default). It keeps less for
        the backward pass (:math:`x`, the standard deviation and the noise, not also :math:`x^2`), but is not the
        default: its gradients are not bitwise those of the formula, so a run resumed from a checkpoint of an
        earlier version would not continue bitwise (``tests/train/test_format1.py``), and its step time measured
        1.006–1.017× the unfused step of an MLP 784-300-100-10 on CPU (``python benchmarks/step_ab.py --what
        fused-lrt``). A noise that requires a gradient takes the unfused path (the fused node gives none for it).
    """
    if not fused or (noise is not None and noise.requires_grad):  # the fused node gives no gradient for the noise
        gamma = F.linear(x, loc, bias)
        noise = torch.randn_like(gamma) if noise is None else noise
        return torch.addcmul(gamma, _sqrt(F.linear(x * x, variance)), noise)
    if noise is None:
        noise = torch.randn(x.shape[:-1] + loc.shape[:1], dtype=x.dtype, device=x.device)
    return _LinearLRT.apply(x, loc, variance, bias, noise)


def linear_lrt_weights(x, loc, scale, variance, noise):
    r"""
    Per-example weight samples that agree with an LRT sample drawn before: :math:`W_n \sim q(W \mid
    \mathrm{linear}(x_n, W) = b_n)`, where :math:`b = \gamma + \sqrt\delta \odot \zeta` was the output of
    :func:`linear_lrt` with standard normal ``noise`` :math:`\zeta`. Every row of :math:`W` is conditioned on
    its one output by Matheron's rule: with :math:`W'_n = \mu + \sigma \odot \epsilon_n` a fresh sample,

    .. math::

        W_n = W'_n + \frac{\sigma^2 \odot x_n}{\delta_n} \bigl(\sqrt{\delta_n} \odot \zeta_n
            - \mathrm{linear}(x_n, W'_n - \mu)\bigr),

    so that :math:`(b_n, W_n)` has exactly the joint law of :math:`(\mathrm{linear}(x_n, W), W)` and a later
    use of the same weight by example :math:`n` (weight tying) sees the weight that produced :math:`b_n`.

    :returns: weights of shape ``x.shape[:-1] + loc.shape``.
    """
    delta = F.linear(x * x, variance).add_(torch.finfo(x.dtype).tiny)
    dw = scale * torch.randn(x.shape[:-1] + loc.shape, dtype=loc.dtype, device=loc.device)
    residual = delta.sqrt() * noise - torch.einsum("...i,...oi->...o", x, dw)
    gain = variance * x.unsqueeze(-2) / delta.unsqueeze(-1)
    return loc + dw + gain * residual.unsqueeze(-1)


def linear_flipout(x, loc, scale, bias=None, *, perturbation=None, sign_in=None, sign_out=None):
    r"""
    A Flipout sample of ``F.linear(x, W, bias)``, with random signs per example.

    :param perturbation: :math:`\Delta W = \sigma \odot \epsilon`, shared by the examples (drawn if ``None``).
    :param sign_in: Random signs of ``x``'s shape (drawn if ``None``).
    :param sign_out: Random signs of the output's shape (drawn if ``None``).
    """
    gamma = F.linear(x, loc, bias)
    delta_w = scale * torch.randn_like(loc) if perturbation is None else perturbation
    sign_in = _rademacher(x.shape, x) if sign_in is None else sign_in
    sign_out = _rademacher(gamma.shape, gamma) if sign_out is None else sign_out
    return gamma + F.linear(x * sign_in, delta_w) * sign_out


def linear_per_example(x, loc, scale, bias=None):
    """``F.linear`` with an explicit weight sample for every leading index of ``x``."""
    ws = loc + scale * torch.randn(x.shape[:-1] + loc.shape, dtype=loc.dtype, device=loc.device)
    return linear_given_weights(x, ws, bias)


def linear_given_weights(x, weights, bias=None):
    """``F.linear`` with the weight ``weights[n]`` (of shape ``x.shape[:-1] + (out, in)``) for example ``n``."""
    out = torch.einsum("...i,...oi->...o", x, weights)
    return out if bias is None else out + bias


def _noise(noise_scale, eps, noise_fn):
    r"""The multiplicative noise :math:`\xi` from standard normals ``eps``: ``1 + noise_scale * eps`` (Gaussian
    dropout), or ``noise_fn(eps)`` (e.g. the log-normal noise of structured Bayesian pruning)."""
    return 1 + noise_scale * eps if noise_fn is None else noise_fn(eps)


def linear_correlated(x, loc, noise_scale, noise=None, noise_fn=None):
    r"""
    ``F.linear(x, W)`` for :math:`W = \xi \odot \mu` with :math:`\xi \sim \mathcal{N}(1, \alpha)` shared along
    the input units, the output units or the whole layer, as ``noise_scale`` (:math:`\sqrt\alpha`, of shape
    ``(1 or out, 1 or in)``) says; drawn once per example.

    :param noise: The standard normal :math:`\epsilon = (\xi - 1) / \sqrt\alpha`, of shape
        ``x.shape[:-1] + noise_scale.shape`` (drawn if ``None``).
    :param noise_fn: For non-Gaussian noise: the map from :math:`\epsilon` to :math:`\xi` (elementwise, with
        parameters of the shape of ``noise_scale``); ``noise_scale`` then gives only the noise's shape.
    """
    n_out, n_in = noise_scale.shape
    if noise is None:
        noise = torch.randn(x.shape[:-1] + (n_out, n_in), dtype=x.dtype, device=x.device)
    xi = _noise(noise_scale, noise, noise_fn)
    if n_out == 1 and n_in == 1:
        return F.linear(x, loc) * xi[..., 0]
    if n_out == 1:  # noise per input unit: Gaussian dropout on the inputs
        return F.linear(x * xi[..., 0, :], loc)
    return F.linear(x, loc) * xi[..., :, 0]  # noise per output unit


# ----- F.conv1d/2d/3d: x of shape (N, in, *spatial), weight of shape (out, in/groups, *kernel) -----


def conv_mean(conv, x, loc, **kwargs):
    """``conv(x, loc, **kwargs)``: the posterior mean, no noise."""
    return conv(x, loc, None, **kwargs)


def conv_lrt(conv, x, loc, variance, **kwargs):
    """An LRT sample of ``conv(x, W)``, independent for every output element."""
    gamma = conv(x, loc, None, **kwargs)
    return torch.addcmul(gamma, _sqrt(conv(x * x, variance, None, **kwargs)), torch.randn_like(gamma))


def conv_flipout(conv, x, loc, scale, **kwargs):
    """A Flipout sample of ``conv(x, W)``, with random signs per example and channel."""
    spatial = (1,) * (x.dim() - 2)
    delta_w = scale * torch.randn_like(loc)
    gamma = conv(x, loc, None, **kwargs)
    sign_in = _rademacher(x.shape[:2] + spatial, x)
    sign_out = _rademacher(gamma.shape[:2] + spatial, gamma)
    return gamma + conv(x * sign_in, delta_w, None, **kwargs) * sign_out


def conv_per_example(conv, x, loc, scale, *, groups=1, **kwargs):
    """
    ``conv`` with an explicit weight sample for every example (one grouped convolution); also for the transposed
    convolutions ``F.conv_transpose1d/2d/3d``, whose weight ``(in, out/groups, *kernel)`` stacks the same way.
    """
    n = x.shape[0]
    ws = loc + scale * torch.randn((n,) + loc.shape, dtype=loc.dtype, device=loc.device)
    out = conv(x.reshape(1, -1, *x.shape[2:]), ws.reshape(-1, *loc.shape[1:]), None, groups=n * groups, **kwargs)
    return out.reshape(n, -1, *out.shape[2:])


def conv_correlated(conv, x, loc, noise_scale, *, groups=1, noise_fn=None, **kwargs):
    r"""
    ``conv(x, W)`` for :math:`W = \xi \odot \mu` with :math:`\xi \sim \mathcal{N}(1, \alpha)` per input channel
    (within a group; all groups share the noise variables), per output channel, or one for the layer, as
    ``noise_scale`` (:math:`\sqrt\alpha`, of shape ``(1 or out, 1 or in/groups, 1, ...)``) says; drawn once per
    example. ``noise_fn`` as for :func:`linear_correlated`.
    """
    spatial = (1,) * (x.dim() - 2)
    if any(k != 1 for k in noise_scale.shape[2:]):
        raise UnsupportedOperation(f"correlated noise along kernel positions (noise shape {tuple(noise_scale.shape)})")
    n_out, n_in = noise_scale.shape[:2]
    if n_in == 1:  # per output channel, or one noise for the whole layer
        out = conv(x, loc, None, groups=groups, **kwargs)
        eps = torch.randn(out.shape[:1] + noise_scale.shape, dtype=out.dtype, device=out.device)
        return out * _noise(noise_scale, eps, noise_fn).reshape(out.shape[:1] + (n_out,) + spatial)
    if n_out == 1:
        eps = torch.randn(x.shape[:1] + noise_scale.shape, dtype=x.dtype, device=x.device)
        xi = _noise(noise_scale, eps, noise_fn).reshape(x.shape[0], n_in).repeat(1, groups)
        return conv(x * xi.reshape(xi.shape + spatial), loc, None, groups=groups, **kwargs)
    raise UnsupportedOperation(f"correlated noise of shape {tuple(noise_scale.shape)}")


def conv_transpose_correlated(conv_transpose, x, loc, noise_scale, *, groups=1, noise_fn=None, **kwargs):
    r"""
    ``conv_transpose(x, W)`` for :math:`W = \xi \odot \mu` with :math:`\xi \sim \mathcal{N}(1, \alpha)` shared
    along the weight's dims that ``noise_scale`` (:math:`\sqrt\alpha`, of shape ``(1 or in, 1 or out/groups, 1,
    ...)``; the weight of a transposed convolution is ``(in, out/groups, *kernel)``) does not index: per input
    channel (noise on the input), per output channel within a group (all groups share the noise variables, as
    :func:`conv_correlated`), or one for the layer; drawn once per example. ``noise_fn`` as for
    :func:`linear_correlated`.
    """
    spatial = (1,) * (x.dim() - 2)
    if any(k != 1 for k in noise_scale.shape[2:]):
        raise UnsupportedOperation(f"correlated noise along kernel positions (noise shape {tuple(noise_scale.shape)})")
    n_in, n_out = noise_scale.shape[:2]
    if n_out == 1 and n_in != 1:  # per input channel: Gaussian dropout on the input
        eps = torch.randn(x.shape[:1] + noise_scale.shape, dtype=x.dtype, device=x.device)
        xi = _noise(noise_scale, eps, noise_fn).reshape(x.shape[0], n_in)
        return conv_transpose(x * xi.reshape(xi.shape + spatial), loc, None, groups=groups, **kwargs)
    if n_in == 1:  # per output channel (within a group), or one noise for the whole layer
        out = conv_transpose(x, loc, None, groups=groups, **kwargs)
        eps = torch.randn(out.shape[:1] + noise_scale.shape, dtype=out.dtype, device=out.device)
        xi = _noise(noise_scale, eps, noise_fn).reshape(out.shape[0], n_out)
        if n_out != 1:
            xi = xi.repeat(1, groups)
        return out * xi.reshape(xi.shape + spatial)
    raise UnsupportedOperation(f"correlated noise of shape {tuple(noise_scale.shape)}")


# ----- F.embedding: indices of any shape, weight of shape (rows, dim) -----


def _lookup_keys(indices, num_rows):
    """
    For every lookup, its example (dim 0 of ``indices``; a 0-dim index is one example) and the number of its
    (example, row) pair among the distinct pairs: ``(examples, inverse, num_pairs)``.
    """
    n = indices.shape[0] if indices.dim() else 1
    examples = torch.arange(n, device=indices.device).reshape((-1,) + (1,) * max(indices.dim() - 1, 0))
    examples = examples.expand(indices.shape) if indices.dim() else examples.reshape(())
    if indices.dim() <= 1:  # every lookup is its own example: all pairs are distinct
        return examples, torch.arange(indices.numel(), device=indices.device).reshape(indices.shape), indices.numel()
    keys = examples * num_rows + indices
    pairs, inverse = torch.unique(keys, return_inverse=True)
    return examples, inverse, pairs.numel()


def embedding_mean(indices, loc):
    """``F.embedding(indices, loc)``: the posterior mean, no noise."""
    return F.embedding(indices, loc)


def embedding_per_example(indices, loc, scale):
    r"""
    ``F.embedding(indices, W)`` with a weight sample :math:`W_n \sim \mathcal{N}(\mu, \sigma^2)` per example
    :math:`n` (dim 0 of ``indices``; every index of a 1-dim ``indices`` is an example), drawn only at the rows
    that the example looks up: a row looked up twice by one example is one draw. This is exact, and it is also
    the LRT for a lookup (the looked-up rows are the pre-activations).
    """
    _, inverse, num_pairs = _lookup_keys(indices, loc.shape[0])
    noise = torch.randn(num_pairs, loc.shape[1], dtype=loc.dtype, device=loc.device)[inverse]
    return torch.addcmul(F.embedding(indices, loc), F.embedding(indices, scale), noise)


def embedding_flipout(indices, loc, scale):
    r"""
    A Flipout sample of ``F.embedding(indices, W)``: :math:`W_n = \mu + \Delta W \odot r_n s_n^\top` with
    one perturbation :math:`\Delta W = \sigma \odot \epsilon` per call and random signs :math:`r_n` (per row)
    and :math:`s_n` (per column) per example :math:`n` (dim 0 of ``indices``); a row looked up twice by one
    example sees one weight.
    """
    examples, inverse, num_pairs = _lookup_keys(indices, loc.shape[0])
    delta_w = scale * torch.randn_like(loc)
    sign_row = _rademacher((num_pairs,), loc)[inverse]
    sign_col = _rademacher((int(examples.max()) + 1 if examples.numel() else 0, loc.shape[1]), loc)[examples]
    return F.embedding(indices, loc) + F.embedding(indices, delta_w) * sign_row.unsqueeze(-1) * sign_col


def embedding_correlated(indices, loc, noise_scale, noise_fn=None):
    r"""
    ``F.embedding(indices, W)`` for :math:`W = \xi \odot \mu` with :math:`\xi \sim \mathcal{N}(1, \alpha)`
    per row, per column or per layer as ``noise_scale`` (:math:`\sqrt\alpha`, of shape ``(1 or rows, 1 or
    dim)``) says, drawn once per example (dim 0 of ``indices``): a row looked up twice by one example shares
    its noise. ``noise_fn`` as for :func:`linear_correlated` (noise per column or per layer only).
    """
    n_rows, n_cols = noise_scale.shape
    if noise_fn is not None and n_rows != 1:
        raise UnsupportedOperation("log-normal noise per embedding row (use per-column noise, granularity='output')")
    examples, inverse, num_pairs = _lookup_keys(indices, loc.shape[0])
    if n_rows != 1:
        noise = torch.randn(num_pairs, n_cols, dtype=loc.dtype, device=loc.device)[inverse]
        ns = F.embedding(indices, noise_scale)
    else:
        num_examples = int(examples.max()) + 1 if examples.numel() else 0
        noise = torch.randn(num_examples, n_cols, dtype=loc.dtype, device=loc.device)[examples]
        ns = noise_scale[0]
    return F.embedding(indices, loc) * _noise(ns, noise, noise_fn)


__all__ = [
    "UnsupportedOperation",
    "conv_correlated",
    "conv_flipout",
    "conv_lrt",
    "conv_mean",
    "conv_per_example",
    "conv_transpose_correlated",
    "embedding_correlated",
    "embedding_flipout",
    "embedding_mean",
    "embedding_per_example",
    "linear_correlated",
    "linear_flipout",
    "linear_given_weights",
    "linear_lrt",
    "linear_lrt_weights",
    "linear_mean",
    "linear_per_example",
]
