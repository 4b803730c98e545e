"""`maskmix sample` and training.generate on a tiny checkpoint trained with whole-word masking.

The fixture writes a small text corpus tokenized with a real ByteLevel BPE (tokenizer.json
beside the manifest, as the pipeline writes it), trains a few DeepSpeed steps with
masking.strategy=whole_word (which reads that tokenizer for word starts), and samples from it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                           ".cache", "torch_extensions"))

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from infra.config import MaskingConfig, ModelConfig, TokenizerConfig, TrainConfig  # noqa: E402
from infra.contracts import DomainShards, Manifest, TokenizerInfo, write_artifact  # noqa: E402
from infra.errors import ConfigError, ContractError  # noqa: E402
from pipelines.tokenize import special_ids, tokenizer_sha256, train_tokenizer  # noqa: E402

try:
    from training_fixtures import write_shard  # noqa: E402
except ImportError:  # tests/ imported as a package
    from tests.training_fixtures import write_shard  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASKMIX = [sys.executable, "-m", "infra.cli"]

SUBJECTS = ["the cat", "a dog", "the old man", "my friend", "the river", "a small bird"]
VERBS = ["sees", "likes", "follows", "finds", "watches"]
OBJECTS = ["the moon", "a red ball", "the garden", "the quiet town", "an apple"]


def sentences(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"{SUBJECTS[rng.integers(6)]} {VERBS[rng.integers(5)]} {OBJECTS[rng.integers(5)]}."
                    for _ in range(n))


def write_text_corpus(root: str, n_docs: int = 120, seed: int = 0) -> tuple[str, object]:
    """shards/text/{part,validation}-00000.parquet + tokenizer.json + manifest.json under root."""
    rng = np.random.default_rng(seed)
    texts = [sentences(rng, int(rng.integers(2, 6))) for _ in range(n_docs)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=2))
    tok_json = tok.to_str()
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        f.write(tok_json)
    shards = []
    for split, stem, docs in (("train", "part-00000", texts[:-10]), ("validation", "validation-00000", texts[-10:])):
        ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
        rel = f"shards/text/{stem}.parquet"
        info = write_shard(os.path.join(root, rel), ids, [f"{stem}-{i}" for i in range(len(ids))])
        shards.append(info.model_copy(update={"path": rel, "split": split}))
    manifest = Manifest(config_hash="test",
                        tokenizer=TokenizerInfo(path="tokenizer.json", sha256=tokenizer_sha256(tok_json),
                                                vocab_size=tok.get_vocab_size(), special_ids=special_ids(tok, "test")),
                        domains={"text": DomainShards(shards=shards)})
    path = os.path.join(root, "manifest.json")
    write_artifact(manifest, path)
    return path, tok


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(manifest path, tokenizer, output dir, progress lines, tags) of a 20-step whole-word run."""
    import infra.tracking
    from training.trainer import train

    root = str(tmp_path_factory.mktemp("text"))
    manifest_path, tok = write_text_corpus(root)
    out = str(tmp_path_factory.mktemp("run"))
    cfg = TrainConfig(manifest=manifest_path, output_dir=out, model=ModelConfig(preset="test"), seq_len=64,
                      micro_batch_size=8, steps=20, warmup_steps=2, lr=3e-3, log_every=10, zero_stage=0,
                      masking=MaskingConfig(strategy="whole_word"))
    tags, lines = {}, []
    original = infra.tracking.set_tags
    infra.tracking.set_tags = tags.update
    try:
        train(cfg, progress=lines.append)
    finally:
        infra.tracking.set_tags = original
    return manifest_path, tok, out, lines, tags


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(MASKMIX + list(args), cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_whole_word_run_is_tagged_as_not_exact(trained):
    _, _, _, lines, tags = trained
    assert tags == {"maskmix.masking": "whole_word/uniform", "maskmix.nelbo_exact": "false"}
    assert any("not the NELBO" in line for line in lines)


@pytest.mark.slow
def test_cli_sample_prints_n_texts_seeded_and_without_masks(trained):
    manifest_path, tok, out, _, _ = trained
    common = ["sample", "--checkpoint", out, "--manifest", manifest_path, "-n", "3", "--length", "24",
              "--steps", "12", "--seed", "7"]
    plain = run_cli(*common)
    assert plain.returncode == 0, plain.stderr
    headers = [line for line in plain.stdout.splitlines() if line.startswith("--- sample ")]
    assert headers == ["--- sample 1/3 ---", "--- sample 2/3 ---", "--- sample 3/3 ---"]
    assert "<mask>" not in plain.stdout

    # Same seed in another process: the same texts (here as JSON lines, with the token ids).
    again = run_cli(*common, "--jsonl")
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2]
    texts = plain.stdout.split("--- sample ")[1:]
    assert [t.split("---\n", 1)[1].rstrip("\n") for t in texts] == [r["text"] for r in rows]
    mask_id = tok.token_to_id("<mask>")
    for r in rows:
        assert len(r["token_ids"]) == 24 and mask_id not in r["token_ids"]
        assert r["text"].strip()  # decoded to something


@pytest.mark.slow
def test_cli_sample_with_prompt_and_blocks(trained):
    manifest_path, tok, out, _, _ = trained
    prompt = "the cat sees"
    result = run_cli("sample", "--checkpoint", out, "--manifest", manifest_path, "-n", "2", "--length", "16",
                     "--block-length", "8", "--temperature", "0.5", "--prompt", prompt, "--jsonl")
    assert result.returncode == 0, result.stderr
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
    for row in map(json.loads, result.stdout.splitlines()):
        assert row["n_prompt"] == len(prompt_ids)
        assert row["token_ids"][:len(prompt_ids)] == prompt_ids
        assert len(row["token_ids"]) == len(prompt_ids) + 16
        assert row["text"].startswith(prompt)
    # A bad block length is one clear error, exit status 2.
    bad = run_cli("sample", "--checkpoint", out, "--manifest", manifest_path, "--length", "16", "--block-length", "5")
    assert bad.returncode == 2 and "block_length" in bad.stderr


@pytest.mark.slow
def test_generate_in_process(trained):
    from training.generate import generate

    manifest_path, _, out, _, _ = trained
    a = generate(out, manifest_path, n=2, length=16, seed=1)
    b = generate(out, manifest_path, n=2, length=16, seed=1)
    c = generate(out, manifest_path, n=2, length=16, seed=2)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]
    greedy = generate(out, manifest_path, n=2, length=16, temperature=0.0, seed=1)
    assert greedy[0].token_ids == greedy[1].token_ids  # argmax: no randomness left
    with pytest.raises(ConfigError, match="max_seq_len"):
        generate(out, manifest_path, n=1, length=65)


def test_tokenizer_checksum_is_enforced(tmp_path):
    from infra.contracts import load_manifest
    from training.data import load_tokenizer_json

    manifest_path, _ = write_text_corpus(str(tmp_path), n_docs=20)
    manifest = load_manifest(manifest_path)
    assert json.loads(load_tokenizer_json(manifest, str(tmp_path)))["model"]["type"] == "BPE"
    with open(tmp_path / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ContractError, match="sha256"):
        load_tokenizer_json(manifest, str(tmp_path))
