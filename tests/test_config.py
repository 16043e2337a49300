"""The configuration model: flags > FHIRCRYPT_* environment > config file > defaults; secrets only from
files or the environment; ``fhircrypt config show`` tells each value's source and never prints a secret."""

from __future__ import annotations

import pytest

from proxy.cli import _parser
from proxy.keyflags import provider_config
from proxy.keymgmt.providers import SETTINGS as PROVIDER_SETTINGS
from proxy.optionflags import resolve_args
from proxy.settings import BY_NAME, OPTIONS, ConfigError, Value, resolve
from tests.test_cli_tls import run_cli


def test_flags_beat_the_environment_which_beats_the_file_which_beats_the_defaults(tmp_path):
    config = tmp_path / "fhircrypt.yaml"
    config.write_text("upstream: https://file.example/fhir\nworkers: 3\nmax_body: 1000\npolicy: p.yaml\n")
    env = {"FHIRCRYPT_WORKERS": "5", "FHIRCRYPT_MAX_BODY": "2000"}
    resolved = resolve({"workers": "7"}, env, str(config))
    assert resolved.values["workers"].value == 7 and resolved.values["workers"].source == "flag --workers"
    assert resolved.values["max_body"].value == 2000 and resolved.values["max_body"].source == "env FHIRCRYPT_MAX_BODY"
    assert resolved.values["upstream"].source == f"file {config}"
    assert resolved.values["upstream_timeout"].value == 30.0 and resolved.values["upstream_timeout"].source == "default"
    assert resolved["policy"] == str(tmp_path / "p.yaml")  # relative to the config file, not the cwd
    settings = resolved.settings()
    assert settings.workers == 7 and settings.upstream == "https://file.example/fhir"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)


