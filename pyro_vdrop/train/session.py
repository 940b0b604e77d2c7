# SPDX-License-Identifier: Apache-2.0
"""
The live objects of one run (:class:`Session`) and the effect handlers the training loop uses.
"""

import math
import time
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from pyro_vdrop.distributions.util import base_distribution
from pyro_vdrop.infer.predictive import trace_guide_then_model
from pyro_vdrop.train.checkpoint import CHECKPOINT_VERSION, rng_state
from pyro_vdrop.train.components import (
    batches,
    build_guide,
    build_model,
    build_network,
    derived_seed,
    load_data,
    seeded_generator,
)
from pyro_vdrop.train.config import LinearDecay, TrainConfig
from pyro_vdrop.train.distributed import World
from pyro_vdrop.train.errors import RunError

#: Test examples per model run when evaluating (at most the training set size: the model's plate holds no more).
EVAL_BATCH = 1000


class ObservedLogits(Messenger):
    """Records the logits and the scaled log-likelihood of the model's Categorical observation site."""

    def __init__(self):
        super().__init__()
        self.logits = None
        self.log_lik = None
        self.name = None

    def _pyro_post_sample(self, msg):
        fn = base_distribution(msg["fn"])
        if not (msg["is_observed"] and isinstance(fn, torch.distributions.Categorical)):
            return
        if self.name is not None and self.name != msg["name"]:
            raise RunError(
                f"the model has two Categorical observation sites, {self.name!r} and {msg['name']!r}; "
                "the training loop needs exactly one"
            )
        self.name = msg["name"]
        self.logits = fn.logits.detach()
        log_prob = fn.log_prob(msg["value"]).detach()
        if msg["mask"] is not None:
            log_prob = log_prob * msg["mask"]
        self.log_lik = float((log_prob * msg["scale"]).sum())


class DataWeight(Messenger):
    """
    Scales the observed sites by ``factor`` and masks them with ``mask``: in a multi-process epoch whose last
    steps carry padding (examples repeated so that every process has as many), the padding is masked out and the
    real examples are scaled so that each counts exactly once.
    """

    def __init__(self, mask: torch.Tensor, factor: float):
        super().__init__()
        self.mask = mask
        self.factor = factor

    def _pyro_sample(self, msg):
        if msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.factor
            msg["mask"] = self.mask if msg["mask"] is None else msg["mask"] & self.mask


