"""Checkpoint layout, the ``latest`` pointer, RNG state encoding and eval weights.

    <output_dir>/checkpoints/
        latest                      text file naming the newest COMPLETE checkpoint, e.g. "step-00000200"
        step-00000200/
            mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's own files (engine.save_checkpoint)
            model_args.json         training.model.ModelArgs
            model.safetensors | model.pt   full weights for evaluation (no DeepSpeed needed to read)
            ema.safetensors         full EMA weights (training.ema), when the run keeps an EMA
            train_config.json       the TrainConfig that produced it (to explain a config_hash change)
            trainer_state.json      infra.contracts.TrainerState, written LAST

Completeness: trainer_state.json is written after everything else in the folder, and ``latest``
is replaced (atomically) only after that. A crash mid-save leaves ``latest`` on the previous
checkpoint, so a half-written folder is never resumed from. ``latest`` holds just the tag, which
is also DeepSpeed's own convention, so ``engine.load_checkpoint(<checkpoints>)`` agrees with us.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch

from infra.contracts import TRAINER_STATE_FILE
from infra.errors import ContractError
from infra.storage import Storage

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_ARGS_FILE = "model_args.json"
TRAIN_CONFIG_FILE = "train_config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "model.pt"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR)


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def write_latest(output_dir: str, tag: str, storage: Storage | None = None) -> None:
    """Point ``latest`` at ``tag`` (temp file + rename: readers see the old or the new tag)."""
    (storage or Storage()).write_bytes(os.path.join(checkpoints_root(output_dir), LATEST_FILE), tag.encode())


# ``latest`` names one folder next to it. Anything else ("../../elsewhere", "/abs") would make a
# resume or an eval read a checkpoint from outside the run's checkpoints folder.
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _read_tag(pointer: str) -> str:
    tag = open(pointer).read().strip()
    if not _TAG.fullmatch(tag) or tag in (".", ".."):
        raise ContractError(f"{pointer}: names {tag[:100]!r}, not a checkpoint folder next to it (e.g. step-00000200)")
    return tag


# What DeepSpeed (0.19, ZeRO 0-3, fp32/bf16) pickles into its .pt files beyond what
# torch.load(weights_only=True) allows by itself. DeepSpeed loads its files with weights_only=False,
# i.e. a crafted checkpoint would run code on resume; ``check_pickled_files`` refuses any file naming
# another global before DeepSpeed opens it.
DEEPSPEED_PICKLED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def check_pickled_files(folder: str) -> None:
    """Refuse (ContractError) a checkpoint whose .pt files could run code when unpickled.

    Static: torch's scanner reads each file's pickle opcode by opcode without executing it, fails on
    any opcode outside its small safe set, and lists the globals it references; every global must be
    one torch's weights_only loader allows or one of ``DEEPSPEED_PICKLED_GLOBALS``.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for path in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
        try:
            unsafe = set(get_unsafe_globals_in_checkpoint(path))
        except Exception as e:  # not a torch.save zip (a raw pickle), or opcodes the scanner refuses
            raise ContractError(f"{path}: refused to load: not a plain torch.save checkpoint "
                                f"({type(e).__name__}: {e})") from None
        unexpected = unsafe - DEEPSPEED_PICKLED_GLOBALS
        if unexpected:
            raise ContractError(f"{path}: refused to load: it would import {', '.join(sorted(unexpected))} "
                                "when unpickled (only tensors and DeepSpeed's own state are allowed)")


def latest_checkpoint(output_dir: str, verify: bool = True) -> str | None:
    """The folder of the newest complete checkpoint under ``output_dir``, or None if there is none.

    ``verify``: also check that its pickled files cannot run code (``check_pickled_files``); this is
    the folder a resume hands to DeepSpeed's ``load_checkpoint``.
    """
    pointer = os.path.join(checkpoints_root(output_dir), LATEST_FILE)
    if not os.path.exists(pointer):
        return None
    tag = _read_tag(pointer)
    folder = os.path.join(checkpoints_root(output_dir), tag)
    if not os.path.exists(os.path.join(folder, TRAINER_STATE_FILE)):
        raise ContractError(f"{pointer} names {tag!r} but {folder} has no {TRAINER_STATE_FILE}")
    if verify:
        check_pickled_files(folder)
    return folder