def test_the_config_file_comes_from_the_environment_too(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("listen: 0.0.0.0:9443\nvalidate: false\n")
    settings = resolve({}, {"FHIRCRYPT_CONFIG": str(config)}).settings()
    assert (settings.host, settings.port, settings.validate) == ("0.0.0.0", 9443, "off")


@pytest.mark.parametrize(
    ("written", "mode"),
    [("true", "full"), ("false", "off"), ("yes", "full"), ("structure", "structure"), ("Full", "full"), ("off", "off")],
)
def test_validate_takes_a_mode_and_the_old_booleans_keep_their_meaning(tmp_path, written, mode):
    config = tmp_path / "c.yaml"
    config.write_text(f"validate: {written}\n")
    assert resolve({}, {}, str(config)).settings().validate == mode
    assert resolve({}, {"FHIRCRYPT_VALIDATE": written}).settings().validate == mode
    assert resolve({}, {}).settings().validate == "structure"


@pytest.mark.parametrize(
    "text, message",
    [
        ("introspection_secret: hunter2\n", "secrets are never written into the config file"),
        ("kek: 00ff\n", "kek: secrets are never written"),
        ("upstrem: x\n", "upstrem: unknown option"),
        ("workers: many\n", "workers (file"),
        ("auth: maybe\n", "use one of jwt, none"),
        ("validate: partly\n", "validate (file"),
        ("- a list\n", "must be a mapping"),
        ("a: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_files_are_refused_with_the_option_named(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")) as err:
        resolve({}, {}, str(config))
    assert "hunter2" not in str(err.value)


def test_secrets_come_from_files_or_the_environment_and_have_no_flags(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"introspection_secret_file: {secret.name}\n")
    assert resolve({}, {}, str(config))["introspection_secret"] == "s3cr3t-value"
    env = {"FHIRCRYPT_AUDIT_FHIR_TOKEN_FILE": str(secret), "FHIRCRYPT_INTROSPECTION_SECRET": "from-env"}
    resolved = resolve({}, env, str(config))
    assert resolved["audit_fhir_token"] == "s3cr3t-value" and resolved["introspection_secret"] == "from-env"
    secrets = {o.name for o in OPTIONS if o.secret}
    assert secrets == {"introspection_secret", "audit_fhir_token", "upstream_token", "upstream_client_secret"}
    out = run_cli("serve", "--introspection-secret", "x")
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
    flagged = resolve({"upstream_token_file": str(secret)}, {"FHIRCRYPT_UPSTREAM_TOKEN": "from-env"})
    assert flagged["upstream_token"] == "s3cr3t-value"  # --upstream-token-file: a path on the command line
    assert flagged.values["upstream_token"].source == "flag --upstream-token-file"


def test_config_show_prints_sources_and_redacts_secrets(tmp_path):
    config = tmp_path / "c.yaml"
    secret = tmp_path / "token"
    secret.write_text("tok-9f8e7d6c5b4a\n")
    config.write_text(f"upstream: https://fhir.example/R4\npolicy: policy.yaml\naudit_fhir_token_file: {secret}\n")
    kek = "a" * 64
    out = run_cli(
        "config",
        "show",
        "--config",
        str(config),
        "--workers",
        "4",
        env={"FHIRCRYPT_KEK": kek, "FHIRCRYPT_LOG_LEVEL": "debug", "FHIRCRYPT_INTROSPECTION_SECRET": "p4ss-w0rd"},
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if not line.startswith("#")}
    assert "[flag --workers]" in rows["workers"] and " 4 " in rows["workers"]
    assert "[env FHIRCRYPT_LOG_LEVEL]" in rows["log_level"]
    assert f"[file {config}]" in rows["upstream"]
    assert "(set, redacted)" in rows["audit_fhir_token"] and "(set, redacted)" in rows["introspection_secret"]
    assert "[env FHIRCRYPT_KEK (redacted)]" in rows["kek"]
    assert "[default]" in rows["upstream_timeout"]
    for value in (kek, "tok-9f8e7d6c5b4a", "p4ss-w0rd"):
        assert value not in out.stdout + out.stderr
    assert set(rows) == {o.name for o in OPTIONS} | {"kek"}


URL_OPTIONS = (
    "upstream",
    "public_base_url",
    "oidc_issuer",
    "jwks_url",
    "introspection_url",
    "audit_fhir",
    "aws_kms_endpoint",
    "vault_addr",
)


@pytest.mark.parametrize("name", URL_OPTIONS)
@pytest.mark.parametrize(
    "url, message",
    [
        ("127.0.0.1:8103/fhir/R4", "absolute http:// or https:// URL"),
        ("ftp://files.example/fhir", "absolute http:// or https:// URL"),
        ("http:///fhir/R4", "no host"),
        ("http://fhir.example:99999/R4", "port must be a number from 1 to 65535"),
        ("http://fhir.example:http/R4", "port must be a number from 1 to 65535"),
        ("https://user:s3cret@fhir.example/R4", "credentials do not belong in a URL"),
    ],
)
def test_every_url_option_is_checked_at_start_up_and_named(name, url, message):
    env = "FHIRCRYPT_" + name.upper()
    with pytest.raises(ConfigError, match=f"^{name} \\(env {env}\\): .*{message}") as err:
        resolve({}, {env: url})
    assert "s3cret" not in str(err.value)
    assert resolve({}, {env: "https://fhir.example:8443/R4"})[name] == "https://fhir.example:8443/R4"


def test_serve_and_the_operator_tools_refuse_an_upstream_without_a_scheme():
    served = run_cli("serve", "--upstream", "127.0.0.1:8103/fhir/R4", "--policy", "policies/satusehat.yaml")
    assert served.returncode == 2 and served.stderr.strip() == (
        "error: upstream (flag --upstream): use an absolute http:// or https:// URL"
    )
    for command in (["keys", "retire", "k1"], ["reencrypt", "--policy", "policies/satusehat.yaml"]):
        out = run_cli(*command, "--upstream", "127.0.0.1:8103/fhir/R4")
        assert out.returncode == 2 and out.stderr.strip() == served.stderr.strip()  # one model, one message
    vault = run_cli("keys", "list", "--key-provider", "vault", "--vault-addr", "vault:8200")
    assert vault.returncode == 2 and "error: vault_addr (flag --vault-addr): use an absolute" in vault.stderr


def test_config_show_with_nothing_set_names_the_required_options_and_exits_2():
    out = run_cli("config", "show", env={"FHIRCRYPT_UPSTREAM": "", "FHIRCRYPT_POLICY": "", "FHIRCRYPT_CONFIG": ""})
    assert out.returncode == 2
    assert out.stderr.startswith("error: upstream and policy are required (--upstream, FHIRCRYPT_UPSTREAM or")
    assert out.stdout.splitlines()[1].split() == ["upstream", "-", "[default]"]  # the table is still shown
    only_policy = run_cli("config", "show", "--upstream", "https://fhir.example/R4")
    assert only_policy.returncode == 2 and "error: policy is required" in only_policy.stderr


def test_serve_help_shows_each_default_and_environment_variable():
    out = run_cli("serve", "--help")
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert out.returncode == 0
    for fragment in (
        "--upstream UPSTREAM FHIR base URL of the upstream server [required; env FHIRCRYPT_UPSTREAM]",
        "[default 127.0.0.1:8080; env FHIRCRYPT_LISTEN]",
        "[default 25.0; env FHIRCRYPT_SHUTDOWN_TIMEOUT]",
        "[default jwt; env FHIRCRYPT_AUTH]",
        "[default structure; env FHIRCRYPT_VALIDATE]",
    ):
        assert fragment in text, fragment


# Every command that takes the key-provider options, as an operator would type it; each gets its flags
# from the one options table and resolves them through the one function.
KEY_COMMANDS = (
    ["serve"],
    ["config", "show"],
    ["keys", "init"],
    ["keys", "list"],
    ["keys", "rotate"],
    ["keys", "rewrap"],
    ["keys", "backup", "--out", "b.json"],
    ["keys", "restore", "--from", "b.json"],
    ["keys", "retire", "k1"],
    ["reencrypt"],
    ["shred", "Patient/p1"],
    ["shred", "hold", "list"],
)


@pytest.mark.parametrize("command", KEY_COMMANDS, ids=" ".join)
def test_every_command_resolves_key_provider_options_with_the_same_precedence(command, tmp_path):
    config = tmp_path / "fhircrypt.yaml"
    config.write_text("keyring: ring.json\nkek_file: from-file.kek\nvault_key: file-key\nvault_mount: file-mount\n")
    env = {"FHIRCRYPT_VAULT_KEY": "env-key", "FHIRCRYPT_VAULT_MOUNT": "env-mount"}
    args = _parser().parse_args([*command, "--config", str(config), "--vault-mount", "flag-mount"])
    resolved = resolve_args(args, environ=env)
    assert resolved["keyring"] == str(tmp_path / "ring.json")  # relative to the config file, for every command
    assert resolved["kek_file"] == str(tmp_path / "from-file.kek")
    assert resolved.values["vault_key"] == Value("env-key", "env FHIRCRYPT_VAULT_KEY")
    assert resolved.values["vault_mount"] == Value("flag-mount", "flag --vault-mount")
    assert resolved.values["key_provider"] == Value("local", "default")
    assert provider_config(resolved.settings()) == {"type": "local", "kek_file": str(tmp_path / "from-file.kek")}


@pytest.mark.parametrize("command", [["reencrypt"], ["coverage"], ["keys", "retire", "k1"]], ids=" ".join)
def test_the_operator_tools_read_the_upstream_and_its_token_like_serve(command, tmp_path):
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"upstream: https://file.example/fhir/\nupstream_token_file: {token.name}\npolicy: p.yaml\n")
    for argv in (command, ["serve"]):
        resolved = resolve_args(_parser().parse_args([*argv, "--config", str(config)]), environ={})
        assert resolved["upstream"] == "https://file.example/fhir"
        assert resolved.values["upstream_token"] == Value("tok-123", f"file {config} (upstream_token_file)")
        assert resolved["policy"] == (None if argv[0] == "keys" else str(tmp_path / "p.yaml"))  # retire takes none


def test_rewrap_target_takes_the_same_options_under_to_from_flags_and_env_only(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("key_provider: vault\nvault_addr: https://vault.example:8200\nvault_key: source\n")
    argv = ["keys", "rewrap", "--config", str(config), "--to-key-provider", "vault", "--to-vault-key", "target"]
    env = {"FHIRCRYPT_TO_VAULT_ADDR": "https://vault-2.example:8200", "FHIRCRYPT_VAULT_MOUNT": "m"}
    args = _parser().parse_args(argv)
    source = provider_config(resolve_args(args, environ=env).settings())
    target = provider_config(resolve_args(args, "to-", environ=env).settings())
    assert source == {"type": "vault", "address": "https://vault.example:8200", "key": "source", "mount": "m"}
    assert target == {"type": "vault", "address": "https://vault-2.example:8200", "key": "target"}
    bad = run_cli("keys", "rewrap", "--to-key-provider", "vault", "--to-vault-addr", "vault:8200")
    assert bad.returncode == 2 and "error: to_vault_addr (flag --to-vault-addr): use an absolute" in bad.stderr


def test_each_provider_setting_is_declared_by_exactly_one_option():
    declared = sorted(o.provider for o in OPTIONS if o.provider is not None)
    assert declared == sorted((kind, name) for kind, names in PROVIDER_SETTINGS.items() for name in names)
    assert BY_NAME["key_provider"].choices == tuple(PROVIDER_SETTINGS)


def test_a_keyring_and_kek_named_in_the_config_file_serve_the_keys_commands(tmp_path):
    config = tmp_path / "fhircrypt.yaml"
    config.write_text("keyring: ring.json\nkek_file: kek\n")
    env = {"FHIRCRYPT_CONFIG": str(config)}
    created = run_cli("keys", "init", "--generate-kek", str(tmp_path / "kek"), env=env)
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "ring.json").exists()
    assert run_cli("keys", "rotate", env=env).returncode == 0
    assert run_cli("keys", "list", env=env).stdout.split() == ["k1", "k2", "(primary)"]
    other = tmp_path / "other.kek"
    other.write_text("b" * 64 + "\n")
    wrong = run_cli("keys", "list", env={**env, "FHIRCRYPT_KEK_FILE": str(other)})  # env beats the file
    assert wrong.returncode == 2 and "k1" not in wrong.stdout
    flagged = run_cli(
        "keys", "list", "--kek-file", str(tmp_path / "kek"), env={**env, "FHIRCRYPT_KEK_FILE": str(other)}
    )
    assert flagged.returncode == 0, flagged.stderr  # the flag beats the environment
