from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows import config as flow_config
from flows.config import CONF_DIR, load_config
from mlops.config import ConfigError

# the groups each primary config lists (its defaults list): a flow validates only its own
GROUPS = {
    "build": ("data", "model", "train", "gate", "search", "env"),
    "deploy": ("serve", "deploy", "env"),
    "monitor": ("monitor", "env"),
    "traffic": ("serve", "deploy", "env"),
}
ROOT = Path(__file__).resolve().parents[1]


def group_options() -> list[tuple[str, str, str]]:
    return [
        (flow, group, p.stem) for flow, groups in GROUPS.items() for group in groups
        for p in sorted((CONF_DIR / group).glob("*.yaml"))
    ]


@pytest.mark.parametrize(("flow", "group", "option"), group_options())
def test_every_option_composes_and_validates(flow, group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path / "remote"))
    overrides = [f"paths.workspace={tmp_path}"]
    if group != "env":
        overrides.append(f"{group}={option}")
    if (group, option) == ("data", "imagefolder"):
        overrides.append(f"data.path={tmp_path}")
    config = load_config(flow, option if group == "env" else "test", overrides)
    assert config.environment == (option if group == "env" else "test")  # named after the env option
    assert config.paths.workspace == tmp_path.resolve()
    if group == "model":
        assert config.model.name == option


def test_each_flow_validates_only_its_own_sections(tmp_path):
    build, deploy, monitor = (load_config(flow, "test", [f"paths.workspace={tmp_path}"]) for flow in ("build", "deploy", "monitor"))
    assert {"data", "model", "train", "gate"} <= set(build.model_fields) and "serve" not in build.model_fields
    assert {"serve", "deploy", "action"} <= set(deploy.model_fields) and "train" not in deploy.model_fields
    assert "monitor" in monitor.model_fields and not {"data", "train", "serve"} & set(monitor.model_fields)
    assert build.paths == deploy.paths == monitor.paths  # the common sections agree


@pytest.mark.parametrize(("override", "message"), [
    ("traffic.drift=blurr", "traffic.drift: Input should be 'none', 'brightness', 'noise', 'blur', 'jpeg', 'rotation' or 'class_mix' (got 'blurr')"),
    ("traffic.drif=blur", "traffic.drif: not a key of the traffic config; did you mean `traffic.drift`?"),
    ("traffic.requests=0", "traffic.requests: Input should be greater than or equal to 1 (got 0)"),
    ("traffic.feedback=2", "traffic.feedback: Input should be less than or equal to 1"),
])
def test_a_bad_replay_option_is_a_config_error_naming_it(override, message):
    with pytest.raises(ConfigError) as error:
        load_config("traffic", "test", [override])
    assert message in str(error.value)


def test_the_replay_defaults_send_each_test_image_once_without_feedback():
    options = load_config("traffic", "test", []).traffic
    assert (options.drift, options.requests, options.feedback) == ("none", None, 0.0)


@pytest.mark.parametrize("flow", list(GROUPS))
def test_an_unknown_key_in_any_flow_names_the_key(flow):
    with pytest.raises(ConfigError, match=r"mlflow\.tracking_urii"):
        load_config(flow, "test", ["+mlflow.tracking_urii=x"])
    with pytest.raises(ConfigError, match=r"mlflow\.tracking_urii"):
        load_config(flow, "test", ["mlflow.tracking_urii=x"])


@pytest.mark.slow  # starts processes: kept out of the fast tier
def test_deploy_and_monitor_validate_without_torchvision_or_a_data_path(tmp_path):
    """Loading and validating their configs (the data=imagefolder path unset) imports no torch."""
    code = (
        "import sys\n"
        "import flows.deploy, flows.monitor\n"
        "from flows.config import load_config\n"
        f"load_config('deploy', 'test', ['paths.workspace={tmp_path}'])\n"
        f"load_config('monitor', 'test', ['paths.workspace={tmp_path}'])\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'pytorch_lightning') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_an_old_key_names_its_new_name(conf_copy):
    with pytest.raises(ConfigError, match=r"thresholds\.min_accuracy: renamed to gate\.min_accuracy"):
        load_config("build", "test", ["thresholds.min_accuracy=0.3"])
    with pytest.raises(ConfigError, match=r"deploy\.mode: renamed to action"):
        load_config("deploy", "test", ["deploy.mode=release"])
    with pytest.raises(ConfigError, match=r"serve\.records\.dir: renamed to records\.dir"):
        load_config("deploy", "test", ["serve.records.dir=/tmp/x"])
    path = conf_copy / "gate" / "default.yaml"  # an old key in a user's own YAML
    path.write_text(path.read_text() + "application:\n  min_accuracy: 0.5\n")
    with pytest.raises(ConfigError, match=r"gate\.application: not a key of this config"):
        load_config("build", "test", [])
    path = conf_copy / "monitor" / "default.yaml"
    path.write_text(path.read_text() + "state_dir: /tmp/x\n")
    with pytest.raises(ConfigError, match=r"monitor\.state_dir: renamed to paths\.monitor"):
        load_config("monitor", "test", [])


def test_one_deploy_switch_and_each_environment_says_what_it_may_do(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path))
    assert load_config("deploy", "test", []).action == "validate"
    assert load_config("deploy", "production", []).action == "release"
    assert load_config("deploy", "production", ["action=rollback"]).action == "rollback"
    with pytest.raises(ConfigError, match=r"action: .*'rollback' is not an action of environment 'test'"):
        load_config("deploy", "test", ["action=rollback"])  # used to validate the candidate silently
    with pytest.raises(ConfigError, match=r"action: .*'validate' is not an action of environment 'production'"):
        load_config("deploy", "production", ["action=validate"])


