"""Text from a checkpoint: load the model and the manifest's tokenizer, run the sampler, decode.

    samples = generate("runs/demo", "data/manifest.json", n=4, length=64, steps=64, seed=0)
    for s in samples: print(s.text)

The sampler is ``training.diffusion.sample`` (low-confidence remasking, optional semi-
autoregressive blocks). A prompt is encoded with the same tokenizer and kept fixed at the start
of every sample. Generation is seeded: the same checkpoint, settings and seed give the same text.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import torch

from infra.contracts import load_manifest
from infra.errors import ConfigError
from infra.storage import Storage, is_s3
from training.data import load_tokenizer_json
from training.diffusion import sample
from training.evaluate import load_model


@dataclass
class Sample:
    text: str  # the decoded prompt + generated tokens, special tokens dropped
    token_ids: list[int]  # prompt + generated token ids
    n_prompt: int  # how many of token_ids are the prompt


def _manifest_dir(uri: str) -> str:
    import os

    return posixpath.dirname(uri) if is_s3(uri) else os.path.dirname(os.path.abspath(uri))


def generate(checkpoint: str, manifest_uri: str, n: int = 4, length: int = 64, steps: int | None = None,
             temperature: float = 1.0, block_length: int | None = None, seed: int = 0, prompt: str | None = None,
             storage: Storage | None = None, device: str | torch.device = "cpu") -> list[Sample]:
    """``n`` samples of ``length`` generated tokens (after the encoded ``prompt``, if any).

    ``checkpoint`` is anything training.evaluate.load_model accepts (a step folder, a
    checkpoints folder or a training output folder); the tokenizer is the manifest's
    tokenizer.json. ``steps`` defaults to ``length`` (one token committed per step).
    """
    from tokenizers import Tokenizer

    if n < 1 or length < 1:
        raise ConfigError(f"need n >= 1 and length >= 1, got n={n}, length={length}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if block_length is not None and (block_length < 1 or length % block_length):
        raise ConfigError(f"length ({length}) must be a positive multiple of block_length ({block_length})")
    storage = storage or Storage()
    manifest = load_manifest(manifest_uri, storage)
    tokenizer = Tokenizer.from_str(load_tokenizer_json(manifest, _manifest_dir(manifest_uri), storage))
    specials = manifest.tokenizer.special_ids
    model, args = load_model(checkpoint, device)
    if args.vocab_size <= max(specials.values()):
        raise ConfigError(f"checkpoint vocabulary ({args.vocab_size}) does not hold the manifest's special ids "
                          f"{specials}: was it trained on another manifest?")

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    if len(prompt_ids) + length > args.max_seq_len:
        raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + length ({length}) exceeds the model's "
                          f"max_seq_len ({args.max_seq_len})")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = sample(model, batch=n, length=length, steps=steps or length, mask_id=specials["mask"],
                 temperature=temperature, block_length=block_length, generator=generator, device=device,
                 prompt=torch.tensor(prompt_ids, dtype=torch.long) if prompt_ids else None)
    # Special ids (pad, bos, eos; the mask is never sampled) carry no text; ids past the
    # tokenizer's own vocabulary (a mask appended by the manifest) cannot be decoded.
    drop = set(specials.values())
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    samples = []
    for row in out.tolist():
        text = tokenizer.decode([i for i in row if i not in drop and i < vocab], skip_special_tokens=True)
        samples.append(Sample(text=text, token_ids=row, n_prompt=len(prompt_ids)))
    return samples
