"""Typed service settings: strict types, unknown keys refused, errors naming key + value + source, secrets in files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonescreen.service.config import ServiceConfig, ServiceConfigError, read_secret_file


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "svc.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("line, key, shown", [
    ('allow_any_ae: "false"', "allow_any_ae", "'false'"),  # a string is not a bool (it was truthy before)
    ('dicom_port: "11112x"', "dicom_port", "'11112x'"),
    ("dicom_port: 70000", "dicom_port", "70000"),
    ("allowed_aes: PACS1", "allowed_aes", "'PACS1'"),  # refused, not split into P, A, C, S, 1
    ("allowed_aes: [THIS_AE_TITLE_IS_TOO_LONG]", "allowed_aes.0", "'THIS_AE_TITLE_IS_TOO_LONG'"),
    ("backend: tensorrt", "backend", "'tensorrt'"),
    ("batch_size: 0", "batch_size", "0"),
    ("max_upload_mb: -1", "max_upload_mb", "-1"),
    ("threshold: 1.5", "threshold", "1.5"),
    ("forward_cstore: PACS-at-host", "forward_cstore", "'PACS-at-host'"),
    ("forward_stow_url: ftp://pacs", "forward_stow_url", "'ftp://pacs'"),
    ("token_role: root", "token_role", "'root'"),
    ("http_port: 80.5", "http_port", "80.5"),
])
def test_yaml_types_are_strict_and_errors_name_key_and_value(tmp_path: Path, line: str, key: str, shown: str) -> None:
    p = _yaml(tmp_path, f"model: m.pt\n{line}\n")
    with pytest.raises(ServiceConfigError) as err:
        ServiceConfig.load(p)
    msg = str(err.value)
    assert str(p) in msg and f"{key}:" in msg and f"got {shown}" in msg, msg


def test_unknown_keys_and_non_mappings_refused(tmp_path: Path) -> None:
    with pytest.raises(ServiceConfigError, match="unknown service config key.*allowed_ae"):
        ServiceConfig.load(_yaml(tmp_path, "allowed_ae: [X]\n"))
    with pytest.raises(ServiceConfigError, match="expected a mapping"):
        ServiceConfig.load(_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(ServiceConfigError, match="not valid YAML"):
        ServiceConfig.load(_yaml(tmp_path, "a: [\n"))
    with pytest.raises(ServiceConfigError, match="gate: unknown key"):
        ServiceConfig(model="m", dicom_enabled=False, gate={"min_agee": 50}).validate()


def test_yaml_values_of_the_right_type_load(tmp_path: Path) -> None:
    cfg = ServiceConfig.load(_yaml(tmp_path, "model: m.pt\nallow_any_ae: false\nallowed_aes: [PACS1, CR2]\n"
                                             "dicom_port: 11112\nmax_upload_mb: 10\ngate: {min_age: 50}\n"))
    assert cfg.allow_any_ae is False and cfg.allowed_aes == ["PACS1", "CR2"] and cfg.dicom_port == 11112
    assert cfg.max_upload_mb == 10.0 and cfg.gate == {"min_age": 50}
    cfg.validate()


def test_environment_variables_are_parsed_text_and_sit_between_yaml_and_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _yaml(tmp_path, "model: m.pt\nhttp_port: 8000\nallow_any_ae: true\n")
    monkeypatch.setenv("BONESCREEN_SERVE__HTTP_PORT", "9000")
    monkeypatch.setenv("BONESCREEN_SERVE__ALLOW_ANY_AE", "false")  # text: parsed as the bool False
    monkeypatch.setenv("BONESCREEN_SERVE__ALLOWED_AES", '["PACS1"]')  # lists as JSON
    cfg = ServiceConfig.load(p)
    assert (cfg.http_port, cfg.allow_any_ae, cfg.allowed_aes) == (9000, False, ["PACS1"])
    assert ServiceConfig.load(p, http_port=7000).http_port == 7000  # a flag wins
    monkeypatch.setenv("BONESCREEN_SERVE__DICOM_PORT", "11112x")
    with pytest.raises(ServiceConfigError, match=r"dicom_port: .*got '11112x', from \$BONESCREEN_SERVE__DICOM_PORT"):
        ServiceConfig.load(p)
    monkeypatch.delenv("BONESCREEN_SERVE__DICOM_PORT")
    monkeypatch.setenv("BONESCREEN_SERVE__NO_SUCH_KEY", "1")  # not a field: ignored (other tools share the prefix?)
    ServiceConfig.load(p)


def test_secrets_never_in_repr_or_errors(tmp_path: Path) -> None:
    pw = tmp_path / "dbpw"
    pw.write_text("hunter2-db\n")
    pw.chmod(0o600)
    cfg = ServiceConfig(model="m", db_url="postgresql://svc@db.example/bs", db_password_file=str(pw))
    assert "hunter2-db" in cfg.database_url and "hunter2-db" not in repr(cfg) and "hunter2-db" not in str(cfg)
    inline = ServiceConfig(model="m", db_url="postgresql://svc:inline-pw@db/bs")
    assert "inline-pw" not in repr(inline) and "inline-pw" not in str(inline.public_dict())
    assert inline.database_url_masked == "postgresql://svc:***@db/bs"
    with pytest.raises(ServiceConfigError) as err:
        ServiceConfig(db_url=12345)  # type: ignore[arg-type]
    assert "(hidden)" in str(err.value) and "12345" not in str(err.value)


def test_secret_files_refused_when_missing_empty_or_world_readable(tmp_path: Path) -> None:
    f = tmp_path / "token"
    with pytest.raises(ServiceConfigError, match="not found"):
        read_secret_file(f, "token_file")
    f.write_text("  \n")
    f.chmod(0o600)
    with pytest.raises(ServiceConfigError, match="empty"):
        read_secret_file(f, "token_file")
    f.write_text("s3cret\n")
    f.chmod(0o644)
    with pytest.raises(ServiceConfigError, match="chmod 600"):
        read_secret_file(f, "token_file")
    f.chmod(0o600)
    assert read_secret_file(f, "token_file") == "s3cret"


def test_serve_takes_no_secret_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from bonescreen.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--token", "s3cret"])
    assert "unrecognized arguments: --token" in capsys.readouterr().err
    helptext = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert "--token-file" in helptext and "--stow-token" not in helptext
