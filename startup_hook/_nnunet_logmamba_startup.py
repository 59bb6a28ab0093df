"""Interpreter start-up hook of bioimage-mamba (imported by nnunet_logmamba_startup.pth).

nnU-Net >= 2.8 looks for trainer classes in the folders listed in ``nnUNet_extTrainer``. This appends
the folder holding our one small trainer module, keeping whatever the user already listed, so that
``nnUNetv2_train ... -tr nnUNetTrainerLoGVMamba`` works right after ``pip install``. It must stay cheap
(it runs in every Python process): no torch, no package import, only a path lookup.
"""
import os


def _register() -> None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("nnunet_logmamba")
        if spec is None or not spec.submodule_search_locations:
            return
        folder = os.path.join(list(spec.submodule_search_locations)[0], "training", "ext_trainers")
        if not os.path.isdir(folder):
            return
        current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
        if folder not in current:
            os.environ["nnUNet_extTrainer"] = os.pathsep.join(current + [folder])
    except Exception:  # a start-up hook must never break the interpreter
        pass


_register()
