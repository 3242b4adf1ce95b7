from pathlib import Path

import pytest

from hetray.config import ConfigError, JobConfig, load_config

from conftest import ROOT

# every job file; runtime_env.yaml is Ray's, not a job (tests/test_cluster.py checks it)
JOBS = sorted(p for p in (ROOT / "jobs").rglob("*.yaml") if p.name != "runtime_env.yaml")

MINIMAL = """
name: t
run_dir: {run_dir}
convert:
  sources:
    - name: wg
      format: winogrande
      path: sample:winogrande.jsonl
"""


def test_jobs_folder_has_yaml():
    assert any(p.name == "quickstart.yaml" for p in JOBS)


@pytest.mark.parametrize("path", JOBS, ids=[str(p.relative_to(ROOT)) for p in JOBS])
def test_every_job_yaml_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{path} must open with a comment giving its command"


def _write(tmp_path, text) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named_with_file(tmp_path):
    p = _write(tmp_path, MINIMAL.format(run_dir=tmp_path) + "  bogus_knob: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "unknown key 'convert.bogus_knob'" in str(e.value)
    assert str(p) in str(e.value)


def test_unknown_key_inside_a_source(tmp_path):
    p = _write(tmp_path, MINIMAL.format(run_dir=tmp_path) + "      lable: toxicity\n")
    with pytest.raises(ConfigError, match=r"unknown key 'convert.sources\[0\].lable'"):
        load_config(p)


def test_unknown_format(tmp_path):
    p = _write(tmp_path, MINIMAL.format(run_dir=tmp_path).replace("format: winogrande", "format: nope"))
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(p)


def test_dotted_overrides(tmp_path):
    p = _write(tmp_path, MINIMAL.format(run_dir=tmp_path))
    cfg = load_config(p, ["seed=7", "convert.batch_size=16", "convert.sources.0.limit=3", "ray.num_cpus=1"])
    assert (cfg.seed, cfg.convert.batch_size, cfg.convert.sources[0].limit, cfg.ray.num_cpus) == (7, 16, 3, 1)


def test_bad_override_value_and_path(tmp_path):
    p = _write(tmp_path, MINIMAL.format(run_dir=tmp_path))
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(p, ["convert.batch_size=zero"])
    with pytest.raises(ConfigError, match="has no item 5"):
        load_config(p, ["convert.sources.5.limit=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(p, ["seed"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,\n"))


def test_unknown_key_in_a_section_named_like_a_source_format(tmp_path):
    p = _write(tmp_path, MINIMAL.format(run_dir=tmp_path) + "eval:\n  winogrande:\n    limt: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.winogrande\.limt'"):
        load_config(p)