class Session:
    """The live objects of one run (in one process of a run): data, model, guide, optimizer and SVI."""

    def __init__(
        self, config: TrainConfig, *, device: torch.device, restoring: bool = False, world: World | None = None
    ):
        self.config = config
        self.device = device
        self.world = world = world or World()
        self.x_train, self.y_train, self.x_test, self.y_test = load_data(config, device=device)
        self.num_data = self.x_train.shape[0]
        # Each process takes its share of the global batch, and ceil(N / P) examples per epoch (DistributedSampler);
        # the padding that makes the shares equal is masked out of the data term (see padding)
        self.batch_size = config.batch_size // world.size
        self.num_local = math.ceil(self.num_data / world.size)
        self.steps_per_epoch = math.ceil(self.num_local / self.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        pyro.clear_param_store()
        pyro.set_rng_seed(config.seed)
        self.network = build_network(config).to(device)
        self.pretrain_time = 0.0
        pretrain = config.pretrain_epochs > 0 and not restoring  # a restored checkpoint overwrites every weight
        if pretrain:
            t0 = time.perf_counter()
            self._pretrain()
            self.pretrain_time = time.perf_counter() - t0
        self.model = build_model(self.network, num_data=self.num_data, guide=config.guide)
        init_values = self.model.initial_weights() if pretrain else None
        self.guide = build_guide(self.model, config, init_values=init_values)
        # The guide creates its parameters on its first call: make them now, on the first minibatch.
        self.guide(self.x_train[: self.batch_size], self.y_train[: self.batch_size])
        self.kl_scale = self.guide.kl_scale  # the variant's own KL factor (A2: 1/3); warm-up multiplies it
        self.recorder = ObservedLogits()
        from pyro_vdrop.optim import JointLRScheduler, supports_fused

        # one torch Adam and one LambdaLR for all parameters; the checkpoint format is pyro.optim.LambdaLR's. Adam's
        # fused kernel where this torch has it for the device (its updates equal the loop's to float rounding); a
        # resumed run keeps the kind of update its checkpoint was written with
        adam_args = {"lr": config.lr}
        if supports_fused(torch.optim.Adam, device):
            adam_args["fused"] = True
        self.optim = JointLRScheduler(
            torch.optim.lr_scheduler.LambdaLR,
            {
                "optimizer": torch.optim.Adam,
                "optim_args": adam_args,
                "lr_lambda": LinearDecay(self.total_steps, config.lr_decay),
            },
        )
        if world.distributed:
            from pyro_vdrop.optim import DistributedOptimizer

            # as DistributedDataParallel does: start every process from process 0's parameters, then average the
            # gradients; each process draws its own noise
            self._broadcast_parameters()
            self.optim = DistributedOptimizer(self.optim)
            pyro.set_rng_seed(derived_seed(config.seed, 4, world.rank) % 2**32)  # numpy takes 32-bit seeds
        self.svi = SVI(self.recorder(self.model), self.guide, self.optim, TraceMeanField_ELBO())

    def _broadcast_parameters(self) -> None:
        with torch.no_grad():
            for _, value in sorted(pyro.get_param_store().named_parameters(), key=lambda item: item[0]):
                dist.broadcast(value, src=0)

    def _pretrain(self) -> None:
        """Plain maximum-likelihood training of the network, whose weights then initialise θ [2]."""
        net, config = self.network, self.config
        optim = torch.optim.Adam(net.parameters(), lr=config.lr)
        for epoch in range(config.pretrain_epochs):
            order = torch.randperm(self.num_data, generator=seeded_generator(config.seed, 3, epoch))
            for s in batches(self.num_data, config.batch_size):
                idx = order[s].to(self.device)
                loss = torch.nn.functional.cross_entropy(net(self.x_train[idx]), self.y_train[idx])
                optim.zero_grad()
                loss.backward()
                optim.step()
            if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
                raise RunError(
                    f"pretraining diverged: the network's weights are not finite after pretraining epoch {epoch + 1} "
                    f"(last loss {float(loss.detach()):.4g}); lower --lr, which pretraining uses too, or pass "
                    "--pretrain-epochs 0"
                )

    def state(self, *, epoch: int, step: int, history: list, elapsed: float) -> dict:
        """The checkpoint; a collective operation when several processes train (each contributes its RNG state)."""
        rng = rng_state()
        if self.world.distributed:
            states = [None] * self.world.size
            dist.all_gather_object(states, rng)
            rng = states
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "step": step,
            "param_store": pyro.get_param_store().get_state(),
            "optim": self.optim.get_state(),
            "rng": rng,
            "world_size": self.world.size,
            "history": history,
            "elapsed": elapsed,
        }

    def restore(self, state: dict, *, path: Path) -> None:
        unconstrained = dict(pyro.get_param_store().named_parameters())
        names = sorted(unconstrained)
        saved = sorted(state["param_store"]["params"])
        if saved != names:
            missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
            raise RunError(
                f"{path} does not fit the model built from its configuration (model={self.config.model!r}, "
                f"guide={self.config.guide!r}): parameters missing from the checkpoint {missing[:5]}, unexpected "
                f"{extra[:5]}. Was it written by another version of pyro-vdrop?"
            )
        for name, value in state["param_store"]["params"].items():
            current = unconstrained[name]
            if value.shape != current.shape:
                raise RunError(
                    f"{path} does not fit the model built from its configuration (model={self.config.model!r}): "
                    f"parameter {name!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(current.shape)} "
                    "in the model"
                )
        # Copy in place: the model's deterministic nn.Parameters (biases) are the very tensors in the param store,
        # and a PyroModule keeps using its own tensor even after the store's entry is replaced (set_state).
        with torch.no_grad():
            for name, value in state["param_store"]["params"].items():
                unconstrained[name].copy_(value)
        self.optim.set_state(state["optim"])

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """
        The shuffled order of epoch ``epoch``: a generator seeded by (seed, epoch), so resume repeats it. Process
        ``r`` of ``P`` takes ``order[r::P]``, padded to ``ceil(N / P)`` examples by wrapping around
        (:class:`~torch.utils.data.DistributedSampler` over the order), so that when ``P`` divides ``M`` and ``M``
        divides ``N`` the ``k``-th steps of all processes together see the ``k``-th minibatch of one process.
        """
        order = torch.randperm(self.num_data, generator=seeded_generator(self.config.seed, 0, epoch))
        if self.world.distributed:
            from torch.utils.data import DistributedSampler

            shard = DistributedSampler(
                range(self.num_data), num_replicas=self.world.size, rank=self.world.rank, shuffle=False
            )
            order = order[list(shard)]
        return order

    def padding(self, s: slice) -> tuple[torch.Tensor | None, float]:
        r"""
        Which examples of this process's slice ``s`` of its shard are real, and the factor their data term needs.

        The epoch's order is padded to :math:`P\lceil N/P\rceil` examples by wrapping around
        (``epoch_order``); process :math:`r` takes positions :math:`r, r + P, \dots`, so position
        :math:`r + Pj` is real when it is below :math:`N`. A step whose :math:`P` slices hold :math:`M'` real
        examples must weight each by :math:`N/M'`; the plate weights this process's :math:`b` examples by
        :math:`N/b` and the gradients are averaged over the processes, hence the factor :math:`Pb/M'` on the real
        examples and a mask on the padding. Returns ``(None, 1.0)`` for a step without padding.
        """
        world = self.world
        if not world.distributed:
            return None, 1.0
        positions = torch.arange(s.start, s.stop) * world.size + world.rank
        real = positions < self.num_data
        num_real = min(self.num_data, world.size * s.stop) - world.size * s.start  # over all processes
        if num_real == world.size * (s.stop - s.start):
            return None, 1.0
        return real.to(self.device), world.size * (s.stop - s.start) / num_real

    @property
    def eval_batch_size(self) -> int:
        """Test examples per model run: the model's plate holds at most ``num_data``."""
        return min(EVAL_BATCH, self.num_data)

    def kl(self) -> float:
        """The KL term :math:`\\mathrm{KL}(q\\|p)`, without the guide's ``kl_scale`` (analytic; a minibatch only sets
        up the traces)."""
        x, y = self.x_train[: self.config.batch_size], self.y_train[: self.config.batch_size]
        total = 0.0
        with torch.no_grad():
            guide_trace, model_trace = trace_guide_then_model(self.model, self.guide, (x, y))
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample" or name not in model_trace.nodes:
                    continue
                # the site's scale is the guide's kl_scale (warm-up, A2): leave it out, this is the KL itself
                total += float(torch.distributions.kl_divergence(site["fn"], model_trace.nodes[name]["fn"]).sum())
        return total


__all__ = [
    "DataWeight",
    "EVAL_BATCH",
    "ObservedLogits",
    "Session",
]
