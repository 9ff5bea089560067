"""`controlplane check-config FILE`: the lab's own targets file passes; a wrong key or type is
named with its line; a policy that can never act where it points is named; `--probe` runs
each probe once; and it never acts (no state store is made)."""

from __future__ import annotations

from pathlib import Path

import tomli_w
from click.testing import CliRunner

from lab.layout import StackLayout
from lab.targets import controlplane_targets, write_targets
from web.cli import main


def lab_targets(tmp_path: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    layout = StackLayout(tmp_path / "stack", 30000)
    targets = controlplane_targets(layout, shop_admin_token="t", redis_password="p")
    path = tmp_path / "targets.toml"
    write_targets(path, targets)
    return path, targets


def check(path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["check-config", str(path), *args])
    return result.exit_code, result.output


def test_the_labs_own_targets_file_passes_and_nothing_is_made(tmp_path: Path) -> None:
    path, _ = lab_targets(tmp_path)
    code, out = check(path)
    assert code == 0, out
    assert "ok (" in out and "policies" in out
    assert not (tmp_path / "stack" / "controlplane" / "state.db").exists()


def test_a_wrong_key_or_type_is_named_with_its_line(tmp_path: Path) -> None:
    path, targets = lab_targets(tmp_path)
    targets["policies"][3]["cooldown_s"] = "soon"
    targets["probes"][1]["intervl_s"] = 2
    write_targets(path, targets)
    code, out = check(path)
    assert code == 1
    lines = path.read_text().splitlines()
    for where, key in (
        ("policies[3].cooldown_s", "cooldown_s"),
        ("probes[1].intervl_s", "intervl_s"),
    ):
        [said] = [line for line in out.splitlines() if where in line]
        number = int(said.split(":")[0].removeprefix("line "))
        assert lines[number - 1].strip().startswith(key), (said, lines[number - 1])


def test_a_policy_that_cannot_act_where_it_points_is_named(tmp_path: Path) -> None:
    path, targets = lab_targets(tmp_path)
    targets["executors"] = {}  # nothing can start, stop or fence a process any more
    flush = next(p for p in targets["policies"] if p["action"] == "cache_flush")
    targets["policies"].append(
        {**flush, "name": "ghost", "source": "probe", "match": {"probe": "no-such-probe"}}
    )
    path.write_text(tomli_w.dumps(targets))
    code, out = check(path)
    assert code == 1
    assert "'ghost' matches no probe" in out
    assert "'failover-primary' (failover) cannot reach shop-db-cluster: no executor" in out
    assert "(restart) cannot reach shop-0: no executor" in out
    assert "cache_flush" not in out.replace("'ghost'", "")  # it talks to Redis, needs none


def test_with_probe_each_probe_runs_once_and_says_what_it_sees(tmp_path: Path) -> None:
    path, targets = lab_targets(tmp_path)
    targets["probes"] = [p for p in targets["probes"] if p["kind"] == "tcp"][:2] or [
        {"name": "db-port", "kind": "tcp", "service": "shop-db-cluster",
         "params": {"host": "127.0.0.1", "port": 1}}
    ]  # fmt: skip
    names = {p["name"] for p in targets["probes"]}
    targets["policies"] = []  # the probes' policies go with them
    path.write_text(tomli_w.dumps(targets))
    code, out = check(path, "--probe")
    assert code == 0, out
    for name in names:
        assert f"probe {name}: down" in out  # nothing listens on the lab's ports here


def test_a_problem_across_keys_is_named_with_its_line_too(tmp_path: Path) -> None:
    path, targets = lab_targets(tmp_path)
    i = next(i for i, p in enumerate(targets["policies"]) if p["source"] == "alert")
    targets["policies"][i]["target"] = "no-such-service"
    write_targets(path, targets)
    code, out = check(path)
    assert code == 1
    [said] = [line for line in out.splitlines() if "unknown service" in line]
    assert said.startswith("line ") and f"policies[{i}].target" in said, said
    number = int(said.split(":")[0].removeprefix("line "))
    assert path.read_text().splitlines()[number - 1].strip().startswith("target"), said


def commands_of(group: object) -> set[str]:
    import click

    assert isinstance(group, click.Group)
    return set(group.commands)


def test_the_products_command_lists_only_its_own_and_the_labs_only_the_labs() -> None:
    from lab.cli import main as shoplab

    product = {"serve", "check-config", "user", "facts", "backup", "backups", "restore"}
    lab = {"up", "down", "status", "demo", "chaos", "load", "gameday"}
    assert commands_of(main) == product
    assert commands_of(shoplab) == lab
    said = CliRunner().invoke(main, ["--help"]).output
    assert all(name in said for name in product) and "gameday" not in said


def test_a_backup_asked_without_an_api_token_says_how_to_give_one(tmp_path: Path) -> None:
    path, _ = lab_targets(tmp_path)
    result = CliRunner().invoke(main, ["backup", "--targets", str(path)], env={"CP_API_TOKEN": ""})
    assert result.exit_code != 0
    assert "no API token: set CP_API_TOKEN" in result.output, result.output


def test_the_labs_template_renders_a_plain_commented_file_that_passes(tmp_path: Path) -> None:
    from lab.targets import render_targets

    layout = StackLayout(tmp_path / "a stack 😀", 30000, shop_count=3)  # beyond the BMP too
    text = render_targets(layout, shop_admin_token='t"\\', redis_password="p@/", api_token="k")
    assert text.count("\n# ") > 20  # the reasons stay with the values
    path = tmp_path / "targets.toml"
    write_targets(path, text)
    code, out = check(path)
    assert code == 0, out
    assert all(f'name = "shop-{i}-ready"' in text for i in range(3))


def test_a_command_given_no_targets_file_names_what_is_missing_and_makes_no_store(
    tmp_path: Path,
) -> None:
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        for args in (["backups"], ["facts", "shop-db-cluster"], ["user", "disable", "x"]):
            result = CliRunner().invoke(main, args, env={"CP_TARGETS_FILE": ""})
            assert result.exit_code != 0, args
            assert "give --targets FILE" in result.output, result.output
    finally:
        os.chdir(here)
    assert list(tmp_path.iterdir()) == []  # no state store made where it was run


def test_a_service_whose_component_its_local_executor_lacks_is_named(tmp_path: Path) -> None:
    path = tmp_path / "targets.toml"
    recipe = {"argv": ["sleep", "30"], "log": str(tmp_path / "web.log")}
    path.write_text(tomli_w.dumps({
        "executors": {"host": {"kind": "local", "params": {"components": {"web": recipe}}}},
        "services": [{"name": "shop", "component": "web"}, {"name": "db", "component": "pg"}],
    }))  # fmt: skip
    code, out = check(path)
    assert code == 1, out
    assert "services[1].component" in out and "'pg' is none of its executor's components" in out
    assert "services[0]" not in out


def test_the_multi_host_labs_targets_file_passes_with_every_component_on_a_host(
    tmp_path: Path,
) -> None:
    from lab.hosts.stack import HostsStack

    stack = HostsStack(tmp_path / "hosts")  # not started: only its targets file is rendered
    path = tmp_path / "targets.toml"
    write_targets(path, stack.render_targets())
    code, out = check(path)
    assert code == 0, out
    assert "1 executors" in out
    text = path.read_text()
    assert 'kind = "ssh"' in text and "127.0.0.1" not in text


def test_the_five_host_example_passes() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "targets-five-hosts.toml"
    code, out = check(example)
    assert code == 0, out
    assert "7 services" in out
