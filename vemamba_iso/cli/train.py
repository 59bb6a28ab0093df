"""``vemamba_iso_train``: self-supervised training on lateral degradations of anisotropic volumes."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import (CommandError, CommandParser, add_device_args, input_paths, non_negative_int, positive_int,
                     read_input, run_command, setup_torch)
from .outputs import claim_model_dir


def build_parser() -> CommandParser:
    """The command's arguments."""
    parser = CommandParser(
        prog="vemamba_iso_train",
        description="Train VEMamba self-supervised on lateral degradations of anisotropic (Z, Y, X) volumes. "
                    "An interrupted run (Ctrl-C, SIGTERM, even SIGKILL) resumes from its last checkpoint when "
                    "the same command is run again.")
    parser.add_argument("--input", action="append", required=True,
                        help="training volume (TIFF, HDF5, Zarr, NIfTI) or folder of volumes; repeatable")
    parser.add_argument("--key", default=None, help="dataset key inside HDF5/Zarr inputs")
    parser.add_argument("--factor", type=int, required=True, help="axial anisotropy factor to undo (2..10)")
    parser.add_argument("--output", required=True,
                        help="model folder to write (new, or one of ours: then training resumes)")
    parser.add_argument("--steps", type=positive_int, default=2000,
                        help="reconstruction training steps (with --time-limit: the most steps)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop reconstruction training after this many minutes (resumed runs count their "
                             "earlier time; a larger limit on a resumed run raises the decayed rate again); the "
                             "learning rate decays over the time, whichever of steps and time runs out first")
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--patch", type=positive_int, nargs=2, default=(8, 32), metavar=("AXIAL", "LATERAL"),
                        help="input patch: length along the degraded axis and lateral size (default 8 32)")
    parser.add_argument("--lr", type=float, default=4e-4, help="peak Adam learning rate")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=None,
                        help="default: 5%% of --steps (at most 100 with --time-limit)")
    parser.add_argument("--weight-average", type=float, default=None, metavar="DECAY",
                        help="write (and validate) an exponential moving average of the weights with this decay, "
                             "e.g. 0.999: over about the last 1/(1-DECAY) steps once warmed up (after about "
                             "9/(1-DECAY) steps; before that about the last tenth of the steps so far). 0 writes "
                             "the last weights (the default for a new model); a resumed run keeps its setting")
    parser.add_argument("--steps-per-epoch", type=positive_int, default=100, help="validation/checkpoint interval")
    parser.add_argument("--dim", type=positive_int, default=32)
    parser.add_argument("--groups", type=positive_int, default=4)
    parser.add_argument("--blocks", type=positive_int, default=4)
    parser.add_argument("--state-size", type=positive_int, default=8)
    parser.add_argument("--scan-paths", type=int, default=4, choices=[4, 2],
                        help="scan paths per channel chunk: 4 (the paper's ALCSSM: both lateral orders, forward and "
                             "reversed) or 2 (one lateral order; ablation)")
    parser.add_argument("--aggregation", default="restored", choices=["restored", "input", "sum"],
                        help="how the paths of a chunk are fused: DWAM weights from the restored paths (the "
                             "paper's), from the chunk's input, or a plain sum (ablation)")
    parser.add_argument("--no-degradation-encoder", action="store_true",
                        help="switch the MoCo degradation encoder and VDIM modulation off (ablation)")
    parser.add_argument("--moco-steps", type=non_negative_int, default=200, help="degradation encoder pre-training steps")
    parser.add_argument("--degradation", default="subsample", choices=["subsample", "average_pool", "realistic"],
                        help="simulated axial degradation (must match how the stack was acquired)")
    parser.add_argument("--pair-axes", default="lateral", choices=["lateral", "all"],
                        help="axes degraded to make training pairs: 'lateral' (self-supervised, for anisotropic "
                             "stacks) or 'all' (also Z; only for isotropic training volumes such as FIB-SEM)")
    parser.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                        help="start from a trained model's weights where shapes match (e.g. a model for another "
                             "factor); ignored when resuming")
    parser.add_argument("--restart", action="store_true",
                        help="ignore an existing checkpoint_last.pt in --output instead of resuming (--overwrite implies it)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_args(parser)
    return parser


def default_warmup(steps: int, time_limit: float | None) -> int:
    """5 % of the steps; with a time limit the steps are only a cap, so at most 100."""
    warmup = max(1, steps // 20)
    return min(warmup, 100) if time_limit else warmup


def run(args) -> int:
    """Train and write the model folder; returns 0."""
    setup_torch(args)
    from ..model import MAX_FACTOR, MIN_FACTOR
    if not MIN_FACTOR <= args.factor <= MAX_FACTOR:
        raise CommandError(f"--factor must be in {MIN_FACTOR}..{MAX_FACTOR}, got {args.factor}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise CommandError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
    if args.weight_average is not None and not 0.0 <= args.weight_average < 1.0:
        raise CommandError(f"--weight-average must be a decay in [0, 1) (0: off), got {args.weight_average}")
    args.restart = args.restart or args.overwrite   # replacing the output means not resuming what it holds
    claim_model_dir(args.output, args.overwrite, args.restart)
    from ..training import Trainer, TrainingConfig
    volumes = [read_input(p, args.key).data for p in input_paths(args.input)]
    config = TrainingConfig(
        steps=args.steps, batch_size=args.batch_size, low_res_length=args.patch[0], lateral=args.patch[1],
        learning_rate=args.lr,
        warmup_steps=(args.warmup_steps if args.warmup_steps is not None
                      else default_warmup(args.steps, args.time_limit)),
        time_limit_minutes=args.time_limit, weight_average_decay=args.weight_average,
        steps_per_epoch=args.steps_per_epoch, moco_steps=args.moco_steps,
        degradation=args.degradation, pair_axes=args.pair_axes, seed=args.seed,
        network=dict(dim=args.dim, groups=args.groups, blocks=args.blocks, state_size=args.state_size,
                     use_degradation_encoder=not args.no_degradation_encoder, paths_per_chunk=args.scan_paths,
                     aggregation=args.aggregation))
    trainer = Trainer(volumes, args.factor, args.output, config, device=args.device)
    resumed = not args.restart and trainer.try_resume()
    if args.init_from and not resumed:
        trainer.initialise_from(args.init_from)
    args.interrupt_note = (f"the last checkpoint in {args.output} is kept (if an epoch finished): run the same "
                           "command again to resume")
    step_before = trainer.step
    metadata = trainer.run(resume=False)
    last = metadata["training"]["history"][-1] if metadata["training"]["history"] else {}
    if resumed and trainer.step == step_before:
        print(f"nothing left to train in {args.output} (step {trainer.step}; the steps or the time limit are spent); "
              f"raise --steps or --time-limit to train on. Last validation: {last}")
        return 0
    print(f"model written to {Path(args.output) / 'model.pt'} ({metadata['training']['parameters']} parameters); "
          f"last validation: {last}")
    return 0


def main(argv=None) -> int:
    """Entry point of ``vemamba_iso_train``; returns the exit code."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