def test_test_env_is_small_and_keeps_every_store_under_the_workspace(tmp_path, monkeypatch):
    config = load_config("build", "test", [f"paths.workspace={tmp_path}"])
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.dvc.remote == f"{tmp_path}/dvc-remote"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", "s3://bucket/dvc")
    production = load_config("build", "production", [])
    assert config.train.max_epochs < production.train.max_epochs
    assert config.data.max_per_class is not None and production.data.max_per_class is None


def test_production_takes_services_from_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("DVC_REMOTE_URL", "s3://bucket/dvc")
    config = load_config("build", "production", [f"paths.workspace={tmp_path}"])
    assert config.mlflow.tracking_uri == "http://127.0.0.1:5999"
    assert config.dvc.remote == "s3://bucket/dvc"


def test_production_without_its_variables_names_the_key(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=r"mlflow\.tracking_uri:.*MLFLOW_TRACKING_URI"):
        load_config("build", "production", [])


def test_wrong_type_on_the_command_line_names_the_key():
    with pytest.raises(ConfigError) as caught:
        load_config("build", "test", ["train.max_epochs=abc", "data.val_fraction=0.9"])
    problems = "\n".join(caught.value.problems)
    assert "train.max_epochs: Input should be a valid integer" in problems
    assert "data.val_fraction: Input should be less than 0.5" in problems


def test_unknown_model_name_is_refused():
    with pytest.raises(ConfigError, match=r"model\.name: .*'resnet1800' is not in torchvision's model registry"):
        load_config("build", "test", ["model.name=resnet1800"])


def test_misspelled_key_on_the_command_line_names_the_key():
    with pytest.raises(ConfigError, match=r"gate\.min_acuracy"):
        load_config("build", "test", ["gate.min_acuracy=0.3"])