def resolve_checkpoint_dir(path: str) -> str:
    """Accept a checkpoint folder, a ``checkpoints`` folder or a training output folder."""
    if os.path.exists(os.path.join(path, MODEL_ARGS_FILE)):
        return path
    if os.path.exists(os.path.join(path, LATEST_FILE)):
        tag = _read_tag(os.path.join(path, LATEST_FILE))
        return resolve_checkpoint_dir(os.path.join(path, tag))
    if os.path.exists(os.path.join(path, CHECKPOINTS_DIR, LATEST_FILE)):
        return resolve_checkpoint_dir(os.path.join(path, CHECKPOINTS_DIR))
    raise ContractError(f"{path}: not a checkpoint (no {MODEL_ARGS_FILE}, no {LATEST_FILE} pointer)")


def step_folders(output_dir: str) -> list[tuple[int, str]]:
    """[(step, folder)] of every ``step-NNNNNNNN`` folder under ``output_dir``, oldest first (complete or not)."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith("step-") and name[5:].isdigit() and os.path.isdir(os.path.join(root, name)):
            found.append((int(name[5:]), os.path.join(root, name)))
    return sorted(found)


def prune_checkpoints(output_dir: str, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the folders deleted.

    Only folders OLDER than the one ``latest`` names are candidates, so neither the checkpoint a
    resume would use nor one being written right now is ever touched. Incomplete folders older
    than ``latest`` are debris of a crashed save and are deleted as well.
    """
    latest = latest_checkpoint(output_dir, verify=False)  # deletes, never loads
    if latest is None:
        return []
    latest_step = int(os.path.basename(latest)[5:])
    older = [(s, f) for s, f in step_folders(output_dir) if s < latest_step]
    complete = [f for _, f in older if os.path.exists(os.path.join(f, TRAINER_STATE_FILE))]
    keep = set(complete[len(complete) - (keep_last - 1):]) if keep_last > 1 else set()
    deleted = []
    for _, folder in older:
        if folder not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
    return deleted


# --------------------------------------------------------------------------- weights for evaluation


def save_weights(state_dict: dict[str, torch.Tensor], folder: str) -> str:
    """Write plain weights: safetensors if installed, else torch.save of tensors only.

    Either format loads without executing code (safetensors by design, model.pt through
    ``torch.load(weights_only=True)``). Returns the path written.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = os.path.join(folder, TORCH_WEIGHTS_FILE)
        torch.save(tensors, path + ".tmp")
    else:
        path = os.path.join(folder, SAFETENSORS_FILE)
        save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    st = os.path.join(folder, SAFETENSORS_FILE)
    if os.path.exists(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ContractError(f"{st}: reading it needs the safetensors package (pip install safetensors)") from None
        return load_file(st)
    pt = os.path.join(folder, TORCH_WEIGHTS_FILE)
    if os.path.exists(pt):
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # e.g. a pickle that would import os.system: refused, and said so
            raise ContractError(f"{pt}: refused to load: not plain tensors ({str(e).splitlines()[0]})") from None
    raise ContractError(f"{folder}: no {SAFETENSORS_FILE} or {TORCH_WEIGHTS_FILE}")


def write_json(path: str, obj) -> None:
    Storage().write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- RNG states as JSON


def _tensor_to_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _b64_to_tensor(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng_state(noise_generator: torch.Generator) -> dict:
    """Every generator that influences training, JSON-encodable.

    python/numpy/torch global states cover library code and dropout; ``noise`` is the
    generator of the diffusion times and masks (its own, so that nothing else can shift it).
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_key.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _tensor_to_b64(torch.get_rng_state()),
        "noise": _tensor_to_b64(noise_generator.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict, noise_generator: torch.Generator) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.array(np_key, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_b64_to_tensor(state["torch"]))
    noise_generator.set_state(_b64_to_tensor(state["noise"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_to_tensor(s) for s in state["cuda"]])
