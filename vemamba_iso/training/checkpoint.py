"""Model files: weights plus metadata, written atomically, loaded with ``weights_only=True``.

A model directory holds ``model.pt`` (weights + metadata: factor, axis, network config, normalisation,
degradation, version, training record), ``metadata.json`` (the same metadata, readable) and, while
training, ``checkpoint_last.pt`` (optimizer/scheduler state to resume after an interruption).
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..model import NetworkConfig, VEMambaNetwork

MODEL_FILE, METADATA_FILE, RESUME_FILE = "model.pt", "metadata.json", "checkpoint_last.pt"
FORMAT = "vemamba_iso-model-1"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "fib25_x4"


def shipped_factors() -> list[int]:
    """The factors a model is shipped for (``weights/fib25_x<K>/model.pt``)."""
    found = []
    for folder in WEIGHTS_DIR.glob("fib25_x*"):
        suffix = folder.name[len("fib25_x"):]
        if suffix.isdigit() and (folder / MODEL_FILE).is_file():
            found.append(int(suffix))
    return sorted(found)


def default_model_dir(factor: int | None = None) -> Path:
    """The shipped model for ``factor`` (``None``: the default x4 model).

    Raises:
        FileNotFoundError: no model is shipped for ``factor``; the message says how to train one.
    """
    if factor is None:
        return DEFAULT_MODEL_DIR
    folder = WEIGHTS_DIR / f"fib25_x{int(factor)}"
    if not (folder / MODEL_FILE).is_file():
        shipped = ", ".join(f"x{k}" for k in shipped_factors()) or "none"
        raise FileNotFoundError(
            f"no model is shipped for x{factor} (shipped: {shipped}); train one on your stack with "
            f"vemamba_iso_train --input STACK --factor {factor} --output my_x{factor}_model, then pass "
            f"--model my_x{factor}_model")
    return folder


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch_atomic(obj, path: str | os.PathLike) -> None:
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def save_model(model_dir: str | os.PathLike, network: VEMambaNetwork, metadata: dict) -> None:
    """Write ``model.pt`` and ``metadata.json`` into ``model_dir`` atomically."""
    model_dir = Path(model_dir)
    metadata = {**metadata, "format": FORMAT, "version": __version__, "network": network.config.to_dict(),
                "factor": network.config.factor}
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    save_torch_atomic({"metadata": metadata, "state_dict": state}, model_dir / MODEL_FILE)
    _atomic(model_dir / METADATA_FILE,
            lambda tmp: Path(tmp).write_text(json.dumps(metadata, indent=2, sort_keys=True)))


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """The model directory (or file) to use: ``model`` or the shipped default."""
    path = Path(model) if model else DEFAULT_MODEL_DIR
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}; pass --model MODEL_DIR written by vemamba_iso_train")
    return path


def training_stage(training: dict, factor: int) -> dict:
    """One training run of a model in a few numbers (kept in the records of the models trained on from it)."""
    return {"factor": int(factor), "steps": training.get("steps_done"), "batch_size": training.get("batch_size"),
            "seconds": training.get("seconds"), "device": training.get("device", "cpu"),
            "learning_rate": training.get("learning_rate"), "initialised_from": training.get("initialised_from")}


def training_stages(metadata: dict) -> list[dict]:
    """Every training run behind a model, earliest first: the runs of the models it was initialised from
    (``--init-from``, as far as they were recorded), then its own."""
    training = metadata.get("training", {})
    return list(training.get("earlier_stages", [])) + [training_stage(training, metadata["factor"])]


def network_settings(metadata: dict) -> dict:
    """The network configuration of a model's metadata. Models saved before ``keep_observed`` and
    ``training_patch`` existed keep their observed slices exactly when they were trained on plain
    subsampling (kept sections), and take their training patch from their training record."""
    network = dict(metadata["network"])
    if "keep_observed" not in network:
        network["keep_observed"] = metadata.get("degradation", {}).get("preset") == "subsample"
    training = metadata.get("training", {})
    if network.get("training_patch") is None and training.get("low_res_length") and training.get("lateral"):
        network["training_patch"] = (int(training["low_res_length"]), int(training["lateral"]))
    return network


def read_model_file(model: str | os.PathLike | None, device="cpu") -> dict:
    """``{"metadata", "state_dict"}`` of a model file (``weights_only``); a clear error for a truncated, corrupt
    or foreign file."""
    path = resolve_model_dir(model)
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{path} cannot be read: it is truncated or corrupt ({str(exc).splitlines()[0]}); "
                         "copy it again or retrain the model") from exc
    if not isinstance(blob, dict) or blob.get("metadata", {}).get("format") != FORMAT:
        raise ValueError(f"{path} is not a vemamba_iso model file (format {FORMAT})")
    return blob


def load_model(model: str | os.PathLike | None = None, device="cpu") -> tuple[VEMambaNetwork, dict]:
    """Load a trained network (eval mode) and its metadata; ``None`` loads the shipped default model."""
    blob = read_model_file(model, device)
    metadata = blob["metadata"]
    network = VEMambaNetwork(NetworkConfig.from_dict(network_settings(metadata)))
    network.load_state_dict(blob["state_dict"])
    network.freeze_degradation_encoder()
    return network.to(device).eval(), metadata