@pytest.mark.parametrize(("flow", "override", "problem"), [
    ("build", "train.max_epoch=3", "train.max_epoch: not a key of the build config; did you mean `train.max_epochs`?"),
    ("build", "modle=resnet18", "modle: not a key of the build config; did you mean `model`?"),
    ("build", "model=resnet181", "model=resnet181: no such option in conf/model/ (mobilenet_v3_small, resnet18);"
                                 " did you mean `model=resnet18`?"),
    ("build", "data.holdout.shre=0.2", "data.holdout.shre: not a key of the build config; did you mean `data.holdout.share`?"),
    ("monitor", "monitor.windw=2h", "monitor.windw: not a key of the monitor config; did you mean `monitor.window`?"),
    ("deploy", "deploy=kubernets", "deploy=kubernets: no such option in conf/deploy/ (kubernetes, local); did you mean `deploy=kubernetes`?"),
    ("monitor", "train.max_epochs=3", "train.max_epochs: not a key of the monitor config"),  # nothing close: no guess
])
def test_a_mistyped_key_or_option_gets_the_closest_name(flow, override, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(flow, "test", [override])
    assert caught.value.problems == [problem]


def test_keys_under_a_free_mapping_and_sweeps_of_known_options_pass_the_check():
    flow_config.check_overrides("monitor", ["monitor.drift.features.brightness.threshold=0.1", "+extra=1", "hydra.job.chdir=false"])
    flow_config.check_overrides("build", ["model=resnet18,mobilenet_v3_small", "train.max_epochs=choice(1,2)"])


@pytest.fixture
def conf_copy(tmp_path, monkeypatch) -> Path:
    copy = tmp_path / "conf"
    shutil.copytree(CONF_DIR, copy)
    monkeypatch.setattr(flow_config, "CONF_DIR", copy)
    return copy


def test_misspelled_key_in_a_yaml_file_names_the_key(conf_copy):
    path = conf_copy / "gate" / "default.yaml"
    path.write_text(path.read_text().replace("min_accuracy:", "min_acuracy:"))
    with pytest.raises(ConfigError) as caught:
        load_config("build", "test", [])
    problems = caught.value.problems
    assert "gate.min_acuracy: not a key of this config; did you mean `gate.min_accuracy`?" in problems


def test_wrong_type_in_a_yaml_file_names_the_key(conf_copy):
    path = conf_copy / "train" / "default.yaml"
    path.write_text(path.read_text().replace("optimizer: adamw", "optimizer: adamx"))
    with pytest.raises(ConfigError, match=r"train\.optimizer: Input should be 'adam', 'adamw' or 'sgd'"):
        load_config("build", "test", [])


def run_cli(*args: str, workspace: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"MLOPS_WORKSPACE": str(workspace)}
    return subprocess.run(
        [sys.executable, "-m", "flows.build", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # starts processes: kept out of the fast tier
def test_cli_rejects_a_bad_value_with_the_key_and_no_traceback(tmp_path):
    result = run_cli("train.max_epochs=abc", workspace=tmp_path)
    assert result.returncode == 2
    assert "train.max_epochs: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing ran


@pytest.mark.slow  # starts processes: kept out of the fast tier
def test_a_user_error_ends_in_one_clear_line_without_tracebacks(tmp_path):
    result = run_cli("data=imagefolder", f"data.path={tmp_path / 'nope'}", workspace=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if "temporary server" not in line]  # Prefect's own
    assert lines[-2].startswith("error: DataError: data.path ") and "nope" in lines[-2], lines[-3:]
    assert lines[-1].strip() == "is not a directory", lines[-3:]  # the error and its problem line, last
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # it stays in the Prefect run's logs


@pytest.mark.slow  # starts processes: kept out of the fast tier
@pytest.mark.parametrize(("override", "suggestion"), [("train.max_epoch=3", "`train.max_epochs`"), ("modle=resnet18", "`model`")])
def test_cli_names_a_mistyped_key_with_a_suggestion_and_exits_2(tmp_path, override, suggestion):
    result = run_cli(override, workspace=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"did you mean {suggestion}?" in result.stderr and "Traceback" not in result.stderr
    assert "not in struct" not in result.stderr  # Hydra's own message is not what the user sees


@pytest.mark.slow  # starts processes: kept out of the fast tier
def test_cli_prints_the_production_config_without_running(tmp_path):
    result = run_cli("--cfg", "job", "env=production", workspace=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tracking_uri: ${oc.env:MLFLOW_TRACKING_URI}" in result.stdout
    assert "workspace: ${oc.env:MLOPS_WORKSPACE,/var/lib/mlops}" in result.stdout  # the production overlay
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_and_a_model_added_by_yaml_alone(conf_copy, tmp_path):
    """The README's recipes: a new data option extending imagefolder, a new model option."""
    (conf_copy / "data" / "pets.yaml").write_text(
        "defaults: [imagefolder]\n"
        f"name: pets\npath: {tmp_path}\ninput_size: 160\n"
        "validation:\n  policy: quarantine\n  max_class_imbalance: 1.5\n"
    )
    (conf_copy / "model" / "efficientnet_b0.yaml").write_text("name: efficientnet_b0\nweights_path: null\n")
    config = load_config("build", "test", ["data=pets", "model=efficientnet_b0"])
    assert (config.data.name, config.data.path, config.data.input_size) == ("pets", tmp_path, 160)
    assert config.data.validation.max_class_imbalance == 1.5
    assert config.data.validation.min_image_size == 32  # inherited from imagefolder
    assert config.data.max_per_class == 40  # the test overlay still applies
    assert config.model.name == "efficientnet_b0"


def test_production_scales_out_by_configuration(monkeypatch, tmp_path):
    """DDP over GPUs and nodes, a tracking server and an object-store DVC remote: all config."""
    from mlops.train.training import trainer_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow@db.internal/mlflow")
    monkeypatch.setenv("DVC_REMOTE_URL", "s3://datasets/dvc")
    monkeypatch.setenv("MLOPS_NUM_NODES", "4")
    config = load_config("build", "production", ["train=ddp", f"paths.workspace={tmp_path}"])
    settings = trainer_settings(config)
    assert (settings["strategy"], settings["num_nodes"], settings["accelerator"]) == ("ddp_spawn", 4, "gpu")
    assert settings["precision"] == "16-mixed" and config.train.learning_rate == 1e-3  # the rest from default
    assert config.mlflow.tracking_uri.startswith("postgresql://") and config.dvc.remote.startswith("s3://")
    deploy = load_config("deploy", "production", [f"paths.workspace={tmp_path}"])
    assert deploy.serve.token_env == "MLOPS_API_TOKEN" and deploy.action == "release"


def test_overrides_reach_the_flows_that_have_their_keys():
    from flows.config import overrides_for

    given = ["paths.workspace=/w", "model=mobilenet_v3_small", "gate.min_accuracy=0.3", "serve.port=9",
             "monitor.window=2h", "+mlflow.x=1"]
    assert overrides_for("build", given) == ["paths.workspace=/w", "model=mobilenet_v3_small", "gate.min_accuracy=0.3", "+mlflow.x=1"]
    assert overrides_for("deploy", given) == ["paths.workspace=/w", "serve.port=9", "+mlflow.x=1"]
    assert overrides_for("monitor", given) == ["paths.workspace=/w", "monitor.window=2h", "+mlflow.x=1"]


def test_the_old_server_command_names_the_new_one():
    result = subprocess.run([sys.executable, "-m", "mlops.serving", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "python -m mlops.serve" in result.stderr
