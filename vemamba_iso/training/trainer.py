"""Self-supervised training of the VEMamba network on lateral degradations of the input volumes.

Stages: (1) MoCo pre-training of the degradation encoder (skipped when it is switched off), then
(2) reconstruction training with the encoder frozen: L1 + (1 - SSIM), Adam, linear warm-up then cosine
decay, PSNR/SSIM on a held-out slab after every epoch, atomic checkpoints, resume after interruption. With
``weight_average_decay`` the model written (and validated) is an exponential moving average of the weights.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from tqdm import tqdm

from ..data.intensity import normalize
from ..data.sampling import LateralPairSampler, to_network_layout
from ..degradation import degrade_axial, preset, sample_offset
from ..evaluation.baselines import interpolate_axial
from ..evaluation.metrics import psnr, ssim
from ..inference.tiling import reconstruct_volume
from ..model import MoCoDegradationLearner, NetworkConfig, VEMambaNetwork, count_parameters
from .checkpoint import RESUME_FILE, read_model_file, save_model, save_torch_atomic, training_stages
from .losses import reconstruction_loss
from .weight_average import WeightAverage


@dataclass
class TrainingConfig:
    """Training hyper-parameters (defaults sized for a CPU; raise ``steps``/``batch_size`` on a GPU)."""

    steps: int = 2000
    batch_size: int = 4
    low_res_length: int = 8          # input patch length along the degraded axis
    lateral: int = 32                # input patch size along the two other axes
    learning_rate: float = 4e-4
    gradient_clip: float = 1.0
    warmup_steps: int = 100
    min_learning_rate_ratio: float = 0.02
    ssim_weight: float = 1.0
    steps_per_epoch: int = 100
    validation_fraction: float = 0.15  # end of the first volume (Z, or X for thin stacks), never trained on
    moco_steps: int = 200
    moco_batch_size: int = 8
    degradation: str = "subsample"     # preset name: realistic, average_pool, subsample
    pair_axes: str = "lateral"         # "all" also degrades Z: only for isotropic training volumes
    seed: int = 0
    network: dict = field(default_factory=dict)
    time_limit_minutes: float | None = None  # stop reconstruction training after this long; ``steps`` is then a cap
    # > 0: validate and write an exponential moving average of the weights; None: as the checkpoint resumed
    # (its average, or none), else none
    weight_average_decay: float | None = None


def learning_rate_factor(step: int, total: int, warmup: int, floor: float, time_fraction: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total`` steps, or earlier when
    ``time_fraction`` (training time spent / time limit, 0 without a limit) is further along than the steps.
    Never above the cosine at ``time_fraction``, so that a time limit reached during warm-up (a slow machine)
    still ends at the floor."""
    def cosine(progress: float) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    if step < warmup:
        return min((step + 1) / warmup, cosine(time_fraction))
    return cosine(max((step - warmup) / max(1, total - warmup), time_fraction))


def prepare_volumes(volumes: list[np.ndarray]) -> tuple[list[np.ndarray], dict]:
    """nnU-Net foreground cropping then normalisation (scheme chosen from the first volume's dtype)."""
    prepared, record = [], None
    for v in volumes:
        if not np.all(np.isfinite(v)):
            raise ValueError("input volume has NaN or infinite voxels; fix or mask them before training")
        cropped, _, _ = crop_to_nonzero(v[None])
        normed, rec = normalize(cropped[0], record["scheme"] if record else None)
        record = record or rec
        prepared.append(normed)
    return prepared, record


