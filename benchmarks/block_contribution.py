"""How much each LoG-VMamba block changes the features it is added to, in a trained nnU-Net checkpoint.

For every block, ||block(x) - x|| / ||x|| on a batch of preprocessed training patches (the planned patch
size, cases cropped or zero-padded to it). A block that starts as the identity and stays near 0 % has
not learnt anything yet: the network is still the plain nnU-Net.

    python benchmarks/block_contribution.py CHECKPOINT.pth [CHECKPOINT.pth ...] \\
        --preprocessed $nnUNet_preprocessed/Dataset004_Hippocampus -c 3d_fullres
"""

import argparse
import json
import os

import numpy as np
import torch


def load_patches(preprocessed: str, configuration: str, plans: dict, count: int) -> torch.Tensor:
    """``count`` preprocessed cases, cropped or zero-padded to the planned patch: (count, C, *patch)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    config = plans["configurations"][configuration]
    patch = tuple(config["patch_size"])
    folder = os.path.join(preprocessed, config["data_identifier"])
    dataset = infer_dataset_class(folder)(folder)
    patches = []
    for identifier in sorted(dataset.identifiers)[:count]:
        data = np.asarray(dataset.load_case(identifier)[0], dtype=np.float32)
        data = data[(slice(None),) + tuple(slice(0, p) for p in patch)]
        pad = [(0, 0)] + [(0, p - n) for p, n in zip(patch, data.shape[1:])]
        patches.append(np.pad(data, pad))
    return torch.from_numpy(np.stack(patches))


def block_contributions(checkpoint_path: str, preprocessed: str, configuration: str, count: int) -> dict:
    """Epoch and, per block (map size), the relative change it adds to its input."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_logmamba.blocks import LoGVSSBlock
    from nnunet_logmamba.training import TRAINERS

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)  # nnU-Net's own format
    plans = checkpoint["init_args"]["plans"]  # the plans the network was trained with
    manager = PlansManager(plans)
    config_manager = manager.get_configuration(configuration)
    dataset_json = checkpoint["init_args"]["dataset_json"]
    labels = manager.get_label_manager(dataset_json)
    trainer = TRAINERS[checkpoint["trainer_name"]]
    x = load_patches(preprocessed, configuration, plans, count)
    network = trainer.build_network_architecture(manager, config_manager, x.shape[1],
                                                 labels.num_segmentation_heads, True)
    network.load_state_dict(checkpoint["network_weights"])
    network.eval()
    found = []

    def record(module, inputs, output):
        found.append({"map": list(inputs[0].shape[2:]),
                      "relative_change": float((output - inputs[0]).norm() / inputs[0].norm())})

    for module in network.modules():
        if isinstance(module, LoGVSSBlock):
            module.register_forward_hook(record)
    with torch.no_grad():
        network(x)
    return {"checkpoint": checkpoint_path, "trainer": checkpoint["trainer_name"],
            "epoch": checkpoint["current_epoch"], "blocks": found}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--preprocessed", required=True, help="nnU-Net's preprocessed folder of the dataset")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--cases", type=int, default=7, help="cases in the batch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for path in args.checkpoints:
        result = block_contributions(path, args.preprocessed, args.configuration, args.cases)
        print(json.dumps(result))
        print(f"{result['trainer']} epoch {result['epoch']}: " + ", ".join(
            f"{'x'.join(map(str, b['map']))} {100 * b['relative_change']:.1f} %" for b in result["blocks"]))


if __name__ == "__main__":
    main()
