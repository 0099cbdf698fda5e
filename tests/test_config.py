"""Config loading, inheritance, overrides and the errors users see."""

import subprocess
import sys
import textwrap

import pytest

from mixtral_jax.config import ConfigError, load_config, parse_overrides


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "parent.yaml").write_text("model:\n  dim: 64\n  n_heads: 4\n  n_kv_heads: 2\n  head_dim: 16\ntrain:\n  steps: 7\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=1e-3", "model.sliding_window=null", "run.name=x"])
    assert cfg.model.dim == 64 and cfg.model.n_heads == 4  # from the parent
    assert cfg.train.steps == 9  # child wins over parent
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML-typed override
    assert cfg.model.sliding_window is None
    assert cfg.run.name == "x"


def test_mixtral_preset_inherits_mistral_trunk():
    cfg = load_config("configs/model/mixtral_8x7b.yaml")
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.hidden_dim) == (4096, 32, 14336)
    assert cfg.model.sliding_window is None and cfg.model.rope_theta == 1e6
    assert cfg.model.moe.num_experts == 8 and cfg.model.moe.top_k == 2


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.dimm=3", "unknown config key 'model.dimm'; did you mean 'model.dim'?"),
        ("trian.steps=3", "unknown config key 'trian'; did you mean 'train'?"),
        ("model.moe.topk=1", "did you mean 'model.moe.top_k'?"),
        ("optim.lr=fast", "config key 'optim.lr'"),
        ("model.n_kv_heads=3", "n_heads (4) must be a multiple of n_kv_heads (3)"),
        ("model.moe.top_k=9", "config key 'model.moe.top_k'"),
        ("data.seq_len=4096", "exceeds model.max_seq_len"),
        ("model.moe.router=top2", "'model.moe.router'"),
        ("optim.lr=-1", "config key 'optim.lr': must be positive"),
        ("model.sliding_window=0", "config key 'model.sliding_window'"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", [override])
    assert expected in str(err.value)


def test_dim_must_split_into_heads_when_head_dim_is_derived():
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        load_config("configs/quickstart.yaml", ["model.head_dim=null", "model.dim=130"])
    cfg = load_config("configs/quickstart.yaml", ["model.head_dim=null"])
    assert cfg.model.head_dim == cfg.model.dim // cfg.model.n_heads


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""
        base: quickstart.yaml
        optim:
          learning_rate: 0.1
    """))
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        load_config(path)


def test_unknown_key_inside_a_mixture_entry_names_its_index(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""
        base: quickstart.yaml
        data:
          mixture:
            - {name: a, source: python_source, weight: 1.0}
            - {name: b, source: python_source, wieght: 1.0}
    """))
    with pytest.raises(ConfigError, match=r"unknown config key 'data.mixture\[1\].wieght'; did you mean "
                                          r"'data.mixture\[1\].weight'\?"):
        load_config(path)


def test_parse_overrides_nests_and_types():
    assert parse_overrides(["a.b=1", "a.c=true", "d=null"]) == {"a": {"b": 1, "c": True}, "d": None}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_cli_reports_config_error_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "params", "--config", "quickstart", "model.dimm=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "did you mean 'model.dim'" in proc.stderr and "Traceback" not in proc.stderr


def test_expert_choice_rejects_loss_free_bias():
    with pytest.raises(ConfigError, match="model.moe.bias_update_rate"):
        load_config("configs/quickstart.yaml", ["model.moe.router=expert_choice", "model.moe.bias_update_rate=0.01"])


@pytest.mark.parametrize("name", ["pretrain/mistral_7b.yaml", "pretrain/mixtral_8x7b.yaml"])
def test_full_scale_pretrain_configs_validate(name):
    cfg = load_config(f"configs/{name}")
    assert cfg.data.seq_len == 4096 and cfg.model.dim == 4096
    if "mixtral" in name:
        assert cfg.model.moe.num_experts == 8 and cfg.mesh.expert == 8 and cfg.model.sliding_window is None
    else:
        assert cfg.model.sliding_window == 4096 and cfg.model.moe.num_experts == 0