def split_validation(volume: np.ndarray, fraction: float, minimum_z: int,
                     minimum_lateral: int | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(training part, held-out part, which) of a (Z, Y, X) volume, never trained on.

    The held-out part is the last ``fraction`` of Z (``which = "Z"``), at least ``minimum_z`` slices, when
    ``minimum_z`` slices are left to train on. A stack too thin for that (an ssTEM stack of a few tens of
    sections) holds out the last ``fraction`` of X instead (``"X"``, at least ``minimum_lateral`` voxels,
    as many left); with neither possible, nothing is held out (``None, "none"``).
    """
    depth, width = volume.shape[0], volume.shape[2]
    n_val = max(minimum_z, int(round(depth * fraction)))
    if depth - n_val >= minimum_z:
        return volume[:-n_val], volume[-n_val:], "Z"
    minimum_lateral = minimum_lateral or minimum_z
    n_val = max(minimum_lateral, int(round(width * fraction)))
    if depth >= minimum_z and width - n_val >= minimum_lateral:
        return volume[..., :-n_val], volume[..., -n_val:], "X"
    return volume, None, "none"


class Trainer:
    def __init__(self, volumes: list[np.ndarray], factor: int, output_dir, config: TrainingConfig,
                 device: str = "cpu", progress: bool = True, log=print):
        if config.time_limit_minutes is not None and not config.time_limit_minutes > 0:
            raise ValueError(f"time_limit_minutes must be positive (or None), got {config.time_limit_minutes}")
        if config.weight_average_decay is not None and not 0.0 <= config.weight_average_decay < 1.0:
            raise ValueError(f"weight_average_decay must be in [0, 1) (0: no weight average), got "
                             f"{config.weight_average_decay}")
        self.config, self.device, self.progress, self.log = config, torch.device(device), progress, log
        self.output_dir = Path(output_dir)
        self.degradation = preset(config.degradation, factor)
        prepared, self.normalisation = prepare_volumes(volumes)
        train_first, self.validation, held_out = split_validation(
            prepared[0], config.validation_fraction, config.lateral,
            max(config.low_res_length * factor, config.lateral))
        if self.validation is None:
            log(f"no validation: the first volume {prepared[0].shape} is too small to hold out a region "
                "(validation PSNR/SSIM are not reported)")
        else:
            log(f"validation: the last {self.validation.shape[0 if held_out == 'Z' else 2]} voxels along "
                f"{held_out} of the first volume are held out")
        self.train_volumes = [train_first] + prepared[1:]
        torch.manual_seed(config.seed)
        self.sampler = LateralPairSampler(self.train_volumes, self.degradation, config.low_res_length,
                                          config.lateral, seed=config.seed,
                                          vary_degradation=config.degradation == "realistic",
                                          pair_axes=config.pair_axes)
        net_cfg = NetworkConfig(**{**config.network, "factor": factor,
                                   "sample_offset": sample_offset(factor, self.degradation.downsampling),
                                   "keep_observed": config.degradation == "subsample",
                                   "training_patch": (config.low_res_length, config.lateral)})
        self.network = VEMambaNetwork(net_cfg).to(self.device)
        self.optimizer = torch.optim.Adam([p for _, p in self.network.reconstruction_parameters()],
                                          lr=config.learning_rate)
        # before the scheduler: LambdaLR's constructor already calls the schedule, which reads the training time
        self.seconds, self.epoch_started = 0.0, None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: learning_rate_factor(
            s, config.steps, config.warmup_steps, config.min_learning_rate_ratio, self.time_fraction()))
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step, self.moco_done, self.history = 0, False, []
        self.running_loss = None
        self.initialised_from = None
        self.earlier_stages = []   # the training runs of the model this one was initialised from
        self.weight_average: WeightAverage | None = None   # started by run(), on the weights it starts from
        self.resumed_weight_average: dict | None = None

    def training_seconds(self) -> float:
        """Reconstruction training time so far in seconds, resumed runs included (MoCo pre-training, loading,
        validation and checkpoint writing excluded): ``seconds`` up to the last checkpoint plus the time since
        ``epoch_started``."""
        return self.seconds + (time.time() - self.epoch_started if self.epoch_started is not None else 0.0)

    def time_fraction(self) -> float:
        """Share of ``time_limit_minutes`` spent (0 without a limit): drives the learning-rate decay."""
        limit = self.config.time_limit_minutes
        return 0.0 if not limit else min(1.0, self.training_seconds() / (60.0 * limit))

    def finished(self) -> bool:
        """Reconstruction training is done: the step cap or the time limit is reached."""
        return self.step >= self.config.steps or self.time_fraction() >= 1.0

    # -- persistence ---------------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {"factor": self.network.config.factor, "axis": 0, "normalisation": self.normalisation,
                "degradation": {"preset": self.config.degradation, **self.degradation.to_dict()},
                "training": {**asdict(self.config), "steps_done": self.step, "seconds": round(self.seconds, 1),
                             "device": self.device.type, "history": self.history,
                             "initialised_from": self.initialised_from, "earlier_stages": self.earlier_stages,
                             "parameters": count_parameters(self.network)}}

    def save(self) -> None:
        """Write the model and the checkpoint to resume from: everything the next steps depend on (weights,
        weight average, optimizer, schedule, loss scaler, both random generators), so that a run killed at any
        point and resumed ends with the weights of an uninterrupted run (bit for bit on a CPU, same thread count;
        not with a time limit, where the schedule follows the clock).

        The checkpoint goes first: a kill between the two writes leaves a checkpoint to resume from, never a
        model without one."""
        state = {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "moco_done": self.moco_done, "history": self.history, "seconds": self.seconds,
                 "factor": self.network.config.factor, "rng": torch.get_rng_state(),
                 "sampler_rng": self.sampler.rng.bit_generator.state, "running_loss": self.running_loss,
                 "keep_observed": self.network.config.keep_observed, "initialised_from": self.initialised_from,
                 "earlier_stages": self.earlier_stages}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.weight_average is not None:
            state["weight_average"] = self.weight_average.state_dict()
        save_torch_atomic(state, self.output_dir / RESUME_FILE)
        with self.averaged_weights():
            save_model(self.output_dir, self.network, self.metadata())

    def averaged_weights(self):
        """Context in which the network holds the weights to validate and ship: the weight average when one
        is kept, else the trained weights."""
        return self.weight_average.applied() if self.weight_average is not None else nullcontext()

    def initialise_from(self, model_dir) -> int:
        """Copy every parameter whose name and shape match from another trained model (e.g. another factor);
        a copied degradation encoder is kept as is (no MoCo pre-training). Returns how many tensors were copied."""
        blob = read_model_file(model_dir, self.device)
        source = blob["state_dict"]
        own = self.network.state_dict()
        matching = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        self.network.load_state_dict(matching, strict=False)
        if self.network.degradation_encoder is not None and all(
                k in matching for k in own if k.startswith("degradation_encoder.")):
            self.moco_done = True
        self.initialised_from = str(model_dir)
        self.earlier_stages = training_stages(blob["metadata"])
        self.log(f"initialised {len(matching)} of {len(own)} tensors from {model_dir}")
        return len(matching)

    def try_resume(self) -> bool:
        path = self.output_dir / RESUME_FILE
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        if state["factor"] != self.network.config.factor:
            raise ValueError(f"{path} was trained for factor x{state['factor']}, not x{self.network.config.factor}; "
                             "use another --output or delete it")
        try:
            self.network.load_state_dict(state["network"])
        except RuntimeError as exc:   # missing, unexpected or differently shaped weights
            raise ValueError(f"{path} was trained with another network configuration (--dim, --groups, --blocks, "
                             "--state-size, --scan-paths, --aggregation or the degradation encoder differ); run "
                             "with the same options to resume, or pass --restart to train anew") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.moco_done = state["step"], state["moco_done"]
        self.history, self.seconds = state["history"], state["seconds"]
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if "sampler_rng" in state:
            self.sampler.rng.bit_generator.state = state["sampler_rng"]
        else:   # a checkpoint of an older version: the batches after it differ from an uninterrupted run's
            self.sampler.rng = np.random.default_rng(self.config.seed + self.step)
        self.running_loss = state.get("running_loss")
        self.adopt_weight_average(state.get("weight_average"), path)
        self.initialised_from = state.get("initialised_from")
        self.earlier_stages = state.get("earlier_stages", [])
        # a run started before kept slices existed finishes with the objective it started with
        self.network.config.keep_observed = bool(state.get("keep_observed", False))
        self.log(f"resuming from {path} at step {self.step}")
        return True

    # -- stages --------------------------------------------------------------------------------------
    def pretrain_degradation_encoder(self) -> None:
        encoder = self.network.degradation_encoder
        if encoder is None or self.moco_done:
            return
        learner = MoCoDegradationLearner(encoder).to(self.device)
        optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=1e-3)
        bar = tqdm(range(self.config.moco_steps), desc="MoCo degradation encoder", disable=not self.progress)
        for _ in bar:
            a, b = self.sampler.contrastive_batch(self.config.moco_batch_size)
            loss = learner(torch.from_numpy(a).to(self.device), torch.from_numpy(b).to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(infonce=f"{loss.item():.3f}")
        optimizer.zero_grad(set_to_none=True)
        self.moco_done = True

    def adopt_weight_average(self, saved: dict | None, path) -> None:
        """Take over the weight average of a checkpoint being resumed: a run keeps the average it started with
        (an unset ``weight_average_decay`` adopts it), so that its model is one average over the whole run.

        Raises:
            ValueError: ``weight_average_decay`` was set and differs from the checkpoint's.
        """
        saved_decay = saved["decay"] if saved is not None else 0.0
        wanted = self.config.weight_average_decay
        if wanted is not None and wanted != saved_decay:
            raise ValueError(f"{path} was trained with --weight-average {saved_decay:g}, not {wanted:g}; resume "
                             f"with --weight-average {saved_decay:g} (or without the option), or start a new model "
                             "from this one's weights with --init-from MODEL_DIR --output NEW_DIR")
        self.config.weight_average_decay = saved_decay
        self.resumed_weight_average = saved

    def start_weight_average(self) -> None:
        """Start the weight average on the current weights (after MoCo, after any --init-from), or continue
        the one of the checkpoint resumed from, or the one a previous ``run`` kept."""
        if not self.config.weight_average_decay:
            self.config.weight_average_decay = 0.0   # recorded as off in the metadata
            self.weight_average = None
            return
        if self.weight_average is not None and self.resumed_weight_average is None:
            return
        self.weight_average = WeightAverage(self.network.reconstruction_parameters(), self.config.weight_average_decay)
        if self.resumed_weight_average is not None:
            self.weight_average.load_state_dict(self.resumed_weight_average)
            self.resumed_weight_average = None

    def train_step(self) -> float:
        self.network.train()
        inputs, targets = self.sampler.batch(self.config.batch_size)
        x = torch.from_numpy(inputs).to(self.device)
        y = torch.from_numpy(targets).to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp):
            prediction = self.network(x)
        loss = reconstruction_loss(prediction.float(), y, self.config.ssim_weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # the trained parameters only: the frozen encoder's last MoCo gradients must not count (they would
        # also make a resumed run, which has none, clip differently)
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                       self.config.gradient_clip)
        scale = self.scaler.get_scale() if self.use_amp else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        # the loss scaler skips a step whose gradients overflowed (and lowers its scale): nothing to average then
        if self.weight_average is not None and (scale is None or self.scaler.get_scale() >= scale):
            self.weight_average.update()
        return float(loss.item())

    def validate(self) -> dict:
        """PSNR/SSIM of reconstructing the held-out slab degraded along Y (self-supervised proxy)."""
        if self.validation is None:
            return {}
        side = 2 * self.config.lateral
        target = to_network_layout(self.validation[:self.config.lateral, :side, :side])
        n = (target.shape[0] // self.degradation.factor) * self.degradation.factor
        target = target[:n]
        degraded = degrade_axial(target, self.degradation, axis=0, rng=np.random.default_rng(1234))
        with self.averaged_weights():
            estimate = reconstruct_volume(self.network, degraded, device=self.device, progress=False)
        e, t = torch.from_numpy(np.clip(estimate, 0, 1)), torch.from_numpy(target)
        linear = torch.from_numpy(interpolate_axial(degraded, self.degradation.factor,
                                                    self.network.config.sample_offset, "linear"))
        return {"val_psnr": round(psnr(e, t), 3), "val_ssim": round(float(ssim(e, t)), 4),
                "val_psnr_linear": round(psnr(linear, t), 3)}

    def run(self, resume: bool = True) -> dict:
        if resume:
            self.try_resume()
        self.pretrain_degradation_encoder()
        self.network.freeze_degradation_encoder()
        c = self.config
        self.start_weight_average()
        bar = tqdm(total=c.steps, initial=self.step, desc=f"training x{self.network.config.factor}",
                   disable=not self.progress)
        self.epoch_started = time.time()
        done = self.finished()   # a resumed run may have nothing left
        while not done:
            loss = self.train_step()
            self.step += 1
            running = loss if self.running_loss is None else 0.95 * self.running_loss + 0.05 * loss
            self.running_loss = running
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            done = self.finished()   # once per step: the last step is always validated and saved
            if self.step % c.steps_per_epoch == 0 or done:
                self.seconds = self.training_seconds()
                record = {"step": self.step, "loss": round(running, 5), **self.validate()}
                self.history.append(record)
                self.log(f"epoch {len(self.history)}: {record}")
                self.save()
                self.epoch_started = time.time()
        bar.close()
        self.epoch_started = None
        if not self.history:
            self.save()
        return self.metadata()
