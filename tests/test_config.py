"""infra.config: YAML -> pydantic models, errors that name the key and the file, env and --set overrides."""

from __future__ import annotations

import textwrap

import pytest
from pydantic import SecretStr

from infra.config import (MaskmixConfig, StorageConfig, TrainConfig, WordCountFilterConfig, config_hash,
                          load_config, parse_config)
from infra.errors import ConfigError

ENV_NAMES = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MASKMIX_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
             "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

TRAIN_YAML = """\
train:
  manifest: data/manifest.json
  output_dir: ckpt
  steps: 50
"""


@pytest.fixture(autouse=True)
def no_override_env(monkeypatch):
    """Every test starts with none of the variables infra.config reads (a fixture may have set one)."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path, **kw) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path, **kw)
    return str(exc.value)


# --------------------------------------------------------------------------- loading


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg.ray.address is None
    assert cfg.ray.object_store_memory == 512 * 1024**2
    assert cfg.tracking.uri == "sqlite:///./mlflow.db"
    assert cfg.tracking.experiment == "maskmix"
    assert cfg.train is None and cfg.pipeline is None


def test_valid_file_loads_values_and_defaults(tmp_path):
    path = write(tmp_path, TRAIN_YAML + "  model:\n    preset: small\n    d_model: 96\n")
    cfg = load_config(path)
    assert isinstance(cfg.train, TrainConfig)
    assert cfg.train.steps == 50
    assert cfg.train.manifest == "data/manifest.json"
    assert cfg.train.model.preset == "small" and cfg.train.model.d_model == 96
    assert cfg.train.lr == pytest.approx(1e-3)  # default kept
    assert cfg.train.eval.mc_samples == 8


def test_empty_file_gives_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg == MaskmixConfig()


def test_unknown_key_names_key_path_and_file(tmp_path):
    path = write(tmp_path, TRAIN_YAML + "  lr_rate: 0.1\n")
    msg = config_error(path)
    assert str(path) in msg
    assert "train.lr_rate" in msg
    assert "unknown key" in msg


def test_unknown_top_level_section(tmp_path):
    msg = config_error(write(tmp_path, "trian:\n  steps: 3\n"))
    assert "trian: unknown key" in msg


def test_nested_unknown_key(tmp_path):
    path = write(tmp_path, """\
        pipeline:
          inputs: [{path: data/a.jsonl, domain: web}]
          output_dir: out
          near_dedup:
            bandz: 20
        """)
    msg = config_error(path)
    assert "pipeline.near_dedup.bandz" in msg and "unknown key" in msg
    assert str(path) in msg


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, TRAIN_YAML.replace("steps: 50", "steps: many"))
    msg = config_error(path)
    assert str(path) in msg
    assert "train.steps" in msg
    assert "integer" in msg
    assert "'many'" in msg


def test_out_of_range_value(tmp_path):
    msg = config_error(write(tmp_path, TRAIN_YAML + "  zero_stage: 4\n"))
    assert "train.zero_stage" in msg and "less than or equal to 3" in msg


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "train:\n  output_dir: ckpt\n")
    msg = config_error(path)
    assert "train.manifest: required key is missing" in msg
    assert "output_dir" not in msg.split("\n", 1)[1]  # only the missing key is reported


def test_all_errors_reported_at_once(tmp_path):
    path = write(tmp_path, "train:\n  output_dir: 3\n  stepz: 1\n  lr: -1\n")
    lines = config_error(path).splitlines()
    assert lines[0] == f"{path}: invalid configuration"
    body = "\n".join(lines[1:])
    for key in ("train.manifest", "train.stepz", "train.lr", "train.output_dir"):
        assert key in body
    assert len(lines) == 5


def test_error_in_list_item_names_index(tmp_path):
    path = write(tmp_path, """\
        pipeline:
          output_dir: out
          inputs:
            - {path: a.jsonl}
            - {path: b.jsonl, fromat: jsonl}
        """)
    assert "pipeline.inputs.1.fromat: unknown key" in config_error(path)


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "train:\n  steps: [1, 2\n")
    msg = config_error(path)
    assert msg.startswith(f"{path}: not valid YAML")


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    msg = config_error(write(tmp_path, text))
    assert msg == f"{tmp_path / 'cfg.yaml'}: top level must be a mapping of sections, got {kind}"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    assert config_error(path) == f"{path}: config file not found"


def test_word_count_filter_min_above_max(tmp_path):
    with pytest.raises(ValueError, match=r"min_words \(10\) > max_words \(5\)"):
        WordCountFilterConfig(min_words=10, max_words=5)
    assert WordCountFilterConfig(min_words=5, max_words=5).min_words == 5
    path = write(tmp_path, """\
        pipeline:
          inputs: [{path: a.jsonl}]
          output_dir: out
          word_count_filter: {min_words: 200, max_words: 100}
        """)
    msg = config_error(path)
    assert "pipeline.word_count_filter" in msg and "min_words (200) > max_words (100)" in msg


def test_validate_assignment_rejects_bad_value():
    cfg = WordCountFilterConfig()
    with pytest.raises(ValueError):
        cfg.min_words = -1
    assert cfg.min_words == 50


def test_near_dedup_num_perm(tmp_path):
    cfg = load_config(write(tmp_path, "pipeline:\n  inputs: [{path: a}]\n  output_dir: o\n  near_dedup: {bands: 9, rows: 13}\n"))
    assert cfg.pipeline.near_dedup.num_perm == 117
    assert MaskmixConfig.model_validate({"pipeline": {"inputs": [{"path": "a"}], "output_dir": "o"}}
                                        ).pipeline.near_dedup.num_perm == 112  # 14 x 8 default


# --------------------------------------------------------------------------- --set overrides


def test_set_overrides_parse_scalars_and_lists(tmp_path):
    path = write(tmp_path, TRAIN_YAML)
    cfg = load_config(path, overrides=[
        "train.steps=100",
        "train.lr=0.005",
        "train.model.tie_embeddings=false",
        "train.deepspeed={gradient_clipping: 2.0}",
        "ray.num_cpus=3",
        "tracking.experiment=exp one",
        "pipeline.inputs=[{path: a.jsonl, domain: web}]",
        "pipeline.output_dir=out",
        "pipeline.word_count_filter.skip_domains=[code, math]",
        "pipeline.exact_dedup=no",  # YAML 1.1 boolean
    ])
    assert cfg.train.steps == 100 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(0.005)
    assert cfg.train.model.tie_embeddings is False
    assert cfg.train.deepspeed == {"gradient_clipping": 2.0}
    assert cfg.train.manifest == "data/manifest.json"  # untouched keys stay
    assert cfg.ray.num_cpus == 3
    assert cfg.tracking.experiment == "exp one"
    assert cfg.pipeline.inputs[0].domain == "web"
    assert cfg.pipeline.word_count_filter.skip_domains == ["code", "math"]
    assert cfg.pipeline.exact_dedup is False


def test_set_value_may_contain_equals_sign():
    cfg = parse_config({}, overrides=["tracking.uri=http://host:5000/?a=b"], use_env=False)
    assert cfg.tracking.uri == "http://host:5000/?a=b"


def test_later_set_wins():
    cfg = parse_config({}, overrides=["ray.num_cpus=2", "ray.num_cpus=5"], use_env=False)
    assert cfg.ray.num_cpus == 5


def test_set_creates_a_section_declared_empty(tmp_path):
    # `eval:` with nothing under it is YAML null; a --set into it must not fail as "not a section".
    cfg = load_config(write(tmp_path, "eval:\n"), overrides=["eval.mc_samples=4"])
    assert cfg.eval.mc_samples == 4


def test_set_reaches_into_a_list_entry_by_index(tmp_path):
    path = write(tmp_path, "pipeline:\n  inputs: [{path: a}, {path: b}]\n  output_dir: out\n")
    cfg = load_config(path, overrides=["pipeline.inputs.1.path=s3://corpora/raw", "pipeline.inputs.0.domain=web"])
    assert [(i.path, i.domain) for i in cfg.pipeline.inputs] == [("a", "web"), ("s3://corpora/raw", None)]
    msg = config_error(path, overrides=["pipeline.inputs.2.path=x"])
    assert "pipeline.inputs has 2 entries, no index '2'" in msg


@pytest.mark.parametrize("assignment, fragment", [
    ("train.steps", "expected KEY=VALUE"),
    ("train..steps=3", "empty key segment"),
    ("=3", "empty key segment"),
    ("train.steps.x=1", "steps is not a section"),
])
def test_bad_set_syntax(tmp_path, assignment, fragment):
    msg = config_error(write(tmp_path, TRAIN_YAML), overrides=[assignment])
    assert fragment in msg
    assert repr(assignment) in msg


def test_set_unknown_key_is_reported_like_a_file_key(tmp_path):
    path = write(tmp_path, TRAIN_YAML)
    msg = config_error(path, overrides=["train.stepz=3"])
    assert "train.stepz: unknown key" in msg and str(path) in msg


def test_set_wrong_type(tmp_path):
    msg = config_error(write(tmp_path, TRAIN_YAML), overrides=["train.steps=[1,2]"])
    assert "train.steps" in msg and "[1, 2]" in msg


def test_parse_config_does_not_mutate_its_input():
    data = {"train": {"manifest": "m.json", "output_dir": "o"}, "ray": {"num_cpus": 1}}
    first = parse_config(data, overrides=["train.steps=7", "ray.num_cpus=2"], use_env=False)
    assert first.train.steps == 7
    assert data == {"train": {"manifest": "m.json", "output_dir": "o"}, "ray": {"num_cpus": 1}}
    second = parse_config(data, use_env=False)
    assert second.train.steps == 200 and second.ray.num_cpus == 1


# --------------------------------------------------------------------------- environment


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "sess-token-value")
    cfg = load_config(None)
    assert cfg.ray.address == "ray://head:10001"
    assert cfg.tracking.uri == "http://mlflow:5000"
    assert cfg.storage.endpoint_url == "http://minio:9000"
    assert cfg.storage.region == "eu-west-1"
    for field, value in [("access_key_id", "AKIAEXAMPLE"), ("secret_access_key", "s3cr3t-value"),
                         ("session_token", "sess-token-value")]:
        secret = getattr(cfg.storage, field)
        assert isinstance(secret, SecretStr)
        assert secret.get_secret_value() == value
        assert value not in repr(cfg) and value not in str(cfg.model_dump(mode="json"))


def test_endpoint_env_priority(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert load_config(None).storage.endpoint_url == "http://s3-specific:2"
    monkeypatch.setenv("MASKMIX_S3_ENDPOINT_URL", "http://ours:3")
    assert load_config(None).storage.endpoint_url == "http://ours:3"
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert load_config(None).storage.region == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert load_config(None).storage.region == "eu-central-1"


def test_empty_env_value_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "")
    path = write(tmp_path, "ray:\n  address: auto\n")
    assert load_config(path).ray.address == "auto"


def test_precedence_file_env_set(monkeypatch, tmp_path):
    path = write(tmp_path, "tracking:\n  uri: sqlite:///file.db\n  experiment: from-file\n"
                           "ray:\n  address: file:6379\n")
    assert load_config(path).tracking.uri == "sqlite:///file.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    monkeypatch.setenv("RAY_ADDRESS", "env:6379")
    cfg = load_config(path)
    assert cfg.tracking.uri == "http://env:5000"  # env beats file
    assert cfg.tracking.experiment == "from-file"  # the rest of the section stays
    assert cfg.ray.address == "env:6379"
    cfg = load_config(path, overrides=["tracking.uri=http://cli:5000"])
    assert cfg.tracking.uri == "http://cli:5000"  # --set beats env
    assert cfg.ray.address == "env:6379"
    assert load_config(path, use_env=False).tracking.uri == "sqlite:///file.db"


def test_env_into_malformed_section_reports_the_section(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "env:6379")
    msg = config_error(write(tmp_path, "ray: 5\n"))
    assert "ray:" in msg and "(got 5)" in msg


# --------------------------------------------------------------------------- hash and require


def test_config_hash_is_stable_and_value_sensitive(tmp_path):
    path = write(tmp_path, TRAIN_YAML)
    a, b = load_config(path).train, load_config(path).train
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    # key order in the file does not matter
    reordered = write(tmp_path, "train:\n  steps: 50\n  output_dir: ckpt\n  manifest: data/manifest.json\n", "b.yaml")
    assert config_hash(load_config(reordered).train) == config_hash(a)
    changed = load_config(path, overrides=["train.steps=51"]).train
    assert config_hash(changed) != config_hash(a)


def test_config_hash_ignores_secret_values():
    one = StorageConfig(endpoint_url="http://x:9000", access_key_id="AK1", secret_access_key="first-secret")
    two = StorageConfig(endpoint_url="http://x:9000", access_key_id="AK2", secret_access_key="other-secret")
    assert config_hash(one) == config_hash(two)
    assert config_hash(one) != config_hash(StorageConfig(endpoint_url="http://y:9000", access_key_id="AK1",
                                                         secret_access_key="first-secret"))


def test_config_hash_of_whole_config_ignores_env_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "value-one")
    h1 = config_hash(load_config(None))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "value-two")
    assert config_hash(load_config(None)) == h1


def test_require_returns_section_or_names_it():
    cfg = parse_config({"mix": {"manifest": "m.json", "output": "mix.json"}}, use_env=False)
    assert cfg.require("mix").manifest == "m.json"
    with pytest.raises(ConfigError) as exc:
        cfg.require("train", "configs/demo.yaml")
    assert str(exc.value) == "configs/demo.yaml: this command needs a 'train:' section"
    with pytest.raises(ConfigError, match=r"^config: this command needs a 'pipeline:' section$"):
        cfg.require("pipeline")
